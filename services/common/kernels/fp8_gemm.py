"""A small-M block-FP8 GEMM with split-K in Triton: decode's projections at weight-streaming speed.

    y [M, N] = sum_k  (xq[:, k-block] @ W[:, k-block]^T) * x_scale[:, k] * w_scale[n-block, k]

DeepGEMM's scheme (128 x 128 weight blocks, 1 x 128 activation groups, each 128-wide K step
multiplied in e4m3 on the tensor cores and promoted to an fp32 accumulator with its two scales)
for the decode shapes cuBLASLt handles poorly: at 64 tokens a [2560, 7168] projection has
20 output tiles of 128 rows, so cuBLASLt streams the weights from 20 of 132 SMs. Here the
K range is also split over `split_k` programs, so N / block_n x split_k programs stream
disjoint weight slices; each writes its fp32 partial [M, N] and the consumer sums the partials
(`sum_partials`, or a fused epilogue that also does the next elementwise op).

The product is computed as W x^T (weight rows are the MMA's 64/128-row side, tokens its narrow
side), so a 16-token batch wastes no tensor-core rows. Tiles come in by TMA (`_gemm_tma_kernel`,
the default); `_gemm_kernel`, the same loop with per-thread async copies, stays for comparison
(`benchmarks/gpu_fp8_gemm.py --ablation`): TMA was 2-5% faster.

Where it stands (one H200, 64 tokens): o_proj's kernel streams 117 MB in 34-36 us, 77% of the
copy bandwidth (Nsight Compute: DRAM 72% of its peak, L2 77% of its own, since every program
re-reads an x tile from L2 as large as its weight tile); the small q|k|v and wq GEMMs reach
45-60%, their programs too short to fill the pipeline. A tiled Triton loop keeps only a few K
steps in flight per program and waits for each step's MMA before scaling it; DeepGEMM's
warp-specialised pipeline (a producer warp feeding consumer warpgroups) is what would take it
further. Measured and not kept (docs/benchmarks.md): Triton's own `warp_specialize` (the flag
here; 1.3-1.6x slower on q|k|v), stream-K, the last split summing the partials, L2 prefetches
of the next GEMM's weights, programmatic dependent launch.

What this module does not know: checkpoints, layers, or when it beats cuBLASLt (`Fp8Linear`
decides from its measured rule). `gemm_reference` is the plain-torch oracle.
"""

from __future__ import annotations

import torch
from torch import Tensor

from services.common.kernels.triton_jit import jit, tl, triton

if triton is not None:
    from triton.tools.tensor_descriptor import TensorDescriptor

BLOCK_K = 128  # one activation group and one weight block per K step
# Measured on one H200 (benchmarks/gpu_fp8_gemm.py, 2026-11-29): 64-row weight tiles fetched
# by TMA were the best or within 5% of it at every decode shape; the split count is what
# varies, see `split_for`. Five stages deep (80 KB of shared memory, two programs per SM):
# Nsight Compute's kernel times at 64 tokens (benchmarks/gpu_ncu_probe.py, 2026-11-29) against
# four deep: o_proj 34.4 us (36.4), q|k|v 9.6 (9.9), wq 13.1 (13.3); three deep was slower.
BLOCK_N = 64
NUM_STAGES = 5
MAX_SPLIT_K = 8  # past it the fp32 partials cost more than the parallelism buys
# Where this kernel beat cuBLASLt's blockwise `_scaled_mm` in that sweep: deep K (the weight
# is streamed by few output tiles there) and a small output. q|k|v fused 7168 -> 2560 took
# 0.66x cuBLASLt's time at 64 tokens, 0.72x at 128; o_proj 16384 -> 7168 0.85x at 64 tokens
# but 0.98x at 128. And where the output alone has the tiles to fill the GPU (no split, bf16
# written by the GEMM itself, no sum kernel): wq 2048 -> 16384 at 64 tokens took 13.1 us in
# the kernel against cuBLASLt's 16.4 in the layer (benchmarks/gpu_layer_profile.py).
MIN_K = 4096
MAX_OUTPUTS = 64 * 7168  # M x N
MAX_UNSPLIT_M = 64


