"""The routed experts' grouped block-FP8 GEMM: DeepGEMM's masked kernel where it is installed
(Hopper), and its plain-torch reference.

    out[e, i] = a[e, i] @ w[e]^T   for i < counts[e], each expert e's rows padded to M

`a` [E, M, K] e4m3 with one float32 scale per 1 x 128 values of a row, `w` [E, N, K] e4m3 with
the checkpoint's 128 x 128 block scales, `out` [E, M, N] bf16; rows at or past counts[e] are
left as they were. The masked layout reads `counts` on the device and skips the padding, so
nothing is read back to the host and a step can be captured in a CUDA graph; DeepGEMM made it
for decode-time MoE, where each expert gets a few rows and the GEMM streams its weights.

DeepGEMM (`sgl-deep-gemm` on PyPI, pinned in the `gpu` extra) compiles each kernel with the
machine's nvcc the first time a shape is seen; nothing here needs it on a CPU.
What this module does not know: routing, or which expert a row belongs to.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor

from services.common.kernels.fp8 import DEFAULT_BLOCK, GROUP, dequantize_block_fp8

try:
    import deep_gemm
except (ImportError, OSError):  # a CPU install, a GPU image without it, or a torch whose ABI
    deep_gemm = None  # its extension was not built for (it loads a compiled library)


@functools.cache
def available(device: torch.device | str) -> bool:
    """Whether DeepGEMM's Hopper kernel runs on `device`: installed, a Hopper GPU, and CUDA's
    compiler at hand (`CUDA_HOME` or `nvcc` on the PATH), which it builds its kernels with."""
    device = torch.device(device)
    return (
        deep_gemm is not None
        and device.type == "cuda"
        and torch.cuda.get_device_capability(device)[0] == 9
        and _compiler() is not None
    )


def _compiler() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and Path(home, "bin", "nvcc").is_file():
        return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


def scales_like(rows: Tensor, group: int = GROUP) -> Tensor:
    """An empty float32 scale tensor for `rows` [E, M, K] as the kernel reads it: [E, M, K /
    group], M-major (each expert's scales of one column group contiguous over its rows)."""
    experts, m, k = rows.shape
    return torch.empty(experts, k // group, m, device=rows.device).transpose(1, 2)


def masked_gemm(
    a: Tensor,
    a_scale: Tensor,
    w: Tensor,
    w_scale: Tensor,
    counts: Tensor,
    expected_rows: int,
    out: Tensor,
) -> Tensor:
    """DeepGEMM's masked grouped GEMM into `out` (see the module's docstring);
    `expected_rows`, a typical count, picks its tiles."""
    deep_gemm.m_grouped_fp8_gemm_nt_masked((a, a_scale), (w, w_scale), out, counts, expected_rows)
    return out


def masked_gemm_reference(
    a: Tensor,
    a_scale: Tensor,
    w: Tensor,
    w_scale: Tensor,
    counts: Tensor,
    expected_rows: int,
    out: Tensor,
) -> Tensor:
    """`masked_gemm` in float32 on the dequantised operands."""
    experts, m, k = a.shape
    deq_a = a.float() * a_scale.repeat_interleave(GROUP, dim=-1)[..., :k]
    deq_w = dequantize_block_fp8(w, w_scale, DEFAULT_BLOCK, torch.float32)
    product = torch.bmm(deq_a, deq_w.transpose(1, 2))
    rows = torch.arange(m, device=a.device)[None, :, None] < counts[:, None, None]
    return out.copy_(torch.where(rows, product.to(out.dtype), out))
