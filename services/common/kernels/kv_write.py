"""The KV-cache write of one step's new tokens in one Triton launch: K and V together.

    k_cache[slots] = k / k_scale,  v_cache[slots] = v / v_scale    (FP8: clamped, e4m3)

`index_copy_` costs a launch per tensor in 16-bit caches and, for FP8 ones (which it cannot
copy), a widening, a division, a clamp and a cast before it: up to eight small kernels per
layer in a decode step where each moves a few hundred kilobytes. One program per new token
writes its K and V rows here, in whichever of those dtypes the cache holds.

What this module does not know: which slots are whose (the block manager's tables say) or the
scales' meaning (`KVCache` keeps them, and takes this kernel where `kernels.available`).
`write_kv_reference` is the plain-torch oracle.
"""

from __future__ import annotations

import torch
from torch import Tensor

from services.common.kernels.fp8 import FP8_DTYPE, FP8_MAX
from services.common.kernels.triton_jit import jit, tl, triton


def write_kv(
    k_cache: Tensor,
    v_cache: Tensor,
    slots: Tensor,
    k: Tensor,
    v: Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """k_cache, v_cache [S, G, D] (one layer; 16-bit or e4m3) at slots [n] int64 <- k, v
    [n, G, D] (rows may be strided, last dim contiguous), divided by the scales for e4m3."""
    n, groups, dim = k.shape
    for cache, x in ((k_cache, k), (v_cache, v)):
        if x.shape[1:] != cache.shape[1:] or x.stride(-1) != 1 or not cache.is_contiguous():
            raise ValueError(
                f"rows {list(x.shape)} (last dim contiguous) do not fit the contiguous cache "
                f"{list(cache.shape)}"
            )
    if not n:
        return
    row = groups * dim
    fp8 = k_cache.dtype == FP8_DTYPE
    _write_kv_kernel[(n,)](
        k_cache, v_cache, slots, k, v, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        float(k_scale), float(v_scale), groups, dim,
        BLOCK=triton.next_power_of_2(row), FP8=fp8, FP8_MAX=FP8_MAX,
        num_warps=4 if row <= 2048 else 8,
    )  # fmt: skip


def write_kv_reference(
    k_cache: Tensor, v_cache: Tensor, slots: Tensor, k: Tensor, v: Tensor, k_scale=1.0, v_scale=1.0
) -> None:
    """The same in plain torch: the oracle, and `KVCache.write` off the GPU."""
    for cache, x, scale in ((k_cache, k, k_scale), (v_cache, v, v_scale)):
        if cache.dtype == FP8_DTYPE:
            x = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(cache.dtype)
            cache.view(torch.uint8).index_copy_(0, slots, x.view(torch.uint8))
        else:
            cache.index_copy_(0, slots, x.to(cache.dtype))


@jit
def _write_kv_kernel(
    k_cache_ptr,  # [S, G, D] contiguous
    v_cache_ptr,
    slots_ptr,  # [n] int64
    k_ptr,  # [n, G, D], last dim contiguous
    v_ptr,
    stride_kt,
    stride_kg,
    stride_vt,
    stride_vg,
    k_scale,
    v_scale,
    groups,
    dim,
    BLOCK: tl.constexpr,  # G * D rounded up to a power of two
    FP8: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slots_ptr + token)
    offs = tl.arange(0, BLOCK)
    mask = offs < groups * dim
    g, d = offs // dim, offs % dim
    k = tl.load(k_ptr + token * stride_kt + g * stride_kg + d, mask=mask, other=0.0)
    v = tl.load(v_ptr + token * stride_vt + g * stride_vg + d, mask=mask, other=0.0)
    if FP8:
        k = tl.minimum(tl.maximum(k.to(tl.float32) / k_scale, -FP8_MAX), FP8_MAX)
        v = tl.minimum(tl.maximum(v.to(tl.float32) / v_scale, -FP8_MAX), FP8_MAX)
    row = slot * groups * dim + offs
    tl.store(k_cache_ptr + row, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + row, v.to(v_cache_ptr.dtype.element_ty), mask=mask)
