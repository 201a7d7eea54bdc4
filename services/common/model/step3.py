"""The Step-3 text model: a pre-norm decoder of MFA attention and dense or MoE feed-forward.

    x = embed(ids)
    per layer:  x = x + attn(norm(x));  x = x + ffn(norm(x))
    logits = lm_head(norm(x))

Module and parameter names are the checkpoint's (`schema.py`), so a state dict loads as is.
Dense and MoE layers are different classes, chosen at construction.
"""

from __future__ import annotations

from torch import Tensor, nn

from services.common.config import ModelConfig
from services.common.model.attention import AttentionBackend, MFAAttention
from services.common.model.layers import RMSNorm, SwiGLU, rope_cos_sin
from services.common.model.moe import MoE


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MFAAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def feed_forward(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    def attend(self, x: Tensor, cos: Tensor, sin: Tensor, backend: AttentionBackend) -> Tensor:
        """The attention half: x + attn(norm(x)). In AFD it runs on the attention side."""
        return self.self_attn.residual_forward(x, self.input_layernorm, cos, sin, backend)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, backend: AttentionBackend) -> Tensor:
        x = self.attend(x, cos, sin, backend)
        return x + self.feed_forward(self.post_attention_layernorm(x))


class DenseDecoderLayer(DecoderLayer):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def feed_forward(self, h: Tensor) -> Tensor:
        return self.mlp(h)


class MoEDecoderLayer(DecoderLayer):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        self.moe = MoE(
            cfg.hidden_size,
            cfg.moe_num_experts,
            cfg.moe_intermediate_size,
            cfg.moe_top_k,
            renormalize=cfg.norm_expert_weight,
        )
        self.share_expert = SwiGLU(cfg.hidden_size, cfg.share_expert_dim)

    def feed_forward(self, h: Tensor) -> Tensor:
        return self.share_expert(h) + self.moe(h)


def decoder_layer(cfg: ModelConfig, layer: int) -> DecoderLayer:
    return MoEDecoderLayer(cfg, layer) if cfg.is_moe_layer(layer) else DenseDecoderLayer(cfg, layer)


class Step3Model(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(decoder_layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Step3ForCausalLM(nn.Module):
    """token ids -> final hidden states -> logits. Attention storage comes from the caller."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Step3Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, token_ids: Tensor, positions: Tensor, backend: AttentionBackend) -> Tensor:
        """token_ids, positions: [T] int64 (any mix of sequences) -> normed hidden [T, H]."""
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        x = self.model.embed_tokens(token_ids)  # [T, H]
        for layer in self.model.layers:
            x = layer(x, cos, sin, backend)
        return self.model.norm(x)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden: [N, H] -> logits [N, V] in the model's dtype."""
        return self.lm_head(hidden)
