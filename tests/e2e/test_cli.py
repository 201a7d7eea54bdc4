"""The `afd` console script in subprocesses: init-checkpoint writes a checkpoint that generate
serves; generation is reproducible; every user mistake ends in exit code 2 and one line.

Independent commands run concurrently, so the file costs a few import times, not one per
command. Each child runs torch on one thread: several of them share few cores, and torch's
default thread pool spins so hard under contention that a tiny model slows 50-fold.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from services.common.config import load_config
from services.common.model.schema import checkpoint_tensors
from services.common.presets import preset_config

PROMPT = "Hello there"
TIMEOUT_S = 120
MISSING_TENSOR = "model.layers.2.moe.gate.weight"


def afd_executable() -> str:
    """The console script installed beside this interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / "afd"
    found = str(beside) if beside.exists() else shutil.which("afd")
    if found is None:
        pytest.fail("no `afd` console script: run `pip install -e .` in the venv")
    return found


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("afd ")]

    @property
    def stats(self) -> str:
        """generate's closing `[N prompt tokens, M generated, ...]` line on stderr."""
        lines = [line for line in self.stderr.splitlines() if line.startswith("[")]
        assert len(lines) == 1, self.stderr
        return lines[0]

    @property
    def num_prompt_tokens(self) -> int:
        return int(re.match(r"\[(\d+) prompt tokens", self.stats).group(1))


