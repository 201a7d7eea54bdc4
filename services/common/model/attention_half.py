"""The attention half of Step-3, cut where the paper cuts it: everything but the feed-forward.

    x = embed(ids)
    per layer:  x = x + attn(norm(x));  h = norm(x);  (weights, ids) = route(h)   [MoE layers]
                -> the FFN half computes ffn(h, ids, weights); the caller adds it to x
    logits = lm_head(norm(x))

On an attention instance this is all the model it holds (with the KV cache); the reference
model and the colocated engine pair it with a whole FFN half (`step3.py`). Module names are
the checkpoint's without the `model.` prefix (`schema.py`), so a state dict loads as is.
Dense and MoE layers are different classes, chosen at construction.

What this module does not know: where the feed-forward runs, or where K/V live (the
`AttentionBackend` the caller passes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from services.common.config import ModelConfig
from services.common.model.attention import AttentionBackend, MFAAttention
from services.common.model.layers import RMSNorm, rope_cos_sin
from services.common.model.moe import route


@dataclass(frozen=True)
class FFNInput:
    """What a layer hands the FFN half: what crosses from attention to FFN in AFD."""

    h: Tensor  # [T, H] post-attention-normed hidden states
    ids: Tensor | None = None  # [T, K] routed expert ids (MoE layers)
    weights: Tensor | None = None  # [T, K] float32 routing weights (MoE layers)


class Router(nn.Module):
    """Softmax top-k over the routed experts: `gate` [E, H], no bias (checkpoint: `moe.gate`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.moe_top_k
        self.renormalize = cfg.norm_expert_weight
        self.gate = nn.Linear(cfg.hidden_size, cfg.moe_num_experts, bias=False)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """h: [T, H] -> (weights [T, K] float32, expert ids [T, K])."""
        return route(self.gate(h), self.top_k, self.renormalize)


class AttentionLayer(nn.Module):
    """One decoder layer's attention half, ending at the FFN's input (a dense layer's)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MFAAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, backend: AttentionBackend
    ) -> tuple[Tensor, FFNInput]:
        """x: [T, H] residual stream -> (x + attn(norm(x)), the FFN's input)."""
        x = self.self_attn.residual_forward(x, self.input_layernorm, cos, sin, backend)
        return x, self.ffn_input(self.post_attention_layernorm(x))

    def ffn_input(self, h: Tensor) -> FFNInput:
        return FFNInput(h)


class MoEAttentionLayer(AttentionLayer):
    """A MoE layer's attention half: the router runs here, beside the attention."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        self.moe = Router(cfg)  # named as the checkpoint's `moe.gate`

    def ffn_input(self, h: Tensor) -> FFNInput:
        weights, ids = self.moe(h)
        return FFNInput(h, ids, weights)


def attention_layer(cfg: ModelConfig, layer: int) -> AttentionLayer:
    return MoEAttentionLayer(cfg, layer) if cfg.is_moe_layer(layer) else AttentionLayer(cfg, layer)


class AttentionHalf(nn.Module):
    """Embedding, every layer's attention half, the final norm and the LM head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(attention_layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The residual stream's dtype (what the FFN half returns too)."""
        return self.lm_head.weight.dtype

    def embed(self, token_ids: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """token_ids, positions: [T] -> (x [T, H], cos [T, D], sin [T, D])."""
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        return self.embed_tokens(token_ids), cos, sin

    def logits(self, x: Tensor) -> Tensor:
        """x: [N, H] residual stream (not normed) -> logits [N, V] in the model's dtype."""
        return self.lm_head(self.norm(x))
