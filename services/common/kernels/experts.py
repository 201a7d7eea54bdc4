"""Triton kernels around the grouped expert GEMMs (the MoE layer's activation traffic), and
their plain-torch references.

In `ExpertGroups` order, the T*K assignment rows past the last local group belong to other
FFN shards: with 48 experts over 16 instances, 15 rows in 16. Plain torch still widened,
quantised, scaled and scattered every one of them, in float32, five to ten passes each:
about 2 ms a layer for 2048 tokens on an H200, ten times the GEMMs themselves. Each kernel
here reads the device-side count of local rows (the last group offset) and skips the rest,
with no host sync, and does its whole job in one pass:

- `gather_quantize`: rows x[tokens[r]] -> e4m3 with one scale per row (the gate/up input);
- `silu_mul_quantize`: silu(gate) * up -> e4m3 with one scale per row (the down input);
- `combine`: out[t] = sum_k w[t, k] * y[row of assignment (t, k)] over the local
  assignments, each output row written once (no atomics: the sum's order is fixed).

Rows past the count in the first two outputs are left unwritten: the GEMMs never read them.
Each has a `_reference` twin in plain torch (`fp8.quantize_fp8`'s math, in float32); the two
sets are bundled as `TRITON` and `REFERENCE` (`ExpertOps`), and `ops_for` picks one for a
device once, when the experts are built.

What this module does not know: the MoE layer. It reads the groups' tensors through the
`Groups` protocol, which `moe.ExpertGroups` satisfies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from torch.nn import functional as F

from services.common import kernels
from services.common.kernels.fp8 import FP8_DTYPE, FP8_MAX, quantize_fp8
from services.common.kernels.triton_jit import jit, tl, triton

MAX_ROW = 16384  # a longer row would spill one program's registers
COMBINE_BLOCK = 1024


class Groups(Protocol):
    """A step's expert assignments sorted by local expert (`moe.ExpertGroups`)."""

    order: Tensor  # [T*K] assignment indices (t * K + k), grouped by expert
    tokens: Tensor  # [T*K] the token of each, in that order
    offsets: Tensor  # [E_local] int32: each group's end row; the last is the local count
    valid: Tensor  # [T*K] bool, in that order: the expert is local


def gather_quantize_reference(x: Tensor, groups: Groups) -> tuple[Tensor, Tensor]:
    """`gather_quantize` in plain torch, every row quantised."""
    return quantize_fp8(x[groups.tokens])


def silu_mul_quantize_reference(gate: Tensor, up: Tensor, groups: Groups) -> tuple[Tensor, Tensor]:
    """`silu_mul_quantize` in plain torch (float32), every row quantised."""
    return quantize_fp8(F.silu(gate.float()) * up.float())


def combine_reference(y: Tensor, weights: Tensor, groups: Groups, dtype: torch.dtype) -> Tensor:
    """`combine` in plain torch: each token's expert outputs y [T*K, H] (in group order)
    summed by its routing weights [T, K], other shards' rows masked -> [T, H] in `dtype`."""
    acc = torch.promote_types(dtype, torch.float32)
    scaled = y.to(acc) * weights.flatten()[groups.order, None].to(acc)
    scaled = torch.where(groups.valid[:, None], scaled, 0.0)
    out = torch.zeros(weights.shape[0], y.shape[-1], dtype=acc, device=y.device)
    return out.index_add_(0, groups.tokens, scaled).to(dtype)


def combine_reference_at(
    y: Tensor, weights: Tensor, positions: Tensor, dtype: torch.dtype
) -> Tensor:
    """`combine_at` in plain torch, with y's row count as the limit."""
    acc = torch.promote_types(dtype, torch.float32)
    tokens, top_k = weights.shape
    valid = positions < y.shape[0]
    picked = y[positions.clamp(max=max(y.shape[0] - 1, 0))].to(acc)
    picked = torch.where(valid[:, None], picked * weights.flatten()[:, None].to(acc), 0.0)
    return picked.view(tokens, top_k, -1).sum(1).to(dtype)


