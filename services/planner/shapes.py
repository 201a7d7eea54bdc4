"""What one decoded token costs in elements, FLOPs and parameters, per layer, by model part.

Two attention variants, chosen when the model is read: `HeadAttention` (MHA, GQA, MQA and
Step-3's MFA: K/V heads in the cache, an optional low-rank query) and `LatentAttention`
(DeepSeek's MLA: one compressed latent per token in the cache). `FFNShape` counts dense and
MoE layers. Conventions (the paper's, STEP3.md section 3):

- a matmul of a token through a [out, in] weight is 2 x out x in FLOPs;
- attention FLOPs per context token are 4 x query heads x the dot width (QK^T and PV);
- "linear" parameters are the attention projections only: the router, norms, embedding and
  LM head are left out (the paper's figures for Step-3 and DeepSeek-V3 match only so).
"""

from __future__ import annotations

from dataclasses import dataclass


def _positive(owner: str, **values: int | None) -> None:
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class HeadAttention:
    """MHA/GQA/MQA/MFA. q_rank: the low-rank query's width (Step-3's share_q_dim), or None."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_rank: int | None = None

    def __post_init__(self) -> None:
        _positive("attention", **self.__dict__)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"attention: num_kv_heads ({self.num_kv_heads}) must divide "
                f"num_heads ({self.num_heads})"
            )

    @property
    def kind(self) -> str:
        if self.q_rank is not None:
            return "MFA"
        return "MHA" if self.num_kv_heads == self.num_heads else "GQA"

    @property
    def kv_elements(self) -> int:
        """Cached elements per context token per layer: K and V of every K/V head."""
        return 2 * self.num_kv_heads * self.head_dim

    @property
    def flops_per_context_token(self) -> int:
        """Per decoded token, layer and context token: QK^T and PV over every query head."""
        return 4 * self.num_heads * self.head_dim

    @property
    def linear_params(self) -> int:
        """q (direct or low-rank), k, v and o projections of one layer."""
        h, q_width = self.hidden_size, self.num_heads * self.head_dim
        q = h * q_width if self.q_rank is None else h * self.q_rank + self.q_rank * q_width
        return q + 2 * h * self.num_kv_heads * self.head_dim + q_width * h


@dataclass(frozen=True)
class LatentAttention:
    """DeepSeek MLA. The cache holds the kv latent plus the shared RoPE key per token.

    FLOPs follow the paper's definition for DeepSeek-V3, 4 x heads x (latent + rope): attention
    over the absorbed 576-wide latent for both products (exactly, PV is 512 wide; the paper
    rounds it up). Linear parameters count kv_b_proj as a weight, which is the same work as the
    absorbed form (W_UK into q, W_UV after attention).
    """

    hidden_size: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    def __post_init__(self) -> None:
        _positive("attention", **self.__dict__)

    kind = "MLA"

    @property
    def kv_elements(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def flops_per_context_token(self) -> int:
        return 4 * self.num_heads * (self.kv_lora_rank + self.qk_rope_head_dim)

    @property
    def linear_params(self) -> int:
        h, heads = self.hidden_size, self.num_heads
        q_width = heads * (self.qk_nope_head_dim + self.qk_rope_head_dim)
        q = (
            h * q_width
            if self.q_lora_rank is None
            else h * self.q_lora_rank + self.q_lora_rank * q_width
        )
        kv_a = h * (self.kv_lora_rank + self.qk_rope_head_dim)
        kv_b = self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv_a + kv_b + heads * self.v_head_dim * h


@dataclass(frozen=True)
class FFNShape:
    """SwiGLU feed-forward layers (3 matrices each). shared_intermediate: all shared experts'
    width together (0: none). A dense model has num_moe_layers 0."""

    hidden_size: int
    num_dense_layers: int
    dense_intermediate: int
    num_moe_layers: int
    num_experts: int = 1
    top_k: int = 1
    expert_intermediate: int = 1
    shared_intermediate: int = 0

    def __post_init__(self) -> None:
        _positive("ffn", hidden_size=self.hidden_size, num_experts=self.num_experts)
        _positive("ffn", top_k=self.top_k, expert_intermediate=self.expert_intermediate)
        for name in ("num_dense_layers", "num_moe_layers", "shared_intermediate"):
            if getattr(self, name) < 0:
                raise ValueError(f"ffn: {name} must not be negative")
        if self.top_k > self.num_experts:
            raise ValueError(f"ffn: top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        if self.num_dense_layers and self.dense_intermediate <= 0:
            raise ValueError("ffn: dense layers need a positive dense_intermediate")

    @classmethod
    def dense(cls, hidden_size: int, num_layers: int, intermediate: int) -> FFNShape:
        return cls(hidden_size, num_layers, intermediate, 0)

    @property
    def is_moe(self) -> bool:
        return self.num_moe_layers > 0

    @property
    def dense_params(self) -> int:
        """One dense layer's parameters."""
        return 3 * self.hidden_size * self.dense_intermediate

    @property
    def expert_params(self) -> int:
        """One routed expert's parameters."""
        return 3 * self.hidden_size * self.expert_intermediate

    @property
    def shared_params(self) -> int:
        """One MoE layer's shared experts' parameters."""
        return 3 * self.hidden_size * self.shared_intermediate

    @property
    def activated_params(self) -> int:
        """Parameters one token passes through, over all layers (routed: top_k experts)."""
        moe = self.top_k * self.expert_params + self.shared_params
        return self.num_dense_layers * self.dense_params + self.num_moe_layers * moe

    @property
    def total_params(self) -> int:
        moe = self.num_experts * self.expert_params + self.shared_params
        return self.num_dense_layers * self.dense_params + self.num_moe_layers * moe

    @property
    def sparsity(self) -> float:
        """Activated over total expert parameters of a MoE layer (shared experts included)."""
        if not self.is_moe:
            return 1.0
        activated = self.top_k * self.expert_params + self.shared_params
        return activated / (self.num_experts * self.expert_params + self.shared_params)


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    attention: HeadAttention | LatentAttention
    ffn: FFNShape
    tied_embeddings: bool = False

    def __post_init__(self) -> None:
        _positive(self.name, hidden_size=self.hidden_size, num_layers=self.num_layers)
        _positive(self.name, vocab_size=self.vocab_size)
        if self.ffn.num_dense_layers + self.ffn.num_moe_layers != self.num_layers:
            raise ValueError(f"{self.name}: dense + MoE layers must equal num_layers")

    @property
    def embedding_params(self) -> int:
        """Embedding and LM head (one matrix if tied): held by the attention side."""
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
