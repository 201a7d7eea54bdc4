"""What structured output costs a decode step: B requests all held to a JSON schema against
the same B unconstrained, the tiny model on CPU, the two taking turns.

    python benchmarks/grammar_cpu.py [--batch 64] [--steps 24] [--repeats 5]

Each run prefills B chat prompts, then times `--steps` decode steps of the engine (schedule,
model, masks, sampling, update). The masks' own share is timed apart: `Grammars.constrain`
(every row's mask from llguidance's executor, unpacked and applied to the logits) and each
matcher's `consume_token`. The schema is bounded (as the tests' is), so no request finishes
early and the batch stays whole. Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from services.attention.builder import local_engine
from services.attention.engine import EngineConfig
from services.attention.grammar import Grammars
from services.attention.scheduler import SchedulerConfig
from services.common.model.build import load_model
from services.common.sampling_params import SamplingParams
from services.common.tokenizer import Tokenizer
from services.gateway.structured import grammar_for

SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {"type": "string", "maxLength": 6},
            "minItems": 40,
            "maxItems": 40,
        }
    },
    "required": ["items"],
}


class Timed(Grammars):
    """Grammars that add up the time spent computing and applying masks."""

    seconds = 0.0

    def constrain(self, logits, rows):
        start = time.perf_counter()
        out = super().constrain(logits, rows)
        Timed.seconds += time.perf_counter() - start
        return out


def run(engine, prompts: list[list[int]], grammar: str | None, steps: int) -> tuple[float, float]:
    """(mean decode step seconds, mean mask seconds per step) for one batch."""
    params = SamplingParams(max_tokens=steps + 2, temperature=1.0, seed=0, grammar=grammar)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}-{time.monotonic_ns()}", prompt, params)
    engine.step()  # the prefill
    Timed.seconds = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = (time.perf_counter() - start) / steps
    masks = Timed.seconds / steps
    while engine.has_unfinished_requests():
        engine.step()
    return elapsed, masks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiny"
        command = [sys.executable, "-m", "services.cli", "init-checkpoint", str(folder)]
        subprocess.run([*command, "--preset", "tiny"], check=True, capture_output=True)
        tokenizer = Tokenizer.from_dir(folder)
        model = load_model(folder, dtype="float32", progress=False)
    scheduler = SchedulerConfig(max_num_seqs=args.batch, max_num_batched_tokens=64 * args.batch)
    engine = local_engine(model, EngineConfig(scheduler=scheduler), tokenizer)
    cfg = engine.model_config
    engine._grammars = Timed(tokenizer.backend_json(), cfg.vocab_size, cfg.eos_token_ids)
    grammar = grammar_for({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, False, None)
    no_thinking = {"enable_thinking": False}
    prompts = [
        tokenizer.encode_chat(
            [{"role": "user", "content": f"List {i}"}], template_kwargs=no_thinking
        )
        for i in range(args.batch)
    ]
    run(engine, prompts, grammar, 2)  # warm up: the vocabulary's first read, the caches
    plain, held, masks = [], [], []
    for _ in range(args.repeats):
        plain.append(run(engine, prompts, None, args.steps)[0])
        step, mask = run(engine, prompts, grammar, args.steps)
        held.append(step)
        masks.append(mask)
    p, h, m = (statistics.median(x) for x in (plain, held, masks))
    print("| B | unconstrained step | constrained step | ratio | masks per step | masks share |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.batch} | {p * 1e3:.1f} ms | {h * 1e3:.1f} ms | {h / p:.3f} | "
          f"{m * 1e3:.2f} ms | {m / h:.1%} |")  # fmt: skip
    print(f"\nmedian of {args.repeats} repeats of {args.steps} decode steps, systems in turn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
