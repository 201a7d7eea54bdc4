"""Timing on one GPU, shared by the GPU benchmarks: medians of CUDA-graph replays, and the
copy bandwidth every memory-bound figure is held against, measured in the same run."""

from __future__ import annotations

import torch
from triton.testing import do_bench


def median_us(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def graph_us(fn) -> float:
    """Median device time of `fn` replayed from a CUDA graph: no Python launch cost in it."""
    fn()  # compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as e:  # then the eager time, said so
        print(f"graph capture failed ({e}); timing eagerly")
        return median_us(fn)
    return median_us(graph.replay)


def copy_bandwidth() -> float:
    """Bytes read + written per second by a device-to-device copy of 2 GiB."""
    src = torch.randn(2**29, device="cuda")  # 2 GiB of float32
    dst = torch.empty_like(src)
    seconds = median_us(lambda: dst.copy_(src)) * 1e-6
    return 2 * src.numel() * src.element_size() / seconds


def matmul_peak() -> float:
    """bf16 FLOP/s of an 8192^3 matmul."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    return 2 * 8192**3 / (median_us(lambda: a @ b) * 1e-6)


def fp8_matmul_peak() -> float:
    """e4m3 FLOP/s of an 8192^3 `torch._scaled_mm` (per-tensor scales)."""
    a = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn).t()
    one = torch.ones((), device="cuda")
    seconds = median_us(lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16)) * 1e-6
    return 2 * 8192**3 / seconds