def gather_quantize(x: Tensor, groups: Groups) -> tuple[Tensor, Tensor]:
    """x [T, H] -> (q [T*K, H] e4m3, scales [T*K] fp32): row r is x[groups.tokens[r]],
    quantised, for the local rows; the rest unwritten."""
    x = x.contiguous()
    return _quantize_rows(x, x, groups, groups.tokens.numel(), gather=True)


def silu_mul_quantize(gate: Tensor, up: Tensor, groups: Groups) -> tuple[Tensor, Tensor]:
    """gate, up [T*K, F] -> e4m3 silu(gate) * up with one scale per row, local rows only."""
    return _quantize_rows(gate.contiguous(), up.contiguous(), groups, gate.shape[0], gather=False)


def _quantize_rows(
    a: Tensor, b: Tensor, groups: Groups, rows: int, gather: bool
) -> tuple[Tensor, Tensor]:
    """One launch of `_quantize_rows_kernel`: gathered rows of `a`, or silu(a) * b."""
    width = a.shape[-1]
    q = torch.empty(rows, width, dtype=FP8_DTYPE, device=a.device)
    scales = torch.empty(rows, dtype=torch.float32, device=a.device)
    launch_quantize_rows(
        a, b, groups.tokens if gather else None, None, groups.offsets[-1:], q,
        scales.view(1, -1, 1), group=None, silu_mul=not gather,
    )  # fmt: skip
    return q, scales


def launch_quantize_rows(
    a: Tensor,
    b: Tensor,
    sources: Tensor | None,
    destinations: Tensor | None,
    count: Tensor,
    q: Tensor,
    scales: Tensor,
    group: int | None,
    silu_mul: bool,
) -> None:
    """For each row r < count[0] of `sources` (or of `a` itself where None): quantise a's row
    sources[r] (times silu, with b's, when `silu_mul`) into q's row d = destinations[r] (or r),
    one scale per `group` values (None: per row). `scales` is [E, R / E, groups per row], any
    strides (DeepGEMM reads them M-major): row d's scales go to scales[d // (R / E), d % (R / E)].
    The launch shared by the per-row and the 1 x 128 quantisations."""
    width = a.shape[-1]
    if width > MAX_ROW:
        raise ValueError(f"rows of {width} > MAX_ROW = {MAX_ROW}")
    rows = a.shape[0] if sources is None else sources.numel()
    if rows:
        block = triton.next_power_of_2(width)
        _quantize_rows_kernel[(rows,)](
            a, b, a if sources is None else sources, a if destinations is None else destinations,
            count, q, scales, width, a.stride(0), b.stride(0), q.stride(0),
            scales.shape[1], scales.stride(0), scales.stride(1), scales.stride(2),
            GATHER=sources is not None, SCATTER=destinations is not None, SILU_MUL=silu_mul,
            BLOCK=block, GROUP=group or block, FP8_MAX=FP8_MAX, num_warps=8,
        )  # fmt: skip


def combine(y: Tensor, weights: Tensor, groups: Groups, dtype: torch.dtype) -> Tensor:
    """y [T*K, H] in group order -> [T, H]: each token's local expert outputs, weighted."""
    # Where each assignment (t, k) sits in group order: the inverse of the sort.
    positions = torch.empty_like(groups.order)
    positions[groups.order] = torch.arange(groups.order.numel(), device=y.device)
    return combine_at(y, weights, positions, groups.offsets[-1:], dtype)


