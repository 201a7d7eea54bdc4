"""A colocated engine's decode step at Step-3's real shapes on one GPU: eager against CUDA
graphs, at a long context.

The engine (`local_engine`, what `afd serve --colocated` runs) holds a model of --layers
layers at Step-3's real shapes with random bf16 weights (4 dense layers, then MoE, the last
dense, as `step3_config` lays them out), B requests of --context random prompt tokens each.
Once every request is decoding, the next --steps engine steps are timed on the host, each
ending in sampling (which reads the tokens back, so a step's time is its whole cost). The
same model, the same requests: once with `cuda_graphs=False`, once with graphs (the first
decode step of each bucket captures, and is not timed). Then, with graphs, the engine as an
instance runs it: behind its driver thread with C consumer threads, behind the gRPC
attention API with C Generate streams, and with one Session stream for all C requests (what
the gateway uses); there the step time is the decode window (from the
last request's second token to the first request's last) over the tokens in it, times C.

A script, not a test: `python benchmarks/gpu_decode_step.py` prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import grpc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.attention.api import ERROR_CODES, add_attention_service  # noqa: E402
from services.attention.builder import local_engine  # noqa: E402
from services.attention.driver import EngineDriver  # noqa: E402
from services.attention.engine import EngineConfig  # noqa: E402
from services.attention.scheduler import SchedulerConfig  # noqa: E402
from services.common.grpc_server import GrpcServer  # noqa: E402
from services.common.model.build import build_model  # noqa: E402
from services.common.model.schema import checkpoint_tensors  # noqa: E402
from services.common.presets import step3_config  # noqa: E402
from services.common.sampling_params import SamplingParams  # noqa: E402
from services.common.wire import attention as wire  # noqa: E402
from services.common.wire.attention_client import AttentionClient  # noqa: E402


def random_model(layers: int):
    cfg = step3_config(layers)
    tensors = {}
    for name, shape in checkpoint_tensors(cfg).items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, device="cuda", dtype=torch.bfloat16)
        else:
            std = 1.0 if "embed_tokens" in name else shape[-1] ** -0.5
            tensors[name] = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * std
    return build_model(cfg, tensors)


def new_engine(model, batch: int, context: int, steps: int, graphs: bool):
    config = EngineConfig(
        kv_cache_bytes=batch * (context + steps + 64) * 1024 * model.cfg.num_hidden_layers,
        scheduler=SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=8192),
        cuda_graphs=graphs,
    )
    return local_engine(model, config)


def prompts(batch: int, context: int) -> list[list[int]]:
    rng = random.Random(batch)
    return [[rng.randrange(1000, 100000) for _ in range(context)] for _ in range(batch)]


def step_times(model, batch: int, context: int, steps: int, graphs: bool) -> list[float]:
    engine = new_engine(model, batch, context, steps, graphs)
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts(batch, context)):
        engine.add_request(f"r{i}", prompt, params)
    decoding: set[str] = set()
    while len(decoding) < batch:  # prefill, then one decode step for every bucket's capture
        decoding |= {out.request_id for out in engine.step()}
    engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    del engine
    torch.cuda.empty_cache()
    return times


def served_step_s(model, batch: int, context: int, steps: int, via: str) -> float:
    """Seconds per decode step with the engine behind its driver thread, read by C consumer
    threads (`via` "driver"), C gRPC Generate streams ("streams") or one gRPC Session
    ("session", what the gateway uses); timed while every request is decoding."""
    engine = new_engine(model, batch, context, steps, graphs=True)
    driver = EngineDriver(engine, idle_wait_s=0.01)
    driver.start()
    server = None
    if via != "driver":
        server = GrpcServer(ERROR_CODES, max_workers=2 * batch + 16)
        port = server.bind("127.0.0.1", 0)
        add_attention_service(server.server, driver)
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    times: list[list[float]] = [[] for _ in range(batch)]

    def consume(i: int, prompt: list[int]) -> None:
        if via == "streams":
            stream = AttentionClient(channel).generate(f"r{i}", prompt, params)
            counts = (len(delta.new_token_ids) for delta in stream)
        else:
            counts = (len(out.new_token_ids) for out in driver.submit(f"r{i}", prompt, params))
        for n in counts:
            times[i] += [time.perf_counter()] * n

    if via == "session":
        outgoing = [wire.session_generate(f"{i}", p, params)
                    for i, p in enumerate(prompts(batch, context))]  # fmt: skip
        remaining = batch
        for response in wire.attention_stub(channel).Session(iter(outgoing)):
            now = time.perf_counter()
            for delta in response.deltas:
                times[int(delta.request_id)] += [now] * len(delta.response.new_token_ids)
                remaining -= delta.response.finished
            if remaining == 0:
                break
    else:
        threads = [threading.Thread(target=consume, args=(i, p))
                   for i, p in enumerate(prompts(batch, context))]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    driver.stop()
    if server is not None:
        server.stop(grace_s=0.5)
    start, end = max(t[1] for t in times), min(t[-1] for t in times)  # skip each first gap
    tokens = sum(start <= x <= end for t in times for x in t)
    del engine
    torch.cuda.empty_cache()
    # No window when a request ended before the last began decoding: --steps too few.
    return (end - start) / tokens * batch if tokens else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = random_model(args.layers)
    print(f"{datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}; "
          f"{args.layers} layers at Step-3's shapes, bf16, context {args.context}\n")  # fmt: skip
    print("| batch | eager step ms | graph step ms | eager / graph | graph: tokens/s "
          "| + driver thread ms | + gRPC streams ms | + gRPC session ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for batch in args.batches:
        eager = statistics.median(step_times(model, batch, args.context, args.steps, False))
        graph = statistics.median(step_times(model, batch, args.context, args.steps, True))
        served = [served_step_s(model, batch, args.context, args.steps, via)
                  for via in ("driver", "streams", "session")]  # fmt: skip
        cells = " | ".join(f"{t * 1e3:.2f}" for t in served)
        print(f"| {batch} | {eager * 1e3:.2f} | {graph * 1e3:.2f} | {eager / graph:.2f} | "
              f"{batch / graph:.0f} | {cells} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
