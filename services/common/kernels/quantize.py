"""The 1 x `group` e4m3 quantisation of activations for the block-FP8 GEMMs, in one launch.

Plain torch spends a launch per elementwise step (abs, amax, divide, clamp, cast) on a few
dozen decode rows; one program here quantises several 128-value groups of one token and
writes them with their float32 scales. The reference is `fp8.quantize_activation_reference`.

What this module does not know: which GEMM reads the result (`Fp8Linear`, `fp8_gemm`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from services.common.kernels.fp8 import FP8_DTYPE, FP8_MAX
from services.common.kernels.triton_jit import jit, tl, triton

QUANT_VALUES_PER_PROGRAM = 2048


def quantize_activation(x: Tensor, group: int, row_multiple: int = 1) -> tuple[Tensor, Tensor]:
    """x [T, K] -> (q [T', K] e4m3, scale [T', K / group] float32 column-major); x ~= q * scale.

    `quantize_activation_reference` in one launch: the same layout (column-major scales,
    zero rows up to `row_multiple`) and rounding.
    """
    tokens, k = x.shape
    if k % group or x.stride(-1) != 1:
        raise ValueError(f"x [{tokens}, {k}] must be contiguous in K with K % {group} == 0")
    rows = -(-tokens // row_multiple) * row_multiple
    q = torch.empty((rows, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((k // group, rows), dtype=torch.float32, device=x.device).t()
    block = triton.next_power_of_2(group)
    # Several 128-value groups per program: one group per program left most of 8192 programs'
    # threads idle (10 us for a [64, 16384] input on an H200, of which little was memory).
    groups = max(1, min(QUANT_VALUES_PER_PROGRAM // block, triton.next_power_of_2(k // group)))
    _quantize_kernel[(rows, triton.cdiv(k // group, groups))](
        x, q, scale, tokens, k // group, x.stride(0), q.stride(0), scale.stride(0),
        scale.stride(1), GROUP=group, BLOCK=block, GROUPS=groups, FP8_MAX=FP8_MAX,
        num_warps=4 if groups * block <= 2048 else 8,
    )  # fmt: skip
    return q, scale


@jit
def _quantize_kernel(
    x_ptr,  # [T, K]
    q_ptr,  # [T', K] float8e4nv, T' >= T
    scale_ptr,  # [T', K / GROUP] float32
    num_tokens,  # T: rows at and past it are padding, quantised as zeros
    num_groups,  # K / GROUP
    stride_x,
    stride_q,
    stride_st,
    stride_sg,
    GROUP: tl.constexpr,
    BLOCK: tl.constexpr,  # GROUP rounded up to a power of two
    GROUPS: tl.constexpr,  # groups per program
    FP8_MAX: tl.constexpr,
):
    token = tl.program_id(0)
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)  # [GROUPS]
    offs = tl.arange(0, BLOCK)
    mask = (offs < GROUP)[None, :] & (g < num_groups)[:, None]  # [GROUPS, BLOCK]
    cols = g[:, None] * GROUP + offs[None, :]
    x = tl.load(x_ptr + token * stride_x + cols, mask=mask & (token < num_tokens), other=0.0)
    x = x.to(tl.float32)
    amax = tl.max(tl.abs(x), 1)  # [GROUPS]
    scale = tl.where(amax > 0, amax / FP8_MAX, 1.0)
    q = tl.minimum(tl.maximum(x / scale[:, None], -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + token * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + token * stride_st + g * stride_sg, scale, mask=g < num_groups)
