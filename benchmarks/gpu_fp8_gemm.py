"""The Triton split-K block-FP8 GEMM (`fp8_gemm.py`) against cuBLASLt's blockwise `_scaled_mm`
at Step-3's attention shapes and decode token counts, with a sweep of its tile choices.

For each (shape, M): cuBLASLt's time (`Fp8Linear.matmul`, bf16 out), and the Triton GEMM's
(partials + `sum_partials`, bf16 out) for every (block_n, split_k, num_stages) in the grid; the
best Triton config, its weight bandwidth against the copy bandwidth measured in the same run,
and its ratio to cuBLASLt. Times are medians of CUDA-graph replays with the L2 flushed.
Each Triton result is checked against cuBLASLt's output first (rel. error < 1e-2).

A script, not a test: `python benchmarks/gpu_fp8_gemm.py [--ablation]` prints a Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triton.testing import do_bench  # noqa: E402

from benchmarks.gpu_attention_layer import cublas_matmul  # noqa: E402
from benchmarks.gpu_timing import copy_bandwidth, graph_us  # noqa: E402
from services.common.kernels.fp8 import quantize_block_fp8  # noqa: E402
from services.common.kernels.fp8_gemm import gemm_partials, sum_partials  # noqa: E402
from services.common.model.fp8_linear import Fp8Linear  # noqa: E402

# (name, N, K): the fused q|k|v, wq, o_proj, and q_proj / k_proj alone (the unfused path).
SHAPES = [
    ("qkv 7168->2560", 2560, 7168),
    ("wq 2048->16384", 16384, 2048),
    ("o_proj 16384->7168", 7168, 16384),
    ("q_proj 7168->2048", 2048, 7168),
    ("k_proj 7168->256", 256, 7168),
]
TOKENS = [16, 64, 128]
GRID = dict(
    block_n=(64, 128),
    split_k=(1, 2, 3, 4, 6, 8, 12),
    num_stages=(3, 4),
    tma=(False, True),
)
# What each kernel choice is worth, at one M: TMA, pipeline depth, warp specialisation.
ABLATION_GRID = dict(
    block_n=(64, 128),
    split_k=(2, 3, 4, 6, 8),
    num_stages=(3, 4),
    tma=(True,),
    warp_specialize=(False, True),
)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def quick_graph_us(fn) -> float:
    """`graph_us` with a shorter repeat, for the sweep; the winner is re-timed with `graph_us`."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=5, rep=40, return_mode="median") * 1e3


def triton_gemm(xq, xs, weight, scale, cfg: dict):
    def fn() -> torch.Tensor:
        return sum_partials(gemm_partials(xq, xs, weight, scale, **cfg))

    return fn


def best_config(name: str, m: int, operands: tuple, ref: torch.Tensor, grid: dict) -> tuple:
    """(us, config) of the fastest correct config in `grid`; prints every config's time."""
    best = None
    k = operands[0].shape[1]
    for values in itertools.product(*grid.values()):
        cfg = dict(zip(grid, values, strict=True))
        if cfg["split_k"] > k // 128:
            continue
        fn = triton_gemm(*operands, cfg)
        try:
            err = rel_err(fn(), ref)
            if err > 1e-2:
                print(f"{name} M={m} {cfg}: error {err:.2e}")
                continue
            us = quick_graph_us(fn)
            print(f"  {name} M={m} {values}: {us:.1f} us")
        except Exception as e:  # noqa: BLE001  (an out-of-resources config)
            print(f"{name} M={m} {cfg}: {type(e).__name__}")
            continue
        if best is None or us < best[0]:
            best = (us, cfg)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ablation", action="store_true", help="the ablation grid")
    parser.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="the first n shapes")
    args = parser.parse_args()
    torch.manual_seed(0)
    grid = ABLATION_GRID if args.ablation else GRID
    copy_bw = copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s", flush=True)
    table = [
        "| GEMM | M | cuBLASLt us | % copy | Triton us | % copy | Triton / cuBLASLt | config |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, n, k in SHAPES[: args.shapes]:
        weight, scale = quantize_block_fp8(torch.randn(n, k, device="cuda") * k**-0.5)
        linear = Fp8Linear(weight, scale, "blockwise")
        for m in args.tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, xs = linear.quantize_input(x)
            ref = cublas_matmul(linear, xq, xs)
            cublas_us = graph_us(lambda lin=linear, a=xq, s=xs: cublas_matmul(lin, a, s))
            _, cfg = best_config(name, m, (xq, xs, weight, scale), ref, grid)
            us = graph_us(triton_gemm(xq, xs, weight, scale, cfg))
            pct = [f"{100 * n * k / (t * 1e-6) / copy_bw:.0f}%" for t in (cublas_us, us)]
            table.append(
                f"| {name} | {m} | {cublas_us:.1f} | {pct[0]} | {us:.1f} | {pct[1]} | "
                f"{us / cublas_us:.2f} | {cfg} |"
            )
            print(table[-1], flush=True)
    print("\n" + "\n".join(table))


if __name__ == "__main__":
    main()
