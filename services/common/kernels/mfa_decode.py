"""MFA decode attention over the paged KV cache, in Triton, and its plain-torch reference.

Step-3's MFA has 64 query heads and ONE shared K/V head (head_dim 256), so a decode step is
memory-bound on reading K and V. One program takes one sequence (or one split of its context)
with all H query heads at once: the [H, D] queries stay on chip and the single K/V stream is
read from HBM exactly once, through tl.dot for q k^T and p v with an online softmax in fp32.
When the batch alone cannot fill the GPU, the context is cut into splits (flash-decoding); a
second small kernel merges the splits' partial outputs by their log-sum-exp.

FP8 KV (float8_e4m3fn with per-tensor scales) is widened to fp16 on chip (one instruction per
two values; e4m3 is exact in fp16) and multiplied in fp16; the K scale folds into the softmax
scale and the V scale into the output.

What this module does not know: which slots belong to whom (the block manager's block tables
say) or how new K/V get written (the cache does that before calling here).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from services.common.kernels.fp8 import FP8_DTYPE, FP8_MAX
from services.common.kernels.triton_jit import jit, tl, triton


@dataclass(frozen=True)
class KernelConfig:
    block_n: int  # context tokens per tile: K and V tiles are [block_n, D]
    num_warps: int
    num_stages: int  # software pipelining; K/V tiles load about (num_stages - 1) // 2 ahead
    programs_per_sm: int  # how many fit on one multiprocessor (registers, shared memory)
    # The splits' normalised partial outputs, written once and read once by the combine
    # kernel: bf16 (range of fp32, 2^-9 rounding, as the output's own) halves the 16.8 MB of
    # fp32 partials at B = 128, 4K context, two splits. benchmarks/gpu_mfa_decode.py --partials.
    partial_dtype: torch.dtype = torch.bfloat16
    # FP8 KV only: multiply in e4m3 on the tensor cores (queries quantised per head, the
    # softmax's probabilities scaled by 448 into e4m3) instead of widening K and V to fp16.
    fp8_mma: bool = False
    fp8_pv: bool = True  # with fp8_mma: p v too (else only q k^T in e4m3, v widened to fp16)
    # with fp8_pv: read V tiles as [D, BLOCK_N] so that the e4m3 product's B operand is
    # K-major in shared memory, as Hopper's 8-bit MMA requires (else the compiler transposes)
    v_transposed: bool = False


# Measured on one H200 with benchmarks/gpu_mfa_decode.py --sweep (H = 64, D = 256). One
# warpgroup holds the [64, 256] fp32 accumulator (128 registers a thread); two programs per
# multiprocessor hide each other's waits better than a deeper pipeline in one program does.
CONFIGS = {
    "16bit": KernelConfig(block_n=32, num_warps=4, num_stages=3, programs_per_sm=2),  # 96 KB
    "fp8": KernelConfig(block_n=32, num_warps=4, num_stages=7, programs_per_sm=2),  # 112 KB
}
MIN_SPLIT_TOKENS = 256  # below this a split's fixed cost (Q load, pipeline fill) dominates
MAX_SPLITS = 64
# A split's fixed cost in tokens' worth of KV: pipeline fill, plus its fp32 partial output
# (64 KB at H = 64, D = 256) written once and read once by the combine kernel.
SPLIT_OVERHEAD_TOKENS = 256
COMBINE_BLOCK_H = 16
LOG2E = 1.4426950408889634


def num_splits_for(batch: int, max_context: int, num_slots: int) -> int:
    """How many context splits keep the GPU's `num_slots` resident programs busy.

    Models a launch as waves of `num_slots` programs (multiprocessors x programs per
    multiprocessor), each streaming its split plus a fixed overhead, and takes the fewest
    splits with the shortest modelled time.
    """
    most = max(1, min(MAX_SPLITS, max_context // MIN_SPLIT_TOKENS))
    best, best_time = 1, math.inf
    for splits in range(1, most + 1):
        waves = -(-batch * splits // num_slots)
        time = waves * (-(-max_context // splits) + SPLIT_OVERHEAD_TOKENS)
        if time < best_time:
            best, best_time = splits, time
    return best


def default_num_splits(batch: int, max_context: int, kv_dtype, device) -> int:
    """The splits `mfa_decode` picks by itself, for a caller that calls it once per layer with
    the same batch (an engine step) and would rather work them out once."""
    config = CONFIGS["fp8" if kv_dtype == FP8_DTYPE else "16bit"]
    return num_splits_for(batch, max_context, _num_sms(device) * config.programs_per_sm)


@functools.cache
def _num_sms(device) -> int:
    return torch.cuda.get_device_properties(torch.device(device)).multi_processor_count


def handles(num_heads: int, head_dim: int, num_kv_heads: int, block_size: int, dtype) -> bool:
    """Whether `mfa_decode` takes a cache of this shape and model dtype (where `kernels.available`
    says the kernels run at all): one K/V head, powers of two >= 16, 16-bit queries."""
    return (
        num_kv_heads == 1
        and dtype in (torch.bfloat16, torch.float16)
        and all(_is_tile_size(n) for n in (num_heads, head_dim, block_size))
    )


def mfa_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    *,
    block_size: int = 16,
    k_scale: float | None = None,
    v_scale: float | None = None,
    num_splits: int | None = None,
    config: KernelConfig | None = None,
) -> Tensor:
    """One decode token per sequence attending over its whole paged context.

    q: [B, H, D] bf16/fp16, H query heads sharing the one K/V head.
    k_cache, v_cache: [num_slots, D] or [num_slots, 1, D], bf16/fp16, or float8_e4m3fn with
        per-tensor k_scale / v_scale (dequantised value = stored * scale);
        slot = block_id * block_size + offset.
    block_tables: [B, max_blocks_per_seq] int32 block ids; context_lens: [B] int32, each >= 1
        (positions 0 .. context_len - 1, the new token's K/V already written).
    num_splits: context splits per sequence; None picks them from B and the longest context,
        taken to be max_blocks_per_seq * block_size, so that nothing is read back to the host
        (and the call can be captured in a CUDA graph): keep block_tables no wider than the
        batch's longest sequence needs.
    config: the kernel's tile shape and pipelining; None takes the tuned one (`CONFIGS`).
    Returns [B, H, D] in q's dtype.
    """
    config = config or CONFIGS["fp8" if k_cache.dtype == FP8_DTYPE else "16bit"]
    if triton is None:
        raise RuntimeError("mfa_decode needs Triton; use mfa_decode_reference on CPU")
    batch, num_heads, head_dim = q.shape
    k_cache, v_cache = k_cache.reshape(k_cache.shape[0], -1), v_cache.reshape(v_cache.shape[0], -1)
    _check(q, k_cache, v_cache, block_tables, context_lens, block_size, k_scale, v_scale)
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    max_context = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = num_splits_for(batch, max_context, _num_sms(q.device) * config.programs_per_sm)
    # Splits are whole tiles (but the last); none starts past the longest context.
    split_len = -(-max_context // num_splits)
    split_len = -(-split_len // config.block_n) * config.block_n
    num_splits = -(-max_context // split_len)

    out = torch.empty_like(q)
    if num_splits == 1:  # the split kernel writes `out` itself and no log-sum-exp
        part, part_strides, lse, lse_strides = out, (out.stride(0), 0, out.stride(1)), out, (0, 0)
    else:
        part_shape = (batch, num_splits, num_heads, head_dim)
        part = q.new_empty(part_shape, dtype=config.partial_dtype)
        lse = q.new_empty((batch, num_splits, num_heads), dtype=torch.float32)
        part_strides, lse_strides = part.stride()[:3], lse.stride()[:2]
    _mfa_decode_split_kernel[(batch, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, part, lse,
        scale * _scale(k_scale) * LOG2E, _scale(v_scale), split_len,
        q.stride(0), q.stride(1), k_cache.stride(0), v_cache.stride(0), block_tables.stride(0),
        *part_strides, *lse_strides,
        H=num_heads, D=head_dim, PAGE=block_size, BLOCK_N=config.block_n,
        KV_FP8=k_cache.dtype == FP8_DTYPE, SINGLE_SPLIT=num_splits == 1,
        FP8_MMA=config.fp8_mma and k_cache.dtype == FP8_DTYPE, FP8_PV=config.fp8_pv,
        V_T=config.v_transposed and config.fp8_pv,
        FP8_MAX=FP8_MAX,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if num_splits > 1:
        block_h = min(COMBINE_BLOCK_H, num_heads)
        _mfa_decode_combine_kernel[(batch, num_heads // block_h)](
            part, lse, out, num_splits, *part_strides, *lse_strides, out.stride(0), out.stride(1),
            D=head_dim, BLOCK_H=block_h, SPLITS_PAD=triton.next_power_of_2(num_splits),
            num_warps=4,
        )  # fmt: skip
    return out


def _scale(scale: float | None) -> float:
    return 1.0 if scale is None else float(scale)


def _is_tile_size(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def _check(q, k_cache, v_cache, block_tables, context_lens, block_size, k_scale, v_scale):
    batch, num_heads, head_dim = q.shape
    if not all(_is_tile_size(n) for n in (num_heads, head_dim, block_size)):
        raise ValueError(
            f"H={num_heads}, D={head_dim} and block_size={block_size} must be powers of two >= 16"
        )
    if k_cache.shape[1] != head_dim or v_cache.shape[1] != head_dim:
        raise ValueError(f"K/V caches {tuple(k_cache.shape)} hold one head of D={head_dim}")
    if q.stride(2) != 1 or k_cache.stride(1) != 1 or v_cache.stride(1) != 1:
        raise ValueError("q, k_cache and v_cache must be contiguous along D")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}")
    if k_cache.dtype == FP8_DTYPE:
        if k_scale is None or v_scale is None:
            raise ValueError("float8_e4m3fn K/V need k_scale and v_scale")
    elif k_cache.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"K/V dtype {k_cache.dtype} is not bf16, fp16 or float8_e4m3fn")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("block_tables and context_lens must be int32")
    if block_tables.shape[0] != batch or context_lens.shape != (batch,):
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)} and context_lens "
            f"{tuple(context_lens.shape)} must have B={batch} rows"
        )


@jit
def _mfa_decode_split_kernel(
    q_ptr,  # [B, H, D]
    k_ptr,  # [num_slots, D]
    v_ptr,
    block_tables_ptr,  # [B, max_blocks] int32
    context_lens_ptr,  # [B] int32
    part_ptr,  # SINGLE_SPLIT: the output [B, H, D]; else partial outputs [B, S, H, D]
    lse_ptr,  # [B, S, H] fp32 log2-sum-exp2 of each split's scores; unused if SINGLE_SPLIT
    qk_scale,  # softmax scale * k_scale * log2(e): scores in log2 units
    out_scale,  # v_scale
    split_len,  # tokens per split, a multiple of BLOCK_N
    stride_qb,
    stride_qh,
    stride_k,
    stride_v,
    stride_bt,
    stride_pb,
    stride_ps,
    stride_ph,
    stride_lb,
    stride_ls,
    H: tl.constexpr,
    D: tl.constexpr,
    PAGE: tl.constexpr,  # the cache's block size
    BLOCK_N: tl.constexpr,
    KV_FP8: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    FP8_MMA: tl.constexpr,  # KV_FP8 multiplied in e4m3 (see KernelConfig.fp8_mma)
    FP8_PV: tl.constexpr,  # with FP8_MMA: p v in e4m3 too
    V_T: tl.constexpr,  # with FP8_PV: V tiles read as [D, BLOCK_N]
    FP8_MAX: tl.constexpr,  # queries and probabilities are scaled to fill e4m3's range
):
    seq = tl.program_id(0)
    split = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    start = split * split_len
    end = tl.minimum(start + split_len, context_len)

    offs_h = tl.arange(0, H)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + seq * stride_qb + offs_h[:, None] * stride_qh + offs_d[None, :])
    score_scale = tl.full([H], qk_scale, tl.float32)
    if FP8_MMA:  # one e4m3 scale per head, folded into the scores
        q = q.to(tl.float32)
        q_scale = tl.maximum(tl.max(tl.abs(q), 1), 1e-12) / FP8_MAX
        q = (q / q_scale[:, None]).to(k_ptr.dtype.element_ty)
        score_scale = score_scale * q_scale
    elif KV_FP8:
        q = q.to(tl.float16)  # [H, D]
    else:
        q = q.to(k_ptr.dtype.element_ty)

    row_max = tl.full([H], float("-inf"), tl.float32)  # of the scores so far, log2 units
    row_sum = tl.zeros([H], tl.float32)  # of exp2(score - row_max)
    acc = tl.zeros([H, D], tl.float32)
    table = block_tables_ptr + seq * stride_bt
    for tile in range(start, end, BLOCK_N):
        pos = tile + offs_n  # [BLOCK_N] context positions
        valid = pos < end
        block = tl.load(table + pos // PAGE, mask=valid, other=0)
        slot = block.to(tl.int64) * PAGE + pos % PAGE
        k = tl.load(k_ptr + slot[:, None] * stride_k + offs_d[None, :], valid[:, None], 0.0)
        if FP8_MMA and V_T:
            v_t = tl.load(v_ptr + slot[None, :] * stride_v + offs_d[:, None], valid[None, :], 0.0)
            v = tl.trans(v_t)
        else:
            v = tl.load(v_ptr + slot[:, None] * stride_v + offs_d[None, :], valid[:, None], 0.0)
        if KV_FP8 and not FP8_MMA:
            k = k.to(tl.float16)
        if KV_FP8 and not (FP8_MMA and FP8_PV):
            v = v.to(tl.float16)
        s = tl.dot(q, tl.trans(k)) * score_scale[:, None]  # [H, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))
        alpha = tl.exp2(row_max - new_max)
        p = tl.exp2(s - new_max[:, None])
        row_sum = row_sum * alpha + tl.sum(p, 1)
        if FP8_MMA and FP8_PV:  # p <= 1: scaled to e4m3's top, the scale comes off at the end
            acc = acc * alpha[:, None] + tl.dot((p * FP8_MAX).to(v.dtype), v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        row_max = new_max

    nonempty = row_sum > 0  # a split past a short sequence's end saw no tokens
    if FP8_MMA and FP8_PV:
        out_scale = out_scale / FP8_MAX
    out = acc * (out_scale / tl.where(nonempty, row_sum, 1.0))[:, None]
    part = part_ptr + seq * stride_pb + split * stride_ps
    part = part + offs_h[:, None] * stride_ph + offs_d[None, :]
    tl.store(part, out.to(part_ptr.dtype.element_ty))
    if not SINGLE_SPLIT:
        lse = tl.where(nonempty, row_max + tl.log2(row_sum), float("-inf"))
        tl.store(lse_ptr + seq * stride_lb + split * stride_ls + offs_h, lse)


@jit
def _mfa_decode_combine_kernel(
    part_ptr,  # [B, S, H, D] fp32 or 16-bit
    lse_ptr,  # [B, S, H] fp32, log2 units; -inf for an empty split
    out_ptr,  # [B, H, D]
    num_splits,
    stride_pb,
    stride_ps,
    stride_ph,
    stride_lb,
    stride_ls,
    stride_ob,
    stride_oh,
    D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, D)
    lse_base = lse_ptr + seq * stride_lb
    lse = tl.load(
        lse_base + offs_s[:, None] * stride_ls + heads[None, :],
        mask=offs_s[:, None] < num_splits,
        other=float("-inf"),
    )  # [SPLITS_PAD, BLOCK_H]
    m = tl.max(lse, 0)  # finite: split 0 always holds position 0
    denom = tl.sum(tl.exp2(lse - m[None, :]), 0)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    for split in range(num_splits):
        weight = tl.exp2(tl.load(lse_base + split * stride_ls + heads) - m) / denom
        part = part_ptr + seq * stride_pb + split * stride_ps
        part = tl.load(part + heads[:, None] * stride_ph + offs_d[None, :]).to(tl.float32)
        acc += weight[:, None] * part
    out = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty))


def mfa_decode_reference(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    *,
    block_size: int = 16,
    k_scale: float | None = None,
    v_scale: float | None = None,
) -> Tensor:
    """`mfa_decode` in plain torch, one sequence at a time, in float32 on the dequantised cache."""
    k_cache, v_cache = k_cache.reshape(k_cache.shape[0], -1), v_cache.reshape(v_cache.shape[0], -1)
    out = torch.empty_like(q)
    for b, context_len in enumerate(context_lens.tolist()):
        pos = torch.arange(context_len, device=q.device)
        slots = block_tables[b, pos // block_size].long() * block_size + pos % block_size
        k = k_cache[slots].float() * _scale(k_scale)  # [L, D]
        v = v_cache[slots].float() * _scale(v_scale)
        probs = torch.softmax(q[b].float() @ k.T * scale, dim=-1)  # [H, L]
        out[b] = (probs @ v).to(q.dtype)
    return out
