"""A colocated engine's decode step at Step-3's real shapes on one GPU: eager against CUDA
graphs, at a long context.

The engine (`local_engine`, what `afd serve --colocated` runs) holds a model of --layers
layers at Step-3's real shapes with random bf16 weights (4 dense layers, then MoE, the last
dense, as `step3_config` lays them out), B requests of --context random prompt tokens each.
Once every request is decoding, the next --steps engine steps are timed on the host, each
ending in sampling (which reads the tokens back, so a step's time is its whole cost). The
same model, the same requests: once with `cuda_graphs=False`, once with graphs (the first
decode step of each bucket captures, and is not timed).

A script, not a test: `python benchmarks/gpu_decode_step.py` prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.attention.builder import local_engine  # noqa: E402
from services.attention.engine import EngineConfig  # noqa: E402
from services.attention.scheduler import SchedulerConfig  # noqa: E402
from services.common.model.build import build_model  # noqa: E402
from services.common.model.schema import checkpoint_tensors  # noqa: E402
from services.common.presets import step3_config  # noqa: E402
from services.common.sampling_params import SamplingParams  # noqa: E402


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


def step_times(model, batch: int, context: int, steps: int, graphs: bool) -> list[float]:
    config = EngineConfig(
        kv_cache_bytes=batch * (context + steps + 64) * 1024 * model.cfg.num_hidden_layers,
        scheduler=SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=8192),
        cuda_graphs=graphs,
    )
    engine = local_engine(model, config)
    rng = random.Random(batch)
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", [rng.randrange(1000, 100000) for _ in range(context)], params)
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
    print("| batch | eager step ms | graph step ms | eager / graph | graph: per layer ms "
          "| graph: tokens/s |")  # fmt: skip
    print("|---|---|---|---|---|---|", flush=True)
    for batch in args.batches:
        eager = statistics.median(step_times(model, batch, args.context, args.steps, False))
        graph = statistics.median(step_times(model, batch, args.context, args.steps, True))
        print(f"| {batch} | {eager * 1e3:.2f} | {graph * 1e3:.2f} | {eager / graph:.2f} | "
              f"{graph * 1e3 / args.layers:.2f} | {batch / graph:.0f} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
