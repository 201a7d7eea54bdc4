"""Where the time of one Table 9 attention layer goes, kernel by kernel, before and after the
FP8 GEMM changes of 2026-11-29 (five-stage pipelines; wq on the Triton GEMM, unsplit, bf16 out).

The layer is the model's own `Fp8MFAAttention` at the paper's Table 9 setup (batch 64, 8K
context, FP8 GEMMs, bf16 paged KV; `gpu_attention_layer.py` builds it), replayed from a CUDA
graph after an L2 flush. torch.profiler records each replay's kernels: for each, its median
duration and the median gap from the previous kernel's end to its start, and the replay's span
from the first kernel's start to the last one's end. The variants are set through
`fp8_gemm`'s module constants and timed in the same run. Last, the decode kernel at B = 128, 4K
context (and B = 64, 8K) timed one call per graph replay (launch and L2 flush included, as
`gpu_mfa_decode.py` does) and ten calls per replay (back to back, as in a decode step).

A script, not a test: `python benchmarks/gpu_layer_profile.py` prints Markdown tables.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_attention_layer import (  # noqa: E402
    BATCH,
    CONTEXT,
    PAGE,
    SCALE,
    DecodeBackend,
    decode_cache,
    model_layer,
    random_checkpoint,
    rms_norm,
)
from benchmarks.gpu_mfa_decode import paged_cache  # noqa: E402
from benchmarks.gpu_timing import copy_bandwidth, median_us  # noqa: E402
from services.common.kernels import fp8_gemm  # noqa: E402
from services.common.kernels.mfa_decode import mfa_decode  # noqa: E402
from services.common.presets import step3_config  # noqa: E402

CFG = step3_config(1)
FLUSH_BYTES = 256 * 2**20


def capture(fn, calls: int = 1) -> torch.cuda.CUDAGraph:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def kernel_table(graph: torch.cuda.CUDAGraph, replays: int = 30) -> tuple[list, float]:
    """[(kernel name, median us, median gap us)] of one replay, and the median span (us)."""
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(replays):
            flush.fill_(1)
            graph.replay()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))
    kernels = sorted(
        (e for e in trace["traceEvents"] if e.get("cat") == "kernel"), key=lambda e: e["ts"]
    )
    runs, current = [], None
    for e in kernels:
        if "fill" in e["name"].lower():  # the flush starts a replay
            current = []
            runs.append(current)
        elif current is not None:
            current.append(e)
    runs = [r for r in runs if r and len(r) == len(runs[0])]
    rows = []
    for i, e in enumerate(runs[0]):
        durs = [r[i]["dur"] for r in runs]
        gaps = [r[i]["ts"] - (r[i - 1]["ts"] + r[i - 1]["dur"]) if i else 0.0 for r in runs]
        rows.append((e["name"][:60], statistics.median(durs), statistics.median(gaps)))
    spans = [r[-1]["ts"] + r[-1]["dur"] - r[0]["ts"] for r in runs]
    return rows, statistics.median(spans)


def print_kernels(title: str, rows: list, span: float) -> None:
    print(f"\n{title}: span {span:.1f} us (first kernel start to last kernel end)\n")
    print("| kernel | us | gap before, us |")
    print("|---|---|---|")
    for name, us, gap in rows:
        print(f"| `{name}` | {us:.1f} | {gap:.1f} |")
    print(f"| sum of kernels | {sum(r[1] for r in rows):.1f} | {sum(r[2] for r in rows):.1f} |")


def layer_step(ckpt: dict, cache: dict, x: torch.Tensor):
    """The model's layer, built now (so module constants set before take effect)."""
    layer = model_layer(ckpt)
    norm = rms_norm(ckpt["input_layernorm"])
    backend = DecodeBackend(cache)
    return lambda: layer.residual_forward(x, norm, cache["cos"], cache["sin"], backend)


def main() -> None:
    torch.manual_seed(0)
    copy_bw = copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s", flush=True)
    cache = decode_cache(BATCH, CONTEXT)
    ckpt = random_checkpoint()
    x = torch.randn(BATCH, CFG.hidden_size, device="cuda", dtype=torch.bfloat16)

    variants = {  # name: (fp8_gemm.NUM_STAGES, fp8_gemm.MAX_UNSPLIT_M)
        "before: GEMMs 4 stages deep, wq on cuBLASLt": (4, 0),
        "GEMMs 5 stages deep, wq on cuBLASLt": (5, 0),
        "now: GEMMs 5 stages deep, wq on the Triton GEMM (bf16 out, unsplit)": (5, 64),
    }
    outputs, summary = {}, []
    for name, (stages, unsplit_m) in variants.items():
        fp8_gemm.NUM_STAGES, fp8_gemm.MAX_UNSPLIT_M = stages, unsplit_m
        step = layer_step(ckpt, cache, x)
        outputs[name] = step().clone()
        graph = capture(step)
        us = [median_us(graph.replay) for _ in range(3)]
        rows, span = kernel_table(graph)
        print_kernels(f"layer, {name}, graph {us[0]:.1f} us", rows, span)
        summary.append((name, us, span))
    fp8_gemm.NUM_STAGES, fp8_gemm.MAX_UNSPLIT_M = 5, 64
    first = next(iter(outputs.values())).float()
    diffs = [(n, f"{(o.float() - first).abs().max().item():.2e}") for n, o in outputs.items()]
    print("\nmax |difference| of each variant's layer output from the first's:", diffs)
    print("\n| layer variant | graph us (3 timings) | kernel span us |")
    print("|---|---|---|")
    for name, us, span in summary:
        print(f"| {name} | {' / '.join(f'{u:.1f}' for u in us)} | {span:.1f} |")

    print("\n| decode kernel | calls per graph replay | us per call | % of copy |")
    print("|---|---|---|---|")
    for batch, context in ((128, 4096), (64, 8192)):
        q, k_cache, v_cache, tables, lens = paged_cache(batch, context, PAGE)
        kv_bytes = 2 * k_cache.numel() * k_cache.element_size()

        def call(q=q, k_cache=k_cache, v_cache=v_cache, tables=tables, lens=lens):
            return mfa_decode(q, k_cache, v_cache, tables, lens, SCALE, block_size=PAGE)

        for calls in (1, 10, 1, 10):
            us = median_us(capture(call, calls).replay) / calls
            pct = 100 * kv_bytes / (us * 1e-6) / copy_bw
            print(f"| B={batch}, {context} | {calls} | {us:.1f} | {pct:.0f}% |", flush=True)


if __name__ == "__main__":
    main()
