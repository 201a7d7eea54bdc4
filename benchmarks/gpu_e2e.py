"""End to end on one host's GPUs: `afd serve` disaggregated (1 attention + 1 FFN GPU) against
`afd serve --colocated` (one GPU), same checkpoint, same load, decode at a long context.

Each deployment is started as a user would (`python -m services.cli serve ... --no-gateway
--device cuda`), then C clients stream requests through the attention instance's gRPC API
(what the gateway calls; the gateway's own cost is measured in docs/benchmarks.md): each
prompt is --input-len random token ids (no prefix shared), --output-len tokens out, greedy,
EOS ignored. Reported per deployment and concurrency:
- TPOT: per request, (last token time - first token time) / (tokens - 1), median;
- decode tokens/s: tokens emitted while every request was decoding (from the last first
  token to the first last token), so prefill does not dilute it; per GPU by the GPUs used.

A script, not a test: `python benchmarks/gpu_e2e.py --model DIR` on a machine with two GPUs
(a checkpoint from `afd init-checkpoint DIR --preset step3 --layers L --fp8 --weights`).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common import cluster_secret  # noqa: E402
from services.common.sampling_params import SamplingParams  # noqa: E402
from services.common.wire.attention_client import AttentionClient  # noqa: E402

# Every cluster this script starts shares one secret (the children inherit it); its
# clients send it.
SECRET = os.environ.setdefault(cluster_secret.ENV, cluster_secret.new_secret())

READY = re.compile(r"cluster ready: attention instances at (\S+)")
DEPLOYMENTS = {
    "AFD 1A+1F": (["--attention-instances", "1", "--ffn-instances", "1"], 2),
    "colocated": (["--colocated"], 1),
}


def start(model: str, device: str, extra: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "services.cli", "serve", "--model", model, "--no-gateway"]
    command += ["--device", device, "--max-num-batched-tokens", "2048", *extra]
    out = log.open("w")
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        match = READY.search(log.read_text())
        if match:
            return process, match.group(1)
        if process.poll() is not None:
            sys.exit(f"serve exited: {log.read_text()[-2000:]}")
        time.sleep(1)
    process.kill()
    sys.exit("serve was not ready within 600 s")


def one_request(client: AttentionClient, name: str, prompt: list[int], n: int) -> list[float]:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    times = []
    for delta in client.generate(name, prompt, params):
        times += [time.perf_counter()] * len(delta.new_token_ids)
    return times


def run_load(address: str, concurrency: int, input_len: int, output_len: int) -> dict:
    client = AttentionClient(grpc.insecure_channel(address), SECRET)
    rng = random.Random(concurrency)
    prompts = [[rng.randrange(1000, 100000) for _ in range(input_len)] for _ in range(concurrency)]
    results: list[list[float]] = [[] for _ in range(concurrency)]

    def worker(i: int) -> None:
        results[i] = one_request(client, f"r{concurrency}-{i}", prompts[i], output_len)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tpots = [(r[-1] - r[0]) / (len(r) - 1) * 1e3 for r in results]
    window = (max(r[0] for r in results), min(r[-1] for r in results))
    in_window = sum(window[0] <= t <= window[1] for r in results for t in r)
    # No window when some request finished before the last one started decoding: then
    # --output-len is too short for this concurrency, and no rate is claimed.
    rate = in_window / (window[1] - window[0]) if window[1] > window[0] else None
    return {"tpot_ms": statistics.median(tpots), "decode_tokens_per_s": rate}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--input-len", type=int, default=4096)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--device", default="cuda", help="cpu: a functional check only")
    args = parser.parse_args()
    print("| deployment | GPUs | concurrency | TPOT ms (median) | decode tokens/s | per GPU |")
    print("|---|---|---|---|---|---|", flush=True)
    for name, (extra, gpus) in DEPLOYMENTS.items():
        log = args.log_dir / f"serve-{gpus}.log"
        process, address = start(args.model, args.device, extra, log)
        try:
            for c in args.concurrency:
                r = run_load(address, c, args.input_len, args.output_len)
                rate = r["decode_tokens_per_s"]
                cells = ["-", "-"] if rate is None else [f"{rate:.0f}", f"{rate / gpus:.0f}"]
                print(f"| {name} | {gpus} | {c} | {r['tpot_ms']:.1f} | " + " | ".join(cells)
                      + " |", flush=True)  # fmt: skip
        finally:
            process.terminate()
            process.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
