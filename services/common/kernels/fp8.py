"""The e4m3 FP8 format (`FP8_DTYPE`, its largest value `FP8_MAX`) and every way this codebase
quantises to it, in plain torch: the one place those facts are written, and the references
the Triton kernels are tested against.

- Block FP8 weights as DeepSeek-V3 stores them: float8_e4m3fn values plus one float32
  `<name>_scale_inv` per block of the last two dims. A weight `w` of shape [..., M, N] is cut
  into `block` = (bm, bn) tiles; tile (i, j) is stored as `q = round_e4m3(w_tile / s)` with
  `s = amax(|w_tile|) / FP8_MAX`, and `scale_inv[..., i, j] = s`, so `w ~= q.float() *
  scale_inv` tile by tile. Edge tiles may be partial: the scale has shape [..., ceil(M / bm),
  ceil(N / bn)]. Leading dims (the stacked expert dim) are kept as they are.
- One scale per row (`quantize_rows_fp8`): the FP8 experts' weights.
- One scale per token (`quantize_fp8`): the activations that cross from attention to FFN,
  and the FP8 experts' inputs.
- One scale per 1 x `GROUP` values of a token (`quantize_activation_reference`): the inputs of
  the block-FP8 GEMMs (its kernel: `quantize.py`).

Kernels take `FP8_MAX` as an argument rather than writing the number again.
What this module does not know: files or tensor names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
DEFAULT_BLOCK = (128, 128)
GROUP = 128  # activation values per scale for the block-FP8 GEMMs


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """Shape of `scale_inv` for a weight of `shape` [..., M, N]: [..., ceil(M/bm), ceil(N/bn)]."""
    if len(shape) < 2:
        raise ValueError(f"block FP8 needs a weight with at least 2 dims, got shape {list(shape)}")
    *lead, m, n = shape
    return (*lead, math.ceil(m / block[0]), math.ceil(n / block[1]))


def quantize_block_fp8(
    w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise `w` [..., M, N] (any float dtype) to block FP8.

    Returns `(q, scale_inv)`: q [..., M, N] float8_e4m3fn and scale_inv
    [..., ceil(M/bm), ceil(N/bn)] float32, with `w ~= q.float() * scale_inv` per block.
    """
    bm, bn = block
    *lead, m, n = w.shape
    mb, nb = math.ceil(m / bm), math.ceil(n / bn)
    # Zero padding leaves each partial edge tile's amax unchanged.
    padded = F.pad(w.float(), (0, nb * bn - n, 0, mb * bm - m))
    tiles = padded.reshape(*lead, mb, bm, nb, bn)  # [..., Mb, bm, Nb, bn]
    amax = tiles.abs().amax(dim=(-3, -1))  # [..., Mb, Nb]
    # An all-zero tile gets scale 1 so that it quantises to zeros instead of 0/0 = NaN.
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q_tiles = (tiles / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q_tiles.reshape(*lead, mb * bm, nb * bn)[..., :m, :n].contiguous()
    return q, scale


def quantize_rows_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise `w` [..., N] to e4m3 with one float32 scale per row (over the last dim).

    Returns `(q, scale)`: q [..., N] float8_e4m3fn and scale [...], `w ~= q.float() * scale`;
    an all-zero row gets scale 1, as a zero block does.
    """
    w = w.float()
    amax = w.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (w / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dequantize_block_fp8(
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Expand block FP8 back to `dtype`.

    q [..., M, N] float8 and scale_inv [..., ceil(M/bm), ceil(N/bn)] float32 -> [..., M, N] dtype.
    The product is formed in float32 and rounded once to `dtype`.
    """
    expected = scale_shape(tuple(q.shape), block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv shape {list(scale_inv.shape)} does not fit weight shape {list(q.shape)} "
            f"with block {list(block)}: expected {list(expected)}"
        )
    if q.dim() > 2:
        # One matrix at a time: a float32 copy of a whole expert stack would be 4x its FP8 size.
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
        flat_out, flat_q = out.view(-1, *q.shape[-2:]), q.reshape(-1, *q.shape[-2:])
        flat_scale = scale_inv.reshape(-1, *scale_inv.shape[-2:])
        for i in range(flat_q.shape[0]):
            flat_out[i] = _dequantize_matrix(flat_q[i], flat_scale[i], block, dtype)
        return out
    return _dequantize_matrix(q, scale_inv, block, dtype)


def _dequantize_matrix(
    q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """q [M, N] float8, scale_inv [Mb, Nb] -> [M, N] dtype."""
    m, n = q.shape
    # Repeat each block's scale over its tile, then crop the partial edge tiles.
    scale = scale_inv.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return (q.float() * scale[:m, :n]).to(dtype)


def quantize_fp8(h: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token e4m3: h [n, H] -> (q [n, H] e4m3, scales [n] fp32) with h ~ q * scale."""
    amax = h.float().abs().amax(dim=-1).clamp(min=1e-12)  # [n]
    scales = amax / FP8_MAX
    q = (h.float() / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scales


def dequantize_fp8(q: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """q [n, H] e4m3, scales [n] -> [n, H] in `dtype`."""
    return (q.float() * scales[:, None]).to(dtype)


def quantize_activation_reference(
    x: Tensor, group: int, row_multiple: int = 1
) -> tuple[Tensor, Tensor]:
    """x [T, K] -> (q [T', K] e4m3, scale [T', K / group] float32 column-major); x ~= q * scale.

    Column-major scales (stride (1, T')) are what cuBLASLt's 1 x 128 mode reads; with
    group = K it is one scale per token, [T', 1]. T' is T rounded up to `row_multiple`; the
    extra rows are zeros with scale 1. Rounding: e4m3, nearest-even.
    """
    tokens, k = x.shape
    rows = -(-tokens // row_multiple) * row_multiple
    padding = x.new_zeros((rows - tokens, k), dtype=torch.float32)
    groups = torch.cat((x.float(), padding)).view(rows, k // group, group)  # [T', G, group]
    q, scale = quantize_rows_fp8(groups)  # one scale per group, [T', G]
    return q.view(rows, k), scale.t().contiguous().t()


def dequantize_activation(q: Tensor, scale: Tensor) -> Tensor:
    """q [T, K] e4m3, scale [T, G] -> [T, K] float32."""
    tokens, k = q.shape
    return (q.float().view(tokens, scale.shape[1], -1) * scale[..., None]).view(tokens, k)
