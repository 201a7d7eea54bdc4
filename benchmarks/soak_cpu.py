"""A soak of the local stack: many requests at high concurrency, then the checks a long-lived
deployment relies on. A script, not a test.

    .venv/bin/python benchmarks/soak_cpu.py [--num-requests 2000] [--concurrency 64]
        [--input-len 32:256] [--output-len 8:64] [--output-dir docs/results/soak]

It starts `afd serve` (1 attention, 2 FFN instances, the tiny checkpoint, admission control
off), warms it up with `--warmup` requests, reads every process's resident memory, runs the
soak with `afd bench` in `--rounds` equal parts, reading the memory after each. It then
checks, and prints beside each figure:
- zero failed requests, and every output as long as asked;
- every KV block free and nothing running on the attention instance afterwards;
- resident memory of each process grown by less than 10% over the soak (after the warm-up,
  which is when allocators reach the sizes the load needs), with the growth per round so a
  leak (steady growth) can be told from a plateau.
Exit status 1 if a check fails. Each round's JSON and Markdown go to --output-dir.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

from services.common.wire.attention_client import AttentionClient  # noqa: E402
from tests.support.cluster import CLUSTER_SECRET, Cluster, afd  # noqa: E402
from tests.support.processes import pid_of  # noqa: E402

MAX_GROWTH = 0.10
ROLES = ("services.cli controller", "attention --index 0", "ffn --index 0", "ffn --index 1",
         "services.cli gateway")  # fmt: skip


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError(f"no VmRSS for pid {pid}")


def bench(url: str, args: argparse.Namespace, num: int, out: Path) -> dict:
    command = afd(
        "bench", "--url", url, "--model", "tiny", "--concurrency", str(args.concurrency),
        "--num-requests", str(num), "--warmup", "0", "--input-len", args.input_len,
        "--output-len", args.output_len, "--output-dir", str(out), "--no-progress",
        "--request-timeout", "300", "--label", "soak",
        stdout=subprocess.PIPE,
    )  # fmt: skip
    output, _ = command.communicate()
    print(output)
    return json.loads(sorted(out.glob("*.json"))[-1].read_text())["points"][0]["summary"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--input-len", default="32:256")
    parser.add_argument("--output-len", default="8:64")
    parser.add_argument("--output-dir", type=Path, default=Path("docs/results/soak"))
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp()) / "tiny"
    assert afd("init-checkpoint", str(folder), "--preset", "tiny").wait() == 0
    cluster = Cluster(
        "--model", str(folder), "--ffn-instances", "2", "--tpot-sla-ms", "1e6",
        "--max-num-batched-tokens", "2048", gateway=True,
    )  # fmt: skip
    try:
        pids = {role: pid_of(role, str(folder)) for role in ROLES}
        bench(cluster.gateway_url, args, args.warmup, Path(tempfile.mkdtemp()))
        rss = [{role: rss_kib(pid) for role, pid in pids.items()}]
        start = time.monotonic()
        summaries = []
        for _ in range(args.rounds):
            summaries.append(
                bench(cluster.gateway_url, args, args.num_requests // args.rounds, args.output_dir)
            )
            rss.append({role: rss_kib(pid) for role, pid in pids.items()})
        seconds = time.monotonic() - start
        with grpc.insecure_channel(cluster.addresses[0]) as channel:
            time.sleep(1.0)  # the last aborts and frees reach the engine thread
            load = AttentionClient(channel, CLUSTER_SECRET).load()
    finally:
        cluster.stop()

    failed = sum(x["failed"] for x in summaries)
    done = sum(x["completed"] for x in summaries)
    short = sum(x["short_outputs"] for x in summaries)
    checks = [
        (f"requests failed: {failed} of {done + failed}", failed == 0),
        (f"outputs shorter than asked: {short}", short == 0),
        (f"attention instance afterwards: {load.num_running} running, {load.num_waiting} "
         f"waiting, {load.num_free_blocks} of {load.num_total_blocks} KV blocks free",
         load.num_running + load.num_waiting == 0
         and load.num_free_blocks == load.num_total_blocks),
    ]  # fmt: skip
    tokens = sum(x["output_throughput"] * x["duration_s"] for x in summaries)
    rate = f"{(done + failed) / seconds:.1f} req/s, {tokens / seconds:.0f} output tok/s"
    total = f"{done + failed} requests at concurrency {args.concurrency} in {seconds:.0f} s"
    print(f"\n{total} ({rate})\n")
    rounds = " | ".join(f"after round {i + 1}" for i in range(args.rounds))
    print(f"| process | RSS after warm-up (MiB) | {rounds} | growth over the soak |")
    print("|---" * (args.rounds + 3) + "|")
    for role in ROLES:
        growth = rss[-1][role] / rss[0][role] - 1
        cells = " | ".join(f"{r[role] / 1024:.1f}" for r in rss)
        print(f"| {role} | {cells} | {growth:+.1%} |")
        checks.append((f"{role} memory growth {growth:+.1%}", growth < MAX_GROWTH))
    print()
    for text, ok in checks:
        print(("PASS " if ok else "FAIL ") + text)
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
