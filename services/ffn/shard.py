"""One FFN instance's share of every layer's feed-forward weights, and the math on it.

Of N instances, instance f holds:
- routed experts [f * E // N, (f + 1) * E // N): each expert on exactly one instance;
- in `split` layout, intermediate columns [f * I // N, (f + 1) * I // N) of every dense MLP and
  shared expert, so its output is a partial sum; in `replicated` layout, the whole MLP, run
  only for the tokens of the attention instances it serves (a % N == f).
Summed over instances, the partial outputs equal the layer's feed-forward output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from services.common.config import ModelConfig
from services.common.model.fp8_moe import Fp8Experts, fp8_grouped_expert_forward
from services.common.model.moe import expert_forward
from services.ffn.layouts import LAYOUTS, SPLIT


@dataclass(frozen=True)
class ShardSpec:
    index: int
    num_shards: int
    layout: str = SPLIT

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.num_shards:
            raise ValueError(f"FFN index {self.index} is outside 0..{self.num_shards - 1}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"FFN layout must be one of {LAYOUTS}, got {self.layout!r}")

    def range_of(self, size: int) -> tuple[int, int]:
        """This shard's contiguous, balanced part of `size` items."""
        return self.index * size // self.num_shards, (self.index + 1) * size // self.num_shards

    def serves(self, attention_index: int) -> bool:
        """In the replicated layout, whose dense and shared-expert work this instance does."""
        return attention_index % self.num_shards == self.index


@dataclass(frozen=True)
class MLPShard:
    """gate/up: [I_local, H]; down: [H, I_local]. A whole SwiGLU or a slice of its columns."""

    gate: Tensor
    up: Tensor
    down: Tensor

    def __call__(self, h: Tensor) -> Tensor:
        return (F.silu(h @ self.gate.T) * (h @ self.up.T)) @ self.down.T


@dataclass(frozen=True)
class LayerShard:
    mlp: MLPShard  # the dense MLP, or the shared expert of a MoE layer
    # Local gate, up [E_l, F, H] and down [E_l, H, F], wide or FP8; None in a dense layer.
    experts: tuple[Tensor, Tensor, Tensor] | Fp8Experts | None
    first_expert: int


# The whole checkpoint's FFN tensors, or a reader of one layer's (so that only one layer's
# whole tensors are in memory at a time: a real model's experts do not fit on one device).
FFNTensors = Mapping[str, Tensor] | Callable[[int], Mapping[str, Tensor]]


class FFNShard:
    def __init__(
        self,
        cfg: ModelConfig,
        spec: ShardSpec,
        tensors: FFNTensors,
        fp8_experts: bool = False,
    ) -> None:
        """`fp8_experts`: hold the routed experts in e4m3 with per-row scales (a GPU serving a
        block-FP8 checkpoint): half the bytes, FP8 grouped GEMMs."""
        if spec.num_shards > cfg.moe_num_experts and cfg.moe_layers:
            raise ValueError(
                f"{spec.num_shards} FFN instances for {cfg.moe_num_experts} experts: "
                "some instance would hold none; use fewer FFN instances"
            )
        self.spec = spec
        self.num_experts = cfg.moe_num_experts
        self.fp8_experts = fp8_experts
        self.layers = [
            self._layer(cfg, i, tensors(i) if callable(tensors) else tensors)
            for i in range(cfg.num_hidden_layers)
        ]

    def _layer(self, cfg: ModelConfig, layer: int, tensors: Mapping[str, Tensor]) -> LayerShard:
        p = f"model.layers.{layer}."
        mlp = p + ("share_expert." if cfg.is_moe_layer(layer) else "mlp.")
        gate, up, down = (tensors[f"{mlp}{n}_proj.weight"] for n in ("gate", "up", "down"))
        if self.spec.layout == SPLIT:
            a, b = self.spec.range_of(gate.shape[0])
            gate, up, down = gate[a:b], up[a:b], down[:, a:b]
        shard = MLPShard(gate.contiguous(), up.contiguous(), down.contiguous())
        if not cfg.is_moe_layer(layer):
            return LayerShard(shard, None, 0)
        a, b = self.spec.range_of(cfg.moe_num_experts)
        experts = tuple(
            tensors[f"{p}moe.{n}_proj.weight"][a:b].contiguous() for n in ("gate", "up", "down")
        )
        return LayerShard(shard, Fp8Experts.quantize(*experts) if self.fp8_experts else experts, a)

    @property
    def expert_range(self) -> range:
        """The routed experts this shard holds."""
        return range(*self.spec.range_of(self.num_experts))

    def forward(
        self, layer: int, h: Tensor, ids: Tensor | None, weights: Tensor | None, mlp_rows: Tensor
    ) -> Tensor:
        """This instance's partial feed-forward output for h: [n, H] -> [n, H].

        `mlp_rows` selects the rows whose dense / shared-expert work is done here (all rows
        in the split layout).
        """
        shard = self.layers[layer]
        out = torch.zeros_like(h)
        if mlp_rows.numel() == h.shape[0]:
            out += shard.mlp(h)
        elif mlp_rows.numel():
            out[mlp_rows] += shard.mlp(h[mlp_rows])
        if isinstance(shard.experts, Fp8Experts):
            out += fp8_grouped_expert_forward(h, weights, ids, shard.experts, shard.first_expert)
        elif shard.experts is not None:
            out += expert_forward(h, weights, ids, *shard.experts, first_expert=shard.first_expert)
        return out