def combine_at(
    y: Tensor, weights: Tensor, positions: Tensor, limit: Tensor, dtype: torch.dtype
) -> Tensor:
    """out[t] = sum over k of weights[t, k] * y[positions[t * K + k]], where that position is
    below limit[0] (others are other shards' assignments): [T, H] in `dtype`."""
    tokens, top_k = weights.shape
    width = y.shape[-1]
    out = torch.empty(tokens, width, dtype=dtype, device=y.device)
    if tokens:
        y = y.contiguous()
        grid = (tokens, triton.cdiv(width, COMBINE_BLOCK))
        _combine_kernel[grid](
            y, weights.contiguous(), positions, limit, out, width,
            y.stride(0), out.stride(0), K=top_k, BLOCK=COMBINE_BLOCK, num_warps=4,
        )  # fmt: skip
    return out


@dataclass(frozen=True)
class ExpertOps:
    """The three steps around the grouped GEMMs, in one implementation."""

    gather_quantize: Callable[[Tensor, Groups], tuple[Tensor, Tensor]]
    silu_mul_quantize: Callable[[Tensor, Tensor, Groups], tuple[Tensor, Tensor]]
    combine: Callable[[Tensor, Tensor, Groups, torch.dtype], Tensor]


TRITON = ExpertOps(gather_quantize, silu_mul_quantize, combine)
REFERENCE = ExpertOps(gather_quantize_reference, silu_mul_quantize_reference, combine_reference)


def ops_for(device: torch.device) -> ExpertOps:
    """The kernels where `kernels.available(device)`, else the plain-torch references."""
    return TRITON if kernels.available(device) else REFERENCE


@jit
def _quantize_rows_kernel(
    a_ptr,
    b_ptr,  # up when SILU_MUL, else unused
    src_ptr,  # row -> source row of a (and b), when GATHER
    dst_ptr,  # row -> destination row of q and the scales, when SCATTER
    count_ptr,  # the number of local rows
    q_ptr,
    scale_ptr,
    width,
    stride_a,
    stride_b,
    stride_q,
    rows_per_part,  # q's rows per leading index of the scales
    stride_scale_part,
    stride_scale_row,
    stride_scale_group,
    GATHER: tl.constexpr,
    SCATTER: tl.constexpr,
    SILU_MUL: tl.constexpr,
    BLOCK: tl.constexpr,  # width rounded up to a power of two
    GROUP: tl.constexpr,  # values per scale (BLOCK: one per row)
    FP8_MAX: tl.constexpr,
):
    row = tl.program_id(0)
    local = row < tl.load(count_ptr)
    if local:
        source = row
        dest = row
        if GATHER:
            source = tl.load(src_ptr + row)
        if SCATTER:
            dest = tl.load(dst_ptr + row)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        x = tl.load(a_ptr + source * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
        if SILU_MUL:
            up = tl.load(b_ptr + source * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
            x = x / (1.0 + tl.exp(-x)) * up
        x = tl.reshape(x, [BLOCK // GROUP, GROUP])
        amax = tl.maximum(tl.max(tl.abs(x), 1), 1e-12)  # [BLOCK // GROUP]
        scale = amax / FP8_MAX
        q = tl.minimum(tl.maximum(x / scale[:, None], -FP8_MAX), FP8_MAX)
        q = tl.reshape(q, [BLOCK])
        tl.store(q_ptr + dest * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
        groups = tl.arange(0, BLOCK // GROUP)
        part = dest // rows_per_part
        at = part * stride_scale_part + (dest - part * rows_per_part) * stride_scale_row
        tl.store(
            scale_ptr + at + groups * stride_scale_group,
            scale,
            mask=groups * GROUP < width,
        )


@jit
def _combine_kernel(
    y_ptr,
    w_ptr,  # [T, K] routing weights
    pos_ptr,  # [T*K] each assignment's row in y
    count_ptr,  # rows of y at or past this belong to other shards
    out_ptr,
    width,
    stride_y,
    stride_out,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    count = tl.load(count_ptr)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(K):
        pos = tl.load(pos_ptr + token * K + k)
        w = tl.load(w_ptr + token * K + k).to(tl.float32)
        y = tl.load(y_ptr + pos * stride_y + cols, mask=mask & (pos < count), other=0.0)
        acc += w * y.to(tl.float32)
    tl.store(out_ptr + token * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)
