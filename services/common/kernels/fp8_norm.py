"""RMSNorm fused with the 1 x 128 e4m3 quantisation of the FP8 GEMM it feeds: one launch.

    xq, scale = quantize_activation(rms_norm(x, weight, eps), 128)

In decode, RMSNorm and the quantisation each run on a few dozen rows and cost a launch and a
round trip through memory more than their arithmetic. One program per row holds the row in
registers, normalises it in float32, rounds it to x's dtype (as the separate norm would store
it), then writes each 128-value group as e4m3 with its float32 scale. Same outputs as the two
separate kernels, bit for bit up to the division's last ulp.

What this module does not know: which GEMM consumes the result (`Fp8Linear.matmul` takes the
pair as `quantize_input` returns it: rows padded with zeros, scales column-major).
"""

from __future__ import annotations

import torch
from torch import Tensor

from services.common.kernels.fp8 import FP8_DTYPE, FP8_MAX, GROUP, quantize_activation_reference
from services.common.kernels.norm_rope import rms_norm_reference
from services.common.kernels.triton_jit import jit, tl, triton

MAX_DIM = 16384  # a longer row would spill one program's registers


def rms_norm_quantize(
    x: Tensor, weight: Tensor, eps: float, row_multiple: int = 1
) -> tuple[Tensor, Tensor]:
    """x [T, N] (rows may be strided; N % 128 == 0, N <= MAX_DIM), weight [N] -> (q [T', N]
    e4m3, scale [T', N / 128] float32 column-major), T' = T rounded up to `row_multiple`."""
    tokens, n = x.shape
    if n % GROUP or n > MAX_DIM or x.stride(-1) != 1:
        raise ValueError(f"x {list(x.shape)}: rows must be contiguous, N % {GROUP} == 0, <= 16K")
    rows = -(-tokens // row_multiple) * row_multiple
    q = torch.empty((rows, n), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((n // GROUP, rows), dtype=torch.float32, device=x.device).t()
    block = triton.next_power_of_2(n)
    _rms_norm_quantize_kernel[(rows,)](
        x, weight, q, scale, tokens, n, x.stride(0), q.stride(0), scale.stride(0),
        scale.stride(1), eps, BLOCK=block, GROUP=GROUP, FP8_MAX=FP8_MAX,
        num_warps=min(max(block // 512, 1), 16),
    )  # fmt: skip
    return q, scale


def sum_rms_norm_quantize(
    partials: Tensor, norm_dim: int, weight: Tensor, eps: float, row_multiple: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """A split-K GEMM's partials [S, T, N] fp32 -> (y [T, N] bf16, their sum; q [T', R] e4m3;
    scale [T', R / 128] column-major), (q, scale) = `rms_norm_quantize(y[:, :R], weight, eps)`
    with R = `norm_dim`: the fused q_low | k | v projection's sum and inter_norm, one launch."""
    splits, tokens, n = partials.shape
    if norm_dim % GROUP or norm_dim > n or partials.stride(-1) != 1 or weight.numel() != norm_dim:
        raise ValueError(f"partials {list(partials.shape)}, norm over the first {norm_dim}")
    rows = -(-tokens // row_multiple) * row_multiple
    y = torch.empty((tokens, n), dtype=torch.bfloat16, device=partials.device)
    q = torch.empty((rows, norm_dim), dtype=FP8_DTYPE, device=partials.device)
    scale = torch.empty((norm_dim // GROUP, rows), dtype=torch.float32, device=y.device).t()
    block = triton.next_power_of_2(n)
    _sum_rms_norm_quantize_kernel[(rows,)](
        partials, y, weight, q, scale, tokens, n, norm_dim, partials.stride(0),
        partials.stride(1), q.stride(0), scale.stride(0), scale.stride(1), eps,
        SPLITS=splits, BLOCK=block, GROUP=GROUP, FP8_MAX=FP8_MAX,
        num_warps=min(max(block // 512, 1), 16),
    )  # fmt: skip
    return y, q, scale


def rms_norm_quantize_reference(
    x: Tensor, weight: Tensor, eps: float, row_multiple: int = 1
) -> tuple[Tensor, Tensor]:
    """The two steps in plain torch: the oracle, and the path off CUDA."""
    return quantize_activation_reference(rms_norm_reference(x, weight, eps), GROUP, row_multiple)


def sum_rms_norm_quantize_reference(
    partials: Tensor, norm_dim: int, weight: Tensor, eps: float, row_multiple: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """`sum_rms_norm_quantize` as the unfused steps: the bf16 sum, then the norm + quantisation
    of its first `norm_dim` columns."""
    y = partials.sum(0).to(torch.bfloat16)
    return y, *rms_norm_quantize_reference(y[:, :norm_dim], weight, eps, row_multiple)


@jit
def _rms_norm_quantize_kernel(
    x_ptr,  # [T, N], rows stride_x apart
    w_ptr,  # [N]
    q_ptr,  # [T', N] e4m3
    s_ptr,  # [T', N / GROUP] float32
    num_tokens,  # rows at and past it are padding: zeros with scale 1
    n,
    stride_x,
    stride_q,
    stride_st,
    stride_sg,
    eps,
    BLOCK: tl.constexpr,  # N rounded up to a power of two
    GROUP: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    real = row < num_tokens
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask & real, other=0.0)
    _norm_quantize_store(
        x, w_ptr, q_ptr, s_ptr, row, n, stride_q, stride_st, stride_sg, eps, BLOCK, GROUP,
        FP8_MAX,
    )  # fmt: skip


@jit
def _sum_rms_norm_quantize_kernel(
    p_ptr,  # [S, T, N] fp32, N contiguous
    y_ptr,  # [T, N] bf16, the sum
    w_ptr,  # [R] the norm's weight
    q_ptr,  # [T', R] e4m3
    s_ptr,  # [T', R / GROUP] float32
    num_tokens,  # rows at and past it are padding: zeros with scale 1
    n,
    norm_dim,  # R
    stride_ps,
    stride_pt,
    stride_q,
    stride_st,
    stride_sg,
    eps,
    SPLITS: tl.constexpr,  # unrolled, so that every partial's load is in flight at once
    BLOCK: tl.constexpr,  # N rounded up to a power of two
    GROUP: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    real = row < num_tokens
    acc = tl.zeros([BLOCK], tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(p_ptr + s * stride_ps + row * stride_pt + cols, (cols < n) & real, 0.0)
    y = acc.to(y_ptr.dtype.element_ty)  # the projection's output, as sum_partials rounds it
    tl.store(y_ptr + row * n + cols, y, mask=(cols < n) & real)
    x = tl.where(cols < norm_dim, y, 0.0)
    _norm_quantize_store(
        x, w_ptr, q_ptr, s_ptr, row, norm_dim, stride_q, stride_st, stride_sg, eps, BLOCK,
        GROUP, FP8_MAX,
    )  # fmt: skip


@jit
def _norm_quantize_store(
    x,  # [BLOCK] one row, zero past n
    w_ptr,
    q_ptr,
    s_ptr,
    row,
    n,
    stride_q,
    stride_st,
    stride_sg,
    eps,
    BLOCK: tl.constexpr,
    GROUP: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    """RMSNorm of one row held in registers, then its 1 x GROUP e4m3 quantisation, stored."""
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, 0) / n + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # Rounded to x's dtype first: the unfused norm stores it so before it is quantised.
    y = (x32 * rstd * w).to(x.dtype).to(tl.float32)

    groups = tl.reshape(y, (BLOCK // GROUP, GROUP))
    amax = tl.max(tl.abs(groups), 1)  # [BLOCK / GROUP]
    scale = tl.where(amax > 0, amax / FP8_MAX, 1.0)
    q = tl.minimum(tl.maximum(groups / scale[:, None], -FP8_MAX), FP8_MAX)
    q = tl.reshape(q, (BLOCK,))
    tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    g = tl.arange(0, BLOCK // GROUP)
    tl.store(s_ptr + row * stride_st + g * stride_sg, scale, mask=g < n // GROUP)