def beats_cublas(m: int, n: int, k: int, num_sms: int) -> bool:
    """Whether this kernel is the faster one for an [m, k] x [k, n] product (the rule above)."""
    deep = k >= MIN_K and m * n <= MAX_OUTPUTS
    tiles = -(-n // BLOCK_N)
    wide = m <= MAX_UNSPLIT_M and num_sms <= tiles <= 2 * num_sms  # one full wave, unsplit
    return deep or wide


def split_for(n: int, k: int, num_sms: int) -> int:
    """Split K until the programs fill about two per SM in one wave: a second, partial wave
    (e.g. 448 programs where 396 fit) cost o_proj 25% in the sweep."""
    tiles = -(-n // BLOCK_N)
    return max(1, min(MAX_SPLIT_K, 2 * num_sms // tiles, k // BLOCK_K))


def gemm_partials(
    xq: Tensor,
    x_scale: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    split_k: int,
    block_n: int = BLOCK_N,
    num_stages: int | None = None,  # NUM_STAGES
    num_warps: int = 4,
    max_block_m: int = 64,
    prefetch_scales: bool = True,
    tma: bool = True,
    warp_specialize: bool = False,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """xq [M, K] e4m3, x_scale [M, K/128] fp32 (any strides), weight [N, K] e4m3, weight_scale
    [ceil(N/128), K/128] fp32 -> partial sums [split_k, M, N] (sum over dim 0 = y), fp32 or,
    for split_k = 1, `out_dtype` (bf16: the product itself, with no sum kernel after)."""
    m, k = xq.shape
    n = weight.shape[0]
    if k % BLOCK_K or weight.shape[1] != k or 128 % block_n:
        raise ValueError(f"xq {list(xq.shape)}, weight {list(weight.shape)}, block_n {block_n}")
    num_stages = num_stages or NUM_STAGES
    num_k_blocks = k // BLOCK_K
    split_k = max(1, min(split_k, num_k_blocks))
    out_dtype = out_dtype if split_k == 1 else torch.float32
    out = torch.empty((split_k, m, n), dtype=out_dtype, device=xq.device)
    block_m = min(max(triton.next_power_of_2(m), 16), max_block_m)
    grid = (triton.cdiv(n, block_n), split_k, triton.cdiv(m, block_m))
    if tma:
        _gemm_tma_kernel[grid](
            TensorDescriptor.from_tensor(xq, [block_m, BLOCK_K]), x_scale,
            TensorDescriptor.from_tensor(weight, [block_n, BLOCK_K]), weight_scale, out,
            m, n, num_k_blocks, split_k, x_scale.stride(0), x_scale.stride(1),
            weight_scale.stride(0), weight_scale.stride(1), out.stride(0), out.stride(1),
            BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=BLOCK_K, NUM_STAGES=num_stages,
            WARP_SPECIALIZE=warp_specialize, num_warps=num_warps,
        )  # fmt: skip
        return out
    _gemm_kernel[grid](
        xq, x_scale, weight, weight_scale, out, m, n, num_k_blocks, split_k,
        xq.stride(0), x_scale.stride(0), x_scale.stride(1), weight.stride(0),
        weight_scale.stride(0), weight_scale.stride(1), out.stride(0), out.stride(1),
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=BLOCK_K, EVEN_N=n % block_n == 0,
        PREFETCH_SCALES=prefetch_scales, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def masked_grouped_gemm(
    a: Tensor,
    a_scale: Tensor,
    w: Tensor,
    w_scale: Tensor,
    counts: Tensor,
    expected_rows: int,
    out: Tensor,
    block_n: int = BLOCK_N,
    num_stages: int | None = None,
) -> Tensor:
    """The grouped product in DeepGEMM's masked layout (`grouped_gemm.masked_gemm`'s
    signature): out[e, i] = a[e, i] @ w[e]^T for i < counts[e], bf16. a [E, M, K] e4m3 with
    1 x 128 scales [E, M, K/128] (any strides), w [E, N, K] e4m3 with 128 x 128 scales
    [E, N/128, K/128]. One program per (weight tile, row tile, expert); a row tile past its
    expert's count returns at once, so each expert's weights stream once per row tile it has
    (with `expected_rows` of 128 or fewer, about once)."""
    experts, m, k = a.shape
    n = w.shape[1]
    if k % BLOCK_K or w.shape[2] != k or 128 % block_n or n % block_n:
        raise ValueError(f"a {list(a.shape)}, w {list(w.shape)}, block_n {block_n}")
    block_m = min(max(triton.next_power_of_2(expected_rows), 16), 128)
    # Row tiles of one weight tile are neighbours in launch order: a second row tile finds
    # the weights in L2 instead of streaming them again.
    grid = (triton.cdiv(m, block_m), n // block_n, experts)
    _masked_gemm_kernel[grid](
        TensorDescriptor.from_tensor(a.view(experts * m, k), [block_m, BLOCK_K]), a_scale,
        TensorDescriptor.from_tensor(w.view(experts * n, k), [block_n, BLOCK_K]), w_scale,
        out, counts, m, n, k // BLOCK_K, *a_scale.stride(), *w_scale.stride(), *out.stride(),
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=BLOCK_K,
        NUM_STAGES=num_stages or NUM_STAGES, num_warps=4,
    )  # fmt: skip
    return out


def sum_partials(partials: Tensor, residual: Tensor | None = None) -> Tensor:
    """partials [S, M, N] fp32 -> sum over S (+ residual [M, N]) as [M, N] bf16, one launch."""
    splits, m, n = partials.shape
    out = torch.empty((m, n), dtype=torch.bfloat16, device=partials.device)
    if residual is not None and (residual.shape != (m, n) or residual.stride(-1) != 1):
        raise ValueError(f"residual {list(residual.shape)} must be [{m}, {n}], rows contiguous")
    block = 1024
    _sum_partials_kernel[(m, triton.cdiv(n, block))](
        partials, out, residual if residual is not None else out, n, splits,
        partials.stride(0), partials.stride(1),
        residual.stride(0) if residual is not None else 0,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=4,
    )  # fmt: skip
    return out


def gemm_reference(xq: Tensor, x_scale: Tensor, weight: Tensor, weight_scale: Tensor) -> Tensor:
    """The same product on the dequantised operands, in float32 (float64 if the scales are):
    [M, N]."""
    m, k = xq.shape
    n = weight.shape[0]
    dtype = torch.promote_types(x_scale.dtype, torch.float32)
    x = xq.to(dtype).view(m, k // BLOCK_K, BLOCK_K) * x_scale.to(dtype)[..., None]
    rows = weight_scale.to(dtype).repeat_interleave(128, 0)[:n]  # [N, K/128]
    w = weight.to(dtype).view(n, k // BLOCK_K, BLOCK_K) * rows[..., None]
    return x.view(m, k) @ w.view(n, k).T


@jit
def _gemm_kernel(
    x_ptr,  # [M, K] e4m3, K contiguous
    xs_ptr,  # [M, K/128] fp32
    w_ptr,  # [N, K] e4m3, K contiguous
    ws_ptr,  # [ceil(N/128), K/128] fp32
    out_ptr,  # [S, M, N] fp32
    m,
    n,
    num_k_blocks,
    split_k,
    stride_xm,
    stride_xs_m,
    stride_xs_k,
    stride_wn,
    stride_ws_n,
    stride_ws_k,
    stride_os,
    stride_om,
    BLOCK_N: tl.constexpr,  # divides 128: one weight-scale row per program
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    PREFETCH_SCALES: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    # This program's K steps: an even share of the K blocks, the remainder spread over splits.
    kb_begin = split * num_k_blocks // split_k
    kb_end = (split + 1) * num_k_blocks // split_k

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < n
    m_mask = offs_m < m
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + kb_begin * BLOCK_K + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + kb_begin * BLOCK_K + offs_k[None, :]
    ws_ptrs = ws_ptr + (pid_n * BLOCK_N // 128) * stride_ws_n + kb_begin * stride_ws_k
    xs_ptrs = xs_ptr + offs_m * stride_xs_m + kb_begin * stride_xs_k

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # The scales of step i + 1 load during step i: a scale load that waits inside the step
    # would serialise every step on a memory round trip (the pipeliner covers W and x only).
    w_scale = tl.load(ws_ptrs)
    x_scale = tl.load(xs_ptrs, mask=m_mask, other=0.0)
    for kb in range(kb_begin, kb_end):
        if EVEN_N:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0)
        x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        if PREFETCH_SCALES:
            more = kb + 1 < kb_end
            next_w_scale = tl.load(ws_ptrs + stride_ws_k, mask=more, other=0.0)
            next_x_scale = tl.load(xs_ptrs + stride_xs_k, mask=m_mask & more, other=0.0)
        else:
            w_scale = tl.load(ws_ptrs)
            x_scale = tl.load(xs_ptrs, mask=m_mask, other=0.0)
        # One K block in e4m3 on the tensor cores, promoted to fp32 with both scales.
        acc += tl.dot(w, tl.trans(x)) * (w_scale * x_scale)[None, :]
        if PREFETCH_SCALES:
            w_scale, x_scale = next_w_scale, next_x_scale
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        ws_ptrs += stride_ws_k
        xs_ptrs += stride_xs_k

    o_ptrs = out_ptr + split * stride_os + offs_m[None, :] * stride_om + offs_n[:, None]
    tl.store(o_ptrs, acc, mask=n_mask[:, None] & m_mask[None, :])


@jit
def _gemm_tma_kernel(
    x_desc,  # [M, K] e4m3, blocks [BLOCK_M, BLOCK_K]
    xs_ptr,  # [M, K/128] fp32
    w_desc,  # [N, K] e4m3, blocks [BLOCK_N, BLOCK_K]
    ws_ptr,  # [ceil(N/128), K/128] fp32
    out_ptr,  # [S, M, N] fp32
    m,
    n,
    num_k_blocks,
    split_k,
    stride_xs_m,
    stride_xs_k,
    stride_ws_n,
    stride_ws_k,
    stride_os,
    stride_om,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,  # a producer warp issuing the copies, Triton's own split
):
    """`_gemm_kernel` with W and x tiles fetched by the tensor memory accelerator: one bulk
    copy per tile instead of 16-byte copies from every thread, zero-filled past the edges."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    kb_begin = split * num_k_blocks // split_k
    kb_end = (split + 1) * num_k_blocks // split_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < m
    ws_ptrs = ws_ptr + (pid_n * BLOCK_N // 128) * stride_ws_n
    xs_ptrs = xs_ptr + offs_m * stride_xs_m

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kb in tl.range(kb_begin, kb_end, num_stages=NUM_STAGES, warp_specialize=WARP_SPECIALIZE):
        w = w_desc.load([pid_n * BLOCK_N, kb * BLOCK_K])
        x = x_desc.load([pid_m * BLOCK_M, kb * BLOCK_K])
        w_scale = tl.load(ws_ptrs + kb * stride_ws_k)
        x_scale = tl.load(xs_ptrs + kb * stride_xs_k, mask=m_mask, other=0.0)
        acc += tl.dot(w, tl.trans(x)) * (w_scale * x_scale)[None, :]

    o_ptrs = out_ptr + split * stride_os + offs_m[None, :] * stride_om + offs_n[:, None]
    out = acc.to(out_ptr.dtype.element_ty)  # fp32 partials, or bf16 when unsplit
    tl.store(o_ptrs, out, mask=(offs_n < n)[:, None] & m_mask[None, :])


@jit
def _sum_partials_kernel(
    p_ptr,  # [S, M, N] fp32, N contiguous
    out_ptr,  # [M, N] bf16
    r_ptr,  # [M, N] residual, N contiguous (unused without HAS_RESIDUAL)
    n,
    splits,
    stride_ps,
    stride_pm,
    stride_rm,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(splits):
        acc += tl.load(p_ptr + s * stride_ps + row * stride_pm + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The residual stream is bf16: round the branch first, as `x + o_proj(a)` would.
        branch = acc.to(tl.bfloat16).to(tl.float32)
        acc = tl.load(r_ptr + row * stride_rm + cols, mask=mask, other=0.0).to(tl.float32) + branch
    tl.store(out_ptr + row * n + cols, acc.to(tl.bfloat16), mask=mask)


@jit
def _masked_gemm_kernel(
    a_desc,  # [E * M, K] e4m3, blocks [BLOCK_M, BLOCK_K]
    as_ptr,  # [E, M, K/128] fp32
    w_desc,  # [E * N, K] e4m3, blocks [BLOCK_N, BLOCK_K]
    ws_ptr,  # [E, N/128, K/128] fp32
    out_ptr,  # [E, M, N] bf16
    counts_ptr,  # [E] int32: rows of each expert
    m,
    n,
    num_k_blocks,
    stride_as_e,
    stride_as_m,
    stride_as_k,
    stride_ws_e,
    stride_ws_n,
    stride_ws_k,
    stride_oe,
    stride_om,
    stride_on,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """`_gemm_tma_kernel` unsplit, one expert per grid row, rows past its count skipped."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.program_id(2)
    count = tl.load(counts_ptr + expert)
    if pid_m * BLOCK_M < count:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < count
        ws_ptrs = ws_ptr + expert * stride_ws_e + (pid_n * BLOCK_N // 128) * stride_ws_n
        as_ptrs = as_ptr + expert * stride_as_e + offs_m * stride_as_m
        row_a = expert * m + pid_m * BLOCK_M
        row_w = expert * n + pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for kb in tl.range(0, num_k_blocks, num_stages=NUM_STAGES):
            w = w_desc.load([row_w, kb * BLOCK_K])
            x = a_desc.load([row_a, kb * BLOCK_K])
            w_scale = tl.load(ws_ptrs + kb * stride_ws_k)
            x_scale = tl.load(as_ptrs + kb * stride_as_k, mask=m_mask, other=0.0)
            acc += tl.dot(w, tl.trans(x)) * (w_scale * x_scale)[None, :]
        o_ptrs = out_ptr + expert * stride_oe + offs_m[None, :] * stride_om
        o_ptrs += offs_n[:, None] * stride_on
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[None, :])
