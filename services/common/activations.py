"""The bytes that cross between attention and FFN every layer, and their layout.

Attention to FFN (one message per layer, micro-batch and FFN instance), n tokens:

    activations [n, H]  in the wire dtype, or e4m3 FP8 followed by per-token scales [n] fp32
    expert ids  [n, K]  int32    \\  MoE layers only
    weights     [n, K]  fp32     /

FFN to attention: a partial output [n, H] in the return dtype. Everything is packed into one
flat uint8 buffer per message (one transfer instead of four) allocated once per micro-batch
slot and reused; `Layout` says where each part sits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from services.common.kernels.fp8 import FP8_DTYPE, dequantize_fp8, quantize_fp8


@dataclass(frozen=True)
class Layout:
    """Byte layout of one attention-to-FFN message for a layer kind."""

    hidden_size: int
    top_k: int  # 0 for dense layers: no routing travels
    dtype: torch.dtype  # activations' dtype when not FP8
    fp8: bool

    @property
    def activation_bytes_per_token(self) -> int:
        return self.hidden_size + 4 if self.fp8 else self.hidden_size * self.dtype.itemsize

    @property
    def bytes_per_token(self) -> int:
        return self.activation_bytes_per_token + self.top_k * 8

    def pack(self, out: Tensor, h: Tensor, ids: Tensor | None, weights: Tensor | None) -> Tensor:
        """Write h: [n, H] (+ ids, weights: [n, K]) into `out` (uint8); return the used view."""
        n = h.shape[0]
        parts = [*quantize_fp8(h)] if self.fp8 else [h.to(self.dtype)]
        if self.top_k:
            parts += [ids.to(torch.int32), weights.to(torch.float32)]
        view = out[: n * self.bytes_per_token]
        offset = 0
        for part in parts:
            raw = part.contiguous().view(torch.uint8).reshape(-1)
            view[offset : offset + raw.numel()].copy_(raw)
            offset += raw.numel()
        return view

    def unpack(self, buf: Tensor, n: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """buf: uint8 of n tokens -> (h [n, H] in self.dtype, ids [n, K], weights [n, K])."""
        h_dim = self.hidden_size
        if self.fp8:
            q = buf[: n * h_dim].view(FP8_DTYPE).view(n, h_dim)
            scales = buf[n * h_dim : n * (h_dim + 4)].view(torch.float32)
            h = dequantize_fp8(q, scales, self.dtype)
        else:
            h = buf[: n * h_dim * self.dtype.itemsize].view(self.dtype).view(n, h_dim)
        if not self.top_k:
            return h, None, None
        start = n * self.activation_bytes_per_token
        size = n * self.top_k * 4
        ids = buf[start : start + size].view(torch.int32).view(n, self.top_k).long()
        weights = buf[start + size : start + 2 * size].view(torch.float32).view(n, self.top_k)
        return h, ids, weights
