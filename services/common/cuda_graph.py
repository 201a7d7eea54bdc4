"""Capturing a function's GPU work as a CUDA graph: what the attention side's decode steps and
the FFN side's layers share (decode_graphs.py, ffn_graphs.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def capture(
    fn: Callable[[], T], pool: tuple[int, int], mode: str = "global"
) -> tuple[torch.cuda.CUDAGraph, T]:
    """`fn`'s kernels as a graph in memory pool `pool`, and its output, which every replay
    rewrites in place. One eager run comes first, on a side stream as capture wants: it
    compiles the Triton kernels and sizes cuBLAS's workspaces (so `fn` must be safe to run
    twice: a decode step writes the same K/V again). `mode`: torch's capture_error_mode
    ("thread_local" lets other threads use CUDA meanwhile)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode=mode):
        out = fn()
    return graph, out
