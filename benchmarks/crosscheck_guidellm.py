"""Does `afd bench` measure what an established tool measures? The same local server, the
same load, measured by `afd bench` and by guidellm in turn; prints both and their ratios.

    benchmarks/load_tools.sh guidellm     # guidellm in .bench-tools/guidellm, not in .venv
    .venv/bin/python benchmarks/crosscheck_guidellm.py [--rounds 2] [--concurrency 4]

Load: closed loop of C streams, synthetic prompts of 128 tokens (each tool draws its own
text), 64 output tokens with ignore_eos, N requests, no warm-up for either, completions
endpoint of `afd serve` (tiny model, 1 attention + 1 FFN instance, gateway admission off).
guidellm sends no temperature, so the server samples at its default of 1; `afd bench` is
told `--temperature 1` to match (its default, greedy, is a cheaper step on this model: the
sampler's softmax over the 128K vocabulary is a large part of a tiny model's step).
The rounds alternate the tools so drift on a shared machine hits both alike.

Each tool's own figures are compared, and also both recomputed one way from their
per-request records without the first C requests: guidellm generates its prompts in a
separate process while its first requests run, which on two cores slows the server during
that first round (its first requests take about twice as long as the rest).

guidellm names things differently: its "inter_token_latency" is (last token - first token)
/ (tokens - 1) per request, which is what `afd bench` (and vLLM) call TPOT; its
"time_per_output_token" includes the wait for the first token. So TPOT is compared with
guidellm's ITL, and guidellm's TPOT is printed only to show the difference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.cluster import Cluster, afd  # noqa: E402

GUIDELLM = ROOT / ".bench-tools" / "guidellm" / "bin" / "guidellm"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


Record = tuple[float, float, int, float, float]  # start s, end s, tokens, TTFT s, TPOT s


def steady(records: list[Record], skip: int) -> dict[str, float]:
    """Figures over the requests after the first `skip` to start, the same for both tools."""
    kept = sorted(records)[skip:]
    window = max(r[1] for r in kept) - min(r[0] for r in kept)
    return {
        "steady output tok/s": sum(r[2] for r in kept) / window,
        "steady TTFT p50 ms": 1e3 * statistics.median(r[3] for r in kept),
        "steady TPOT p50 ms": 1e3 * statistics.median(r[4] for r in kept),
    }


def run_afd_bench(url: str, out: Path, args: argparse.Namespace) -> dict[str, float]:
    bench = afd(
        "bench", "--url", url, "--model", "tiny", "--concurrency", str(args.concurrency),
        "--num-requests", str(args.num_requests), "--input-len", "128", "--output-len", "64",
        "--temperature", "1", "--warmup", "0", "--output-dir", str(out), "--no-progress",
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    assert bench.wait() == 0, "afd bench failed"
    point = json.loads(max(out.glob("*.json"), key=os.path.getmtime).read_text())["points"][0]
    s = point["summary"]
    records = [
        (r["start_s"], r["end_s"], r["output_tokens"], r["ttft_s"], r["tpot_s"])
        for r in point["requests"]
    ]
    return {
        "output tok/s": s["output_throughput"],
        "requests/s": s["request_throughput"],
        "TTFT p50 ms": s["ttft_ms"]["p50"],
        "TPOT p50 ms": s["tpot_ms"]["p50"],
        **steady(records, args.concurrency),
    }


def run_guidellm(url: str, tokenizer: Path, out: Path, args: argparse.Namespace) -> dict:
    path = out / "guidellm.json"
    command = [
        str(GUIDELLM), "run",
        "--backend", f"kind=openai_http,target={url},model=tiny,request_format=/v1/completions",
        "--profile", f"kind=concurrent,streams={args.concurrency}",
        "--constraint", f"kind=max_requests,count={args.num_requests}",
        "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
        "--data", "kind=synthetic_text,prompt_tokens=128,output_tokens=64",
        "--output", f"kind=json,path={path}", "--disable-progress",
    ]  # fmt: skip
    # One worker process: on two cores more would take the server's CPU.
    env = {**os.environ, **OFFLINE, "GUIDELLM__MAX_WORKER_PROCESSES": "1"}
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    benchmark = json.loads(path.read_text())["benchmarks"][0]
    m = benchmark["metrics"]
    records = [
        (r["request_start_time"], r["request_end_time"], r["output_tokens"],
         r["time_to_first_token_ms"] / 1e3, r["inter_token_latency_ms"] / 1e3)
        for r in benchmark["requests"]["successful"]
    ]  # fmt: skip
    return {
        "output tok/s": m["output_tokens_per_second"]["successful"]["mean"],
        "requests/s": m["requests_per_second"]["successful"]["mean"],
        "TTFT p50 ms": m["time_to_first_token_ms"]["successful"]["median"],
        "TPOT p50 ms": m["inter_token_latency_ms"]["successful"]["median"],
        **steady(records, args.concurrency),
        "guidellm's own TPOT p50 ms": m["time_per_output_token_ms"]["successful"]["median"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--num-requests", type=int, default=40)
    args = parser.parse_args()
    if not GUIDELLM.exists():
        print("guidellm is not installed: run benchmarks/load_tools.sh guidellm", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp())
    folder = work / "tiny"
    assert afd("init-checkpoint", str(folder), "--preset", "tiny").wait() == 0
    cluster = Cluster("--model", str(folder), "--tpot-sla-ms", "1e6", gateway=True)
    ours, theirs = [], []
    try:
        for i in range(args.rounds):
            ours.append(run_afd_bench(cluster.gateway_url, work / f"afd-{i}", args))
            (work / f"guidellm-{i}").mkdir()
            theirs.append(run_guidellm(cluster.gateway_url, folder, work / f"guidellm-{i}", args))
            print(f"round {i + 1}: afd bench {ours[-1]}\n         guidellm {theirs[-1]}")
    finally:
        cluster.stop()

    print(f"\nC = {args.concurrency}, {args.num_requests} requests per run, "
          f"median of {args.rounds} rounds\n")  # fmt: skip
    print("| figure | afd bench | guidellm | afd bench / guidellm |")
    print("|---|---|---|---|")
    for key in theirs[0]:
        g = statistics.median(r[key] for r in theirs)
        if key in ours[0]:
            a = statistics.median(r[key] for r in ours)
            print(f"| {key} | {a:.2f} | {g:.2f} | {a / g:.3f} |")
        else:
            print(f"| {key} | - | {g:.2f} | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
