"""`afd bench` against the real local stack, AFD and colocated, run as a user runs it: the
command line, the files it writes and what they say."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import openai
import pytest

from tests.support.cluster import Cluster, afd

KEY = "sk-bench"


@pytest.fixture(scope="module")
def afd_stack(checkpoint):
    cluster = Cluster(
        "--model", str(checkpoint), "--dtype", "float32", "--ffn-instances", "2",
        "--api-key", KEY, gateway=True,
    )  # fmt: skip
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def colocated_stack(checkpoint):
    cluster = Cluster(
        "--model", str(checkpoint), "--dtype", "float32", "--colocated",
        "--attention-instances", "2", gateway=True,
    )  # fmt: skip
    yield cluster
    cluster.stop()


def bench(url: str, out: Path, *args: str) -> tuple[int, str, dict | None]:
    process = afd(
        "bench", "--url", url, "--model", "tiny", "--output-dir", str(out), "--no-progress",
        *args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    output, _ = process.communicate(timeout=300)
    results = sorted(out.glob("*.json")) if out.exists() else []
    return process.returncode, output, json.loads(results[-1].read_text()) if results else None


def test_bench_measures_every_token_of_every_request(afd_stack, tmp_path):
    rc, output, result = bench(
        afd_stack.gateway_url, tmp_path, "--api-key", KEY, "--concurrency", "3",
        "--num-requests", "9", "--input-len", "16", "--output-len", "8", "--num-gpus", "3",
        "--warmup", "1",
    )  # fmt: skip
    assert rc == 0, output
    (point,) = result["points"]
    s = point["summary"]
    assert point["load"] == {"concurrency": 3, "rate": None}
    assert (s["completed"], s["failed"], s["short_outputs"]) == (9, 0, 0)
    # The server counts 16 prompt tokens and its BOS: the synthetic lengths are real tokens.
    assert s["input_tokens"] == 9 * 17 and s["output_tokens"] == 9 * 8
    # One chunk per token, seven gaps per request, except where a token that ends inside a
    # UTF-8 character waits for the next (random weights pick such tokens often).
    assert 9 * 7 // 2 <= s["itl_ms"]["count"] <= 9 * 7
    assert 0 < s["ttft_ms"]["p50"] < s["e2e_ms"]["p50"]
    assert 0 < s["tpot_ms"]["p50"] <= s["tpot_ms"]["p90"] <= s["tpot_ms"]["p99"]
    assert s["output_throughput"] == pytest.approx(72 / s["duration_s"])
    assert s["output_throughput_per_gpu"] == pytest.approx(s["output_throughput"] / 3)
    assert s["goodput"] <= s["output_throughput"]
    assert result["config"]["command"].startswith("afd bench --url")
    assert "| concurrency=3 | 9 | 0 |" in output  # the table, printed
    assert len(list(tmp_path.glob("*.md"))) == 1


def test_a_sweep_of_each_stack_draws_one_frontier(afd_stack, colocated_stack, tmp_path):
    files = []
    for name, stack, extra in (
        ("afd", afd_stack, ["--api-key", KEY]),
        ("colocated", colocated_stack, []),
    ):
        rc, output, result = bench(
            stack.gateway_url, tmp_path / name, *extra, "--sweep", "concurrency=1,2",
            "--num-requests", "3", "--input-len", "8", "--output-len", "6", "--endpoint", "chat",
            "--label", name, "--warmup", "0",
        )  # fmt: skip
        assert rc == 0, output
        assert [p["load"]["concurrency"] for p in result["points"]] == [1, 2]
        assert all(p["summary"]["completed"] == 3 for p in result["points"])
        assert len(list((tmp_path / name).glob("*.png"))) == 1
        files += [str(p) for p in (tmp_path / name).glob("*.json")]
    plot = tmp_path / "both.png"
    assert afd("bench", "plot", *files, "-o", str(plot)).wait(120) == 0
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_colocated_serving_gives_the_same_tokens_as_afd(afd_stack, colocated_stack):
    def completions(stack, key):
        client = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key=key, max_retries=0)
        return [
            client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
            .choices[0]
            .text
            for prompt in ("The capital of France is", "1, 2, 3,", "Once upon a time")
        ]

    assert completions(colocated_stack, "-") == completions(afd_stack, KEY)


def test_requests_the_server_refuses_are_reported_not_hidden(afd_stack, tmp_path):
    rc, output, result = bench(
        afd_stack.gateway_url, tmp_path, "--api-key", KEY, "--num-requests", "2",
        "--output-len", "100000", "--warmup", "0",
    )  # fmt: skip
    assert rc == 1, output  # nothing succeeded: the benchmark failed
    s = result["points"][0]["summary"]
    assert (s["completed"], s["failed"]) == (0, 2)
    (message,) = s["errors"]
    assert message.startswith("HTTP 400: This model's maximum context length is 4096 tokens")
    assert "2 x HTTP 400" in output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--api-key", ""], "wants an API key: pass --api-key or set OPENAI_API_KEY"),
        (["--api-key", KEY, "--model", "other"], "does not serve 'other'; it serves ['tiny']"),
        (["--api-key", KEY, "--sweep", "threads=1,2"], "give concurrency=1,4,16 or rate="),
        (["--api-key", KEY, "--dataset", "/nonexistent.jsonl"], "/nonexistent.jsonl"),
    ],
)
def test_a_mistake_gets_one_clear_line(afd_stack, tmp_path, args, message):
    rc, output, result = bench(afd_stack.gateway_url, tmp_path, *args)
    assert rc == 2 and message in output and "Traceback" not in output
    assert result is None  # nothing written


def test_an_unreachable_server_is_named(tmp_path):
    rc, output, _ = bench("http://127.0.0.1:9", tmp_path)
    assert rc == 2 and "cannot reach http://127.0.0.1:9/v1/models" in output