def run_afd(*commands: list[str]) -> list[Result]:
    """Run `afd *command` for each command at once; results in the same order."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [afd_executable(), *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for command in commands
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        results.append(Result(proc.returncode, stdout, stderr))
    return results


def generate(model: Path, *args: str, prompt: str = PROMPT) -> list[str]:
    return ["generate", "--model", str(model), "--prompt", prompt, "--max-tokens", "8", *args]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    (result,) = run_afd(["init-checkpoint", str(path), "--preset", "tiny", "--seed", "1"])
    assert result.returncode == 0, result.stderr
    assert f"wrote a tiny checkpoint to {path}" in result.stdout
    return path


def test_init_checkpoint_writes_a_complete_checkpoint(checkpoint: Path) -> None:
    raw = json.loads((checkpoint / "config.json").read_text())
    assert raw["model_type"] == "step3_vl"
    assert raw["text_config"]["model_type"] == "step3_text"
    cfg = load_config(checkpoint)
    assert cfg == preset_config("tiny")

    generation = json.loads((checkpoint / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 0, "eos_token_id": [128805]}
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    assert "{{" in tokenizer_config["chat_template"]
    assert (checkpoint / "tokenizer.json").stat().st_size > 1_000_000  # DeepSeek-V3's vocab

    with safe_open(checkpoint / "model.safetensors", framework="pt") as weights:
        shapes = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
    assert shapes == checkpoint_tensors(cfg)


@pytest.fixture(scope="module")
def generations(checkpoint: Path) -> dict[str, Result]:
    """Every successful generate run, started together."""
    runs = {
        "greedy": generate(checkpoint),
        "greedy again": generate(checkpoint),
        "seed 7": generate(checkpoint, "--temperature", "0.9", "--seed", "7"),
        "seed 7 again": generate(checkpoint, "--temperature", "0.9", "--seed", "7"),
        "seed 8": generate(checkpoint, "--temperature", "0.9", "--seed", "8"),
        "raw": generate(checkpoint, "--raw"),
    }
    return dict(zip(runs, run_afd(*runs.values()), strict=True))


@pytest.mark.parametrize("name", ["greedy", "seed 7", "raw"])
def test_generate_prints_text_and_stats(generations: dict[str, Result], name: str) -> None:
    result = generations[name]
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "8 generated" in result.stats
    assert "finish: length" in result.stats
    assert "Traceback" not in result.stderr


def test_greedy_generation_is_deterministic(generations: dict[str, Result]) -> None:
    assert generations["greedy"].stdout == generations["greedy again"].stdout


def test_sampling_follows_the_seed(generations: dict[str, Result]) -> None:
    assert generations["seed 7"].stdout == generations["seed 7 again"].stdout
    assert generations["seed 7"].stdout != generations["seed 8"].stdout


def test_raw_prompt_skips_the_chat_template(generations: dict[str, Result]) -> None:
    raw, chat = generations["raw"], generations["greedy"]
    assert raw.returncode == 0, raw.stderr
    assert "8 generated" in raw.stats
    assert raw.num_prompt_tokens < chat.num_prompt_tokens  # no role markers around the prompt


def test_step3_preset_without_weights_writes_config_and_tokenizer(tmp_path: Path) -> None:
    # With weights, 6 Step-3 layers would be tens of GB; the timeout keeps this honest.
    (result,) = run_afd(["init-checkpoint", str(tmp_path), "--preset", "step3", "--layers", "6"])
    assert result.returncode == 0, result.stderr
    assert "(no weights)" in result.stdout
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    cfg = load_config(tmp_path)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.moe_layers) == (7168, 6, (4,))


def _copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="module")
def failures(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Result]:
    """Every user mistake, run together."""
    root = tmp_path_factory.mktemp("broken")
    empty = root / "empty"
    empty.mkdir()

    missing_tensor = _copy_checkpoint(checkpoint, root / "missing_tensor")
    weights = missing_tensor / "model.safetensors"
    tensors = load_file(weights)
    del tensors[MISSING_TENSOR]
    save_file(tensors, weights, metadata={"format": "pt"})

    short_context = _copy_checkpoint(checkpoint, root / "short_context")
    config = json.loads((short_context / "config.json").read_text())
    config["text_config"]["max_position_embedding"] = 64
    (short_context / "config.json").write_text(json.dumps(config))

    a_file = root / "a_file"
    a_file.write_text("not a folder")

    runs = {
        "no config.json": generate(empty),
        "missing tensor": generate(missing_tensor),
        "max tokens 0": generate(checkpoint, "--max-tokens", "0"),
        "negative temperature": generate(checkpoint, "--temperature", "-1"),
        "unknown dtype": generate(checkpoint, "--dtype", "float8"),
        "prompt too long": generate(short_context, "--raw", prompt="word " * 100),
        "checkpoint path is a file": ["init-checkpoint", str(a_file), "--preset", "tiny"],
        # The cluster's facts are the controller's: checked before any process starts, and
        # no instance takes them (cluster_config.py).
        "five micro-batches": ["serve", "--model", str(checkpoint), "--micro-batches", "5"],
        "an attention instance's own token budget": [
            "attention", "--index", "0", "--controller", "127.0.0.1:1",
            "--model", str(checkpoint), "--max-num-batched-tokens", "64",
        ],
        "an FFN instance's own FP8 dispatch": [
            "ffn", "--index", "0", "--controller", "127.0.0.1:1",
            "--model", str(checkpoint), "--fp8-dispatch",
        ],
    }  # fmt: skip
    return dict(zip(runs, run_afd(*runs.values()), strict=True))


ERRORS = {
    "no config.json": ["generate", "no config.json in", "empty"],
    "missing tensor": ["generate", MISSING_TENSOR],
    "max tokens 0": ["generate", "max_tokens", "got 0"],
    "negative temperature": ["generate", "temperature", "got -1"],
    "unknown dtype": ["generate", "'float8'"],
    "prompt too long": ["generate", "the prompt has", "at most 64 tokens"],
    "checkpoint path is a file": ["init-checkpoint", "a_file"],
    "five micro-batches": ["serve", "num_micro_batches (--micro-batches) must be 1 to 4, got 5"],
    "an attention instance's own token budget": [
        "attention",
        "--max-num-batched-tokens is the cluster's",
        "afd controller --max-num-batched-tokens",
    ],
    "an FFN instance's own FP8 dispatch": ["ffn", "unrecognized arguments: --fp8-dispatch"],
}


@pytest.mark.parametrize("case", ERRORS)
def test_user_mistakes_end_in_one_clear_line(failures: dict[str, Result], case: str) -> None:
    result = failures[case]
    command, *expected = ERRORS[case]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.error_lines) == 1, result.stderr
    assert result.error_lines[0].startswith(f"afd {command}: error: ")
    for part in expected:
        assert part in result.stderr
