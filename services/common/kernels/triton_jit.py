"""Triton where it is installed (CUDA machines), and a stand-in decorator where it is not.

Modules with Triton kernels import `triton`, `tl` and `jit` from here, so they still import on
a CPU-only install: their kernels are plain functions that are never launched, and callers
check `triton is None` to take their torch path instead.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


def jit(fn):
    """triton.jit where Triton is installed; elsewhere the function unchanged."""
    return fn if triton is None else triton.jit(fn)
