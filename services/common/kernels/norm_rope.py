"""Single-kernel Triton RMSNorm and rotate-half RoPE, beside their plain-torch references.

In decode these run on a few dozen tokens, where plain torch spends its time launching its
five or six elementwise kernels (~20-35 us a call on an H200) rather than moving bytes. Each
op here is one launch that reads its input once and writes its output once, with the same
math as the references below: float32 throughout, one cast back at the end.

- `rms_norm`: one program per row of x [..., N]; the whole row sits in registers (N up to
  `MAX_NORM_DIM`), so x is read once.
- `rope`: one program per (token, block of heads) of x [T, heads, D]; it loads the token's
  cos/sin rows once and rotates each head's two halves. `rope_qk` rotates q and k in one
  launch (MFA's 64 query heads and its one K/V head), saving decode a launch per layer.

Where autograd wants a gradient, `rms_norm` and `rope` take it from their reference
recomputed on the saved inputs, so the kernels need no backward of their own.

What this module does not know: which layer calls it. `RMSNorm` and `MFAAttention` start
with the references (the CPU path and the oracle); `model/kernel_choice.py` gives them these
kernels when the model is built on a GPU, in one of `DTYPES`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from services.common.kernels.triton_jit import jit, tl, triton

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_NORM_DIM = 16384  # a longer row would spill the registers of one program
HEADS_PER_PROGRAM = 16


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm in plain torch: float32 math (float64 stays float64), cast back to x's dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * weight.float()).to(x.dtype)


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE in plain torch: x [T, heads, D] by cos, sin [T, D] (neox layout),
    float32 math, cast back to x's dtype."""
    x32 = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    out = x32 * cos[:, None, :] + rotated * sin[:, None, :]
    return out.to(x.dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`rms_norm_reference` in one Triton launch (its gradient from the reference)."""
    return _with_reference_grad(
        partial(_rms_norm, eps=eps), partial(rms_norm_reference, eps=eps), x, weight
    )


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """`rope_reference` in one Triton launch (its gradient from the reference)."""
    return _with_reference_grad(_rope, rope_reference, x, cos, sin)


def _with_reference_grad(fast: Callable[..., Tensor], reference: Callable[..., Tensor], *inputs):
    """fast(*inputs); where autograd wants a gradient, it comes from `reference` recomputed on
    the saved inputs."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _ReferenceBackward.apply(fast, reference, *inputs)
    return fast(*inputs)


class _ReferenceBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fast, reference, *inputs):
        ctx.reference = reference
        ctx.save_for_backward(*inputs)
        return fast(*inputs)

    @staticmethod
    def backward(ctx, grad):
        needed = ctx.needs_input_grad[2:]
        inputs = [
            t.detach().requires_grad_(n) for t, n in zip(ctx.saved_tensors, needed, strict=True)
        ]
        with torch.enable_grad():
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(ctx.reference(*inputs), wanted, grad))
        return None, None, *(next(grads) if n else None for n in needed)


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [..., N] / rms(x) * weight [N], in float32, returned in x's dtype (contiguous).

    x's rows may be strided (a split of a wider tensor); its last dim must be N <= MAX_NORM_DIM.
    """
    n = x.shape[-1]
    if n > MAX_NORM_DIM:
        raise ValueError(f"rows of {n} > MAX_NORM_DIM = {MAX_NORM_DIM}")
    rows = x.reshape(-1, n)  # [T, N]; a view for 2-D x, strided or not
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if not out.numel():  # no rows: nothing to launch
        return out
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, weight.contiguous(), out, rows.stride(0), n, eps,
        BLOCK=block, num_warps=min(max(block // 512, 1), 16),
    )  # fmt: skip
    return out


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE: x [T, heads, D] by cos, sin [T, D], in float32, returned in x's dtype.

    out = x * cos + cat(-x[..., D/2:], x[..., :D/2]) * sin; D must be even. x may be strided
    in its first two dims (a view of a fused projection's output).
    """
    tokens, heads, dim = x.shape
    if dim % 2 or cos.shape != (tokens, dim) or sin.shape != (tokens, dim):
        raise ValueError(f"x {list(x.shape)} needs even D and cos, sin [{tokens}, {dim}]")
    x, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, cos, sin))
    out = torch.empty((tokens, heads, dim), dtype=x.dtype, device=x.device)
    if not out.numel():
        return out
    block_h = min(triton.next_power_of_2(heads), HEADS_PER_PROGRAM)
    block_half = triton.next_power_of_2(dim // 2)
    _rope_kernel[(tokens, triton.cdiv(heads, block_h))](
        x, cos, sin, out, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
        out.stride(0), out.stride(1), heads, dim // 2,
        BLOCK_H=block_h, BLOCK_HALF=block_half,
        num_warps=min(max(block_h * block_half // 512, 1), 8),
    )  # fmt: skip
    return out


def rope_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """`rope(q, cos, sin), rope(k, cos, sin)` in one launch: q [T, Hq, D], k [T, G, D] of one
    dtype (views of a fused projection allowed), cos, sin [T, D]."""
    tokens, q_heads, dim = q.shape
    k_heads = k.shape[1]
    if k.shape != (tokens, k_heads, dim) or q.dtype != k.dtype or dim % 2:
        raise ValueError(f"q {list(q.shape)} and k {list(k.shape)} must share T, D and dtype")
    if cos.shape != (tokens, dim) or sin.shape != (tokens, dim):
        raise ValueError(f"cos, sin must be [{tokens}, {dim}]")
    q, k, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, cos, sin))
    q_out = torch.empty((tokens, q_heads, dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((tokens, k_heads, dim), dtype=k.dtype, device=k.device)
    if not tokens:
        return q_out, k_out
    block_h = min(triton.next_power_of_2(max(q_heads, k_heads)), HEADS_PER_PROGRAM)
    block_half = triton.next_power_of_2(dim // 2)
    q_blocks = triton.cdiv(q_heads, block_h)
    _rope_qk_kernel[(tokens, q_blocks + triton.cdiv(k_heads, block_h))](
        q, k, cos, sin, q_out, k_out, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        cos.stride(0), sin.stride(0), q_heads, k_heads, dim // 2,
        Q_BLOCKS=q_blocks, BLOCK_H=block_h, BLOCK_HALF=block_half,
        num_warps=min(max(block_h * block_half // 512, 1), 8),
    )  # fmt: skip
    return q_out, k_out


@jit
def _rms_norm_kernel(
    x_ptr,  # [T, N], rows stride_x apart
    w_ptr,  # [N]
    out_ptr,  # [T, N] contiguous
    stride_x,
    n,
    eps,
    BLOCK: tl.constexpr,  # N rounded up to a power of two
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / n + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = x * rstd * w  # the reference's order: (x * rsqrt(mean + eps)) * weight
    tl.store(out_ptr + row * n + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@jit
def _rope_kernel(
    x_ptr,  # [T, heads, D], last dim contiguous
    cos_ptr,  # [T, D]
    sin_ptr,  # [T, D]
    out_ptr,  # [T, heads, D]
    stride_xt,
    stride_xh,
    stride_cos,
    stride_sin,
    stride_ot,
    stride_oh,
    heads,
    half,  # D / 2
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,  # D / 2 rounded up to a power of two
):
    token = tl.program_id(0).to(tl.int64)
    _rotate_heads(
        x_ptr, cos_ptr, sin_ptr, out_ptr, stride_xt, stride_xh, stride_cos, stride_sin,
        stride_ot, stride_oh, heads, half, token, tl.program_id(1), BLOCK_H, BLOCK_HALF,
    )  # fmt: skip


@jit
def _rope_qk_kernel(
    q_ptr,  # [T, Hq, D], last dim contiguous
    k_ptr,  # [T, G, D], last dim contiguous
    cos_ptr,
    sin_ptr,
    q_out_ptr,  # [T, Hq, D] contiguous
    k_out_ptr,  # [T, G, D] contiguous
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    stride_sin,
    q_heads,
    k_heads,
    half,
    Q_BLOCKS: tl.constexpr,  # programs along the heads of q; the ones after them take k
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    if block < Q_BLOCKS:
        _rotate_heads(
            q_ptr, cos_ptr, sin_ptr, q_out_ptr, stride_qt, stride_qh, stride_cos, stride_sin,
            q_heads * 2 * half, 2 * half, q_heads, half, token, block, BLOCK_H, BLOCK_HALF,
        )  # fmt: skip
    else:
        _rotate_heads(
            k_ptr, cos_ptr, sin_ptr, k_out_ptr, stride_kt, stride_kh, stride_cos, stride_sin,
            k_heads * 2 * half, 2 * half, k_heads, half, token, block - Q_BLOCKS, BLOCK_H,
            BLOCK_HALF,
        )  # fmt: skip


@jit
def _rotate_heads(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    stride_xt,
    stride_xh,
    stride_cos,
    stride_sin,
    stride_ot,
    stride_oh,
    heads,
    half,
    token,
    head_block,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Rotate heads head_block * BLOCK_H ... of one token."""
    h = head_block * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    d = tl.arange(0, BLOCK_HALF)  # [BLOCK_HALF]
    d_mask = d < half
    mask = (h < heads)[:, None] & d_mask[None, :]

    cos1 = tl.load(cos_ptr + token * stride_cos + d, mask=d_mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + token * stride_cos + half + d, mask=d_mask, other=0.0)
    sin1 = tl.load(sin_ptr + token * stride_sin + d, mask=d_mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + token * stride_sin + half + d, mask=d_mask, other=0.0)
    cos2, sin2 = cos2.to(tl.float32), sin2.to(tl.float32)

    x_row = x_ptr + token * stride_xt + h[:, None] * stride_xh + d[None, :]  # [BLOCK_H, HALF]
    x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + half, mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * cos1[None, :] + -x2 * sin1[None, :]
    out2 = x2 * cos2[None, :] + x1 * sin2[None, :]

    o_row = out_ptr + token * stride_ot + h[:, None] * stride_oh + d[None, :]
    tl.store(o_row, out1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o_row + half, out2.to(out_ptr.dtype.element_ty), mask=mask)
