"""What the OpenAI gateway adds on top of the attention instance's own gRPC API.

Starts `afd serve` (tiny model, 1 attention + 1 FFN instance, gateway included), then, on the
same cluster in the same run, measures:
- time per output token (TPOT) of B concurrent streams, through the gateway with the
  official `openai` client and directly through `AttentionClient` (gRPC): the difference is
  the gateway's added latency per token;
- requests per second of short requests (1 output token) from C concurrent clients, both
  ways.
A script, not a test: it prints Markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.sampling_params import SamplingParams  # noqa: E402
from services.common.wire.attention_client import AttentionClient  # noqa: E402
from tests.support.cluster import CLUSTER_SECRET, Cluster, afd  # noqa: E402

# The secret tests.support.cluster starts every cluster with; this script's clients send it.
SECRET = CLUSTER_SECRET

PROMPT = "The quick brown fox jumps over the lazy dog " * 3


def tpot(times: list[float]) -> float:
    """Decode time / (tokens - 1) of one stream, from the arrival time of each token."""
    return (times[-1] - times[0]) / (len(times) - 1)


def grpc_stream(address: str, prompt_ids: list[int], tokens: int, request_id: str) -> float:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    times = []
    with grpc.insecure_channel(address) as channel:
        for delta in AttentionClient(channel, SECRET).generate(request_id, prompt_ids, params):
            times += [time.perf_counter()] * len(delta.new_token_ids)
    return tpot(times)


def gateway_stream(client: openai.OpenAI, tokens: int) -> float:
    times = []
    stream = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=tokens, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
    return tpot(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--short-requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp()) / "tiny"
    afd("init-checkpoint", str(folder), "--preset", "tiny").wait()
    from services.common.tokenizer import Tokenizer

    prompt_ids = Tokenizer.from_dir(folder).encode(PROMPT, add_special_tokens=True)
    cluster = Cluster(
        "--model", str(folder), "--attention-instances", "1", "--ffn-instances", "1",
        "--micro-batches", "1", "--dtype", "float32", gateway=True,
    )  # fmt: skip
    client = openai.OpenAI(base_url=cluster.gateway_url + "/v1", api_key="-", max_retries=0)
    address = cluster.addresses[0]
    try:
        gateway_stream(client, 8)  # warm-up
        print("| B | TPOT gRPC ms | TPOT gateway ms | added per token ms | gateway / gRPC |")
        print("|---|---|---|---|---|")
        for b in args.batches:
            with ThreadPoolExecutor(b) as pool:
                direct = list(
                    pool.map(lambda i: grpc_stream(address, prompt_ids, args.tokens, f"d{i}"),
                             range(b))
                )  # fmt: skip
                through = list(pool.map(lambda _: gateway_stream(client, args.tokens), range(b)))
            d, g = statistics.median(direct) * 1e3, statistics.median(through) * 1e3
            print(f"| {b} | {d:.1f} | {g:.1f} | {g - d:.1f} | {g / d:.2f} |")

        print()
        print("| path | requests | clients | requests/s |")
        print("|---|---|---|---|")
        n, c = args.short_requests, args.clients
        for name, one in (
            ("gRPC", lambda i: grpc_stream(address, prompt_ids, 2, f"s{i}")),
            ("gateway", lambda i: gateway_stream(client, 2)),
        ):
            started = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                list(pool.map(one, range(n)))
            rate = n / (time.perf_counter() - started)
            print(f"| {name} | {n} | {c} | {rate:.0f} |")
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
