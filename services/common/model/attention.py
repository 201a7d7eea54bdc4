"""Multi-Matrix Factorization Attention (MFA): a low-rank query and one shared K/V head.

    q = wq(inter_norm(q_proj(h)))   [T, 64 * 256] through a 2048-wide bottleneck
    k, v = k_proj(h), v_proj(h)     [T, 256] each: one head shared by every query head

Where keys and values live is not this module's business: the layer hands q, k, v to an
`AttentionBackend` (a contiguous causal one for the reference model, a paged KV cache for the
engine) and projects what comes back.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.bias import causal_lower_right

from services.common.config import ModelConfig
from services.common.kernels.norm_rope import rope_reference
from services.common.model.layers import RMSNorm


class AttentionBackend(Protocol):
    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q: [T, Hq, D]; k, v: [T, G, D] after RoPE -> [T, Hq, D]."""
        ...


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, q_offset: int) -> Tensor:
    """Attention of n new queries over c keys, query i sitting at position q_offset + i.

    q: [n, Hq, D]; k, v: [c, G, D] with c >= q_offset + n; each group of Hq / G query heads
    shares one K/V head. Computes in float32 (float64 stays float64). Returns [n, Hq, D].
    """
    n, num_heads, dim = q.shape
    c, groups, _ = k.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(acc).view(n, groups, num_heads // groups, dim)  # [n, G, R, D]; R = heads per group
    scores = torch.einsum("ngrd,cgd->grnc", qg, k.to(acc)) * scale  # [G, R, n, c]
    q_pos = torch.arange(q_offset, q_offset + n, device=q.device)
    visible = q_pos[:, None] >= torch.arange(c, device=q.device)[None, :]  # [n, c]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("grnc,cgd->ngrd", probs, v.to(acc))  # [n, G, R, D]
    return out.reshape(n, num_heads, dim).to(q.dtype)


def causal_attention_sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """`causal_attention` with the queries at the end of the context (q_offset = c - n), through
    PyTorch's fused SDPA kernels: no [n, c] score matrix in memory, which a long prefill on a
    GPU could not hold. The causal mask is aligned bottom-right, so a chunk of a longer prompt
    sees all the context before it.
    """
    n, num_heads, dim = q.shape
    c, groups, _ = k.shape

    def per_query_head(x: Tensor) -> Tensor:  # [c, G, D] -> [1, Hq, c, D]; a view when G = 1
        x = x.unsqueeze(2).expand(c, groups, num_heads // groups, dim)
        return x.reshape(c, num_heads, dim).transpose(0, 1).unsqueeze(0)

    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        per_query_head(k),
        per_query_head(v),
        attn_mask=causal_lower_right(n, c),
        scale=scale,
    )  # [1, Hq, n, D]
    return out.squeeze(0).transpose(0, 1)


class MFAAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_attention_groups
        self.head_dim = cfg.head_dim
        h, q, d = cfg.hidden_size, cfg.share_q_dim, cfg.head_dim
        self.q_proj = nn.Linear(h, q, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.inter_norm = RMSNorm(q, cfg.rms_norm_eps)
        self.wq = nn.Linear(q, self.num_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        self.rope = rope_reference  # the Triton kernel once built on a GPU (kernel_choice)

    def residual_forward(
        self, x: Tensor, norm: nn.Module, cos: Tensor, sin: Tensor, backend: AttentionBackend
    ) -> Tensor:
        """x + self(norm(x)): the layer's attention half. A subclass may fuse the norm into its
        first GEMM and the residual add into its last (`fp8_attention.py`)."""
        return x + self(norm(x), cos, sin, backend)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, backend: AttentionBackend) -> Tensor:
        """x: [T, H] normed hidden states; cos, sin: [T, D] -> [T, H]."""
        t = x.shape[0]
        q = self.wq(self.inter_norm(self.q_proj(x))).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)  # [T, G, D]
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)  # [T, G, D]
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        out = backend(self.layer, q, k, v)  # [T, Hq, D]
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))
