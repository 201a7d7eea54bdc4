"""The colocated engine's decode step (CUDA graphs) at Step-3's real layer shapes, for
comparing two source trees in one run.

Whatever tree is first on sys.path (run with `PYTHONPATH=<tree>`) supplies `local_engine`,
`EngineConfig`, `build_model`: the script uses only API that commit aa5a591 (the engine's
own `ModelRunner` over the whole model) and 0de451e (`ModelRunner` over the attention half
with a `LocalFFN` executor) share. The model: --layers layers at Step-3's real shapes with
random bf16 weights (`step3_config`: 4 dense layers, then MoE, the last dense; 6 layers: one
MoE layer of 48 experts x 5120, about 20 GB in all). For each B: B requests of --context
random prompt tokens each; once every request is decoding, one decode step captures the
step's graph (not timed), then --steps engine steps are timed on the host. Each step ends
in sampling, which reads the tokens back, so a step's host time is its whole cost.

Prints one line per B: label, B, median, p10, p90 and mean step ms, plus the capture step's
time and whether every timed step replayed an already captured graph.

--segments (trees from c1d6adb on): the step replays per layer and micro-batch segments
(segment_graphs.py, what a disaggregated attention instance replays between transfers) with
--micro-batches micro-batches, around the in-process FFN; against the whole-step graph and
--eager in the same run it shows what the AFD attention side's graphs save and what
replaying per segment costs.

--tiny: the tiny preset on the CPU (no graphs), only to check that the script runs
against a tree's API.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import time

import torch

from services.attention.builder import local_engine
from services.attention.engine import EngineConfig
from services.attention.scheduler import SchedulerConfig
from services.common.model.build import build_model
from services.common.model.schema import checkpoint_tensors
from services.common.presets import step3_config, tiny_config
from services.common.sampling_params import SamplingParams


def random_model(cfg, device: str, dtype: torch.dtype):
    gen = torch.Generator(device=device).manual_seed(0)
    tensors = {}
    for name, shape in checkpoint_tensors(cfg).items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, device=device, dtype=dtype)
        else:
            std = 1.0 if "embed_tokens" in name else shape[-1] ** -0.5
            t = torch.randn(shape, device=device, dtype=dtype, generator=gen)
            tensors[name] = t.mul_(std)
    return build_model(cfg, tensors)


def prompts(batch: int, context: int, vocab: int) -> list[list[int]]:
    rng = random.Random(batch)
    hi = min(100000, vocab - 1)
    lo = min(1000, hi // 2)
    return [[rng.randrange(lo, hi) for _ in range(context)] for _ in range(batch)]


def graph_state(engine) -> tuple[bool, int]:
    graphs = getattr(engine.runner, "segments", None) or getattr(engine.runner, "graphs", None)
    if graphs is None:
        return False, 0
    return bool(graphs.enabled), len(graphs.graphs)


def decoding_engine(model, batch: int, context: int, steps: int, graphs: bool, segments: int = 0):
    """The colocated engine with `batch` requests of `context` random prompt tokens, each
    decoding (at least `steps` more decode steps left to every one); the seconds its prefill
    took. `segments`: that many micro-batches replayed per segment (0: as `graphs` says)."""
    config = EngineConfig(
        kv_cache_bytes=batch
        * (context + steps + 64 + batch * context // 8000)
        * kv_bytes_per_token(model),
        scheduler=SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=8192),
        cuda_graphs=graphs and not segments,
    )
    if segments:
        engine = local_engine(model, config, num_micro_batches=segments)
        engine.runner.use_graphs(batch, context + steps + 64, whole_steps=False)
    else:
        engine = local_engine(model, config)
    # Early requests decode while later ones prefill (8192 tokens a step): room for those.
    max_tokens = steps + 16 + batch * context // 8000
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts(batch, context, model.cfg.vocab_size)):
        engine.add_request(f"r{i}", prompt, params)
    decoding: set[str] = set()
    t0 = time.perf_counter()
    while len(decoding) < batch:  # prefill (mixed with early requests' decode steps)
        decoding |= {out.request_id for out in engine.step()}
    return engine, time.perf_counter() - t0


def step_times(model, batch: int, context: int, steps: int, graphs: bool, segments: int):
    engine, prefill_s = decoding_engine(model, batch, context, steps, graphs, segments)
    sync()
    t0 = time.perf_counter()
    outs = engine.step()  # the first decode-only step: captures this bucket's graph
    capture_s = time.perf_counter() - t0
    assert len(outs) == batch, f"capture step served {len(outs)} of {batch} requests"
    before = graph_state(engine)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        outs = engine.step()
        times.append(time.perf_counter() - start)
        assert len(outs) == batch, f"a timed step served {len(outs)} of {batch} requests"
    after = graph_state(engine)
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return times, prefill_s, capture_s, before, after


def kv_bytes_per_token(model) -> int:
    """K and V of every layer (bf16 Step-3: 2 x 256 x 2 bytes = 1 KiB a layer)."""
    cfg = model.cfg
    size = torch.tensor([], dtype=next(model.parameters()).dtype).element_size()
    return 2 * cfg.num_attention_groups * cfg.head_dim * size * cfg.num_hidden_layers


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def bench_model(tiny: bool, layers: int):
    """(config, model, device name): `layers` layers at Step-3's shapes on the GPU, or the
    tiny preset on the CPU (only to check that a script runs against a tree's API)."""
    if tiny:
        cfg = dataclasses.replace(tiny_config(), vocab_size=512, eos_token_ids=(511,))
        model, device = random_model(cfg, "cpu", torch.float32), "cpu"
    else:
        cfg = step3_config(layers)
        model = random_model(cfg, "cuda", torch.bfloat16)
        device = torch.cuda.get_device_name()
    sync()
    return cfg, model, device


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="tree")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eager", action="store_true", help="cuda_graphs=False")
    parser.add_argument("--segments", action="store_true", help="segment graphs (AFD's)")
    parser.add_argument("--micro-batches", type=int, default=1, help="with --segments")
    parser.add_argument("--tiny", action="store_true", help="tiny preset on the CPU")
    args = parser.parse_args()
    torch.manual_seed(0)
    import services

    cfg, model, device = bench_model(args.tiny, args.layers)
    mem = torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    print(f"# {args.label}: services from {services.__path__[0]}; {device}; torch "
          f"{torch.__version__}; {cfg.num_hidden_layers} layers (MoE {list(cfg.moe_layers)}), "
          f"context {args.context}, {args.steps} timed steps, graphs {not args.eager}, "
          f"segments {args.micro_batches if args.segments else 0}; "
          f"weights {mem:.1f} GiB", flush=True)  # fmt: skip
    for batch in args.batches:
        times, prefill_s, capture_s, before, after = step_times(
            model, batch, args.context, args.steps, not args.eager,
            args.micro_batches if args.segments else 0,
        )  # fmt: skip
        ms = [t * 1e3 for t in times]
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        print(f"RESULT label={args.label} B={batch} median_ms={statistics.median(ms):.3f} "
              f"p10_ms={pct(ms, 0.1):.3f} p90_ms={pct(ms, 0.9):.3f} "
              f"mean_ms={statistics.fmean(ms):.3f} min_ms={min(ms):.3f} "
              f"capture_step_ms={capture_s * 1e3:.1f} prefill_s={prefill_s:.1f} "
              f"graphs(enabled,count) before={before} after={after} peak_GiB={peak:.1f}",
              flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
