"""The GPU kernels (Triton), each beside the plain-torch reference that is its oracle.

One module per fused operation: `norm_rope` (RMSNorm, RoPE), `fp8` (the e4m3 format, its
maximum and every quantisation, in plain torch) with `quantize` (the activation quantisation
kernel), `fp8_gemm` (the split-K block-FP8 GEMM), `fp8_norm` (RMSNorm fused with the
quantisation), `experts` (the routed experts' gather, quantisation and combine), `mfa_decode`
and `kv_write` (the paged KV cache's attention and write). GPU tests compare each kernel with
its reference on fresh random inputs.

Whether a kernel runs is decided once, when a model or cache is built, from `available` and
the shapes and dtypes the kernel takes (`model/kernel_choice.py`, `KVCache`); no kernel
checks on each call whether it could have run, and every one has a plain-torch path for CPU.

What this package does not know: layers, checkpoints, or which service calls it.
"""

from __future__ import annotations

import torch

from services.common.kernels.triton_jit import triton


def available(device: torch.device | str) -> bool:
    """Whether the kernels here can run on `device`: Triton installed and `device` the current
    CUDA device (Triton launches there; each process serves one GPU)."""
    device = torch.device(device)
    return (
        triton is not None
        and device.type == "cuda"
        and (device.index is None or device.index == torch.cuda.current_device())
    )
