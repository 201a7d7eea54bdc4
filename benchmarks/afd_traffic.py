"""Bytes crossing between instances per token and layer, FFN instances of one process
against FFN instances of several, on CPU (gloo): the traffic issue 20's topology cuts.

    python benchmarks/afd_traffic.py [--attention 4] [--ffn-processes 8] [--sizes 1,4]

For each size G, `afd serve` runs the same M attention instances and the same number of FFN
processes, as FFN instances of G processes (8 processes: 8 instances of 1, or 2 of 4). The
same greedy requests go to every attention instance; each attention instance's own counters
(`afd_data_plane_bytes_total`, `afd_attention_batch_tokens`) give the bytes it sent and
received per computed token and layer. Bytes inside an FFN instance (its processes' exchange:
NVLink in a node) do not cross between instances and are not counted. The tokens must be
the same at every size: the topology changes where the work runs, not what it computes.
Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from services.common import cluster_secret
from services.common.config import load_config
from services.common.sampling_params import SamplingParams
from services.common.wire.attention_client import AttentionClient

SECRET = "afd-traffic-benchmark"
READY_TIMEOUT_S = 600.0


def afd(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, cluster_secret.ENV: SECRET, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "services.cli", *args]
    return subprocess.Popen(command, env=env, text=True, **kwargs)


def serve(
    checkpoint: Path, m: int, n: int, g: int, targets: Path
) -> tuple[subprocess.Popen, list[str]]:
    """The cluster, and its attention instances' gRPC addresses once it serves."""
    process = afd(
        "serve", "--model", str(checkpoint), "--attention-instances", str(m),
        "--ffn-instances", str(n), "--gpus-per-ffn-instance", str(g), "--dtype", "float32",
        "--prometheus-targets", str(targets), "--no-gateway",
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + READY_TIMEOUT_S
    addresses = []
    for line in process.stdout:
        if line.startswith("cluster ready: attention instances at "):
            addresses = line.split(" at ", 1)[1].split()
        if line.startswith("metrics at "):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"afd serve (G={g}) did not start")
    else:
        raise RuntimeError(f"afd serve (G={g}) exited with {process.wait()}")
    # Keep reading, so a full pipe never blocks the cluster.
    ThreadPoolExecutor(1).submit(lambda: [None for _ in process.stdout])
    return process, addresses


def read_targets(path: Path) -> list[dict]:
    """`afd serve`'s target list, written just after the line `serve` waited for."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def generate(address: str, request_id: str, prompt: list[int], params: SamplingParams):
    with grpc.insecure_channel(address) as channel:
        ids = []
        for delta in AttentionClient(channel, SECRET).generate(request_id, prompt, params):
            ids += delta.new_token_ids
        return ids


def attention_counters(address: str) -> tuple[float, dict[tuple[str, str], float]]:
    """(tokens computed, {(direction, way): bytes}) from one attention instance's metrics."""
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    tokens = next(
        s.value for s in families["afd_attention_batch_tokens"].samples if s.name.endswith("_sum")
    )
    carried = {
        (s.labels["direction"], s.labels["way"]): s.value
        for s in families["afd_data_plane_bytes"].samples
    }
    return tokens, carried


def measure(args: argparse.Namespace, checkpoint: Path, g: int, prompts, params, logs: Path):
    n = args.ffn_processes // g
    targets = logs / f"targets-{g}.json"
    process, addresses = serve(checkpoint, args.attention, n, g, targets)
    try:
        entries = read_targets(targets)
        attention = [e for e in entries if e["labels"]["component"] == "attention"]
        metrics = [e["targets"][0] for e in sorted(attention, key=lambda e: e["labels"]["index"])]
        with ThreadPoolExecutor(len(prompts)) as pool:
            tokens = list(
                pool.map(
                    lambda i: generate(addresses[i % len(addresses)], f"r{i}", prompts[i], params),
                    range(len(prompts)),
                )
            )
        counters = [attention_counters(address) for address in metrics]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(120)
    return n, tokens, counters


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attention", type=int, default=4, metavar="M")
    parser.add_argument("--ffn-processes", type=int, default=8, metavar="P")
    parser.add_argument("--sizes", default="1,4", help="processes per FFN instance to compare")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if any(args.ffn_processes % g for g in sizes):
        parser.error(f"every size must divide --ffn-processes {args.ffn_processes}")
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 100000) for _ in range(rng.randrange(8, 64))]
               for _ in range(args.requests)]  # fmt: skip
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        checkpoint = logs / "tiny"
        assert afd("init-checkpoint", str(checkpoint), "--preset", "tiny").wait() == 0
        layers = load_config(checkpoint).num_hidden_layers
        rows, reference = [], None
        for g in sizes:
            n, tokens, counters = measure(args, checkpoint, g, prompts, params, logs)
            if reference is None:
                reference = tokens
            elif tokens != reference:
                raise AssertionError(f"G={g} gave other tokens than G={sizes[0]}")
            computed = sum(t for t, _ in counters)
            sent = sum(c[("a2f", "sent")] for _, c in counters)
            received = sum(c[("f2a", "received")] for _, c in counters)
            rows.append((g, n, computed, sent / computed / layers, received / computed / layers))
    base = rows[0][3] + rows[0][4]
    print(f"| FFN instances x processes | tokens computed | A2F B/token/layer | "
          f"F2A B/token/layer | both | vs G={rows[0][0]} |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for g, n, computed, a2f, f2a in rows:
        print(f"| {n} x {g} | {computed:.0f} | {a2f:.0f} | {f2a:.0f} | {a2f + f2a:.0f} | "
              f"{(a2f + f2a) / base:.3f} |")  # fmt: skip
    print(
        f"\n{args.attention} attention instances, {args.ffn_processes} FFN processes, "
        f"{args.requests} requests of {args.max_tokens} tokens; the same tokens at every size"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
