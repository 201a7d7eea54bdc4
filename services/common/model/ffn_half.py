"""The FFN half of Step-3: a shard of every layer's feed-forward, as an FFN instance holds it.

    dense layer:  ffn(h) = mlp(h)
    MoE layer:    ffn(h) = share_expert(h) + sum_k w_k * expert_{id_k}(h)

Of N shards, shard f holds the routed experts [f * E // N, (f + 1) * E // N) and, when the
MLPs are split, intermediate columns [f * I // N, (f + 1) * I // N) of every dense MLP and
shared expert (otherwise the whole MLPs). Its output is a partial sum: over the N shards the
partials add up to the layer's feed-forward output. The whole FFN is one shard (N = 1), which
is what the reference model and the colocated engine hold.

Module names are the checkpoint's without the `model.` prefix. Which linears run in FP8, and
whether the experts run as grouped GEMMs and Triton kernels, is decided when the half is built
(`build.py`, `kernel_choice.py`); this module does not know about files or devices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from services.common.config import ModelConfig
from services.common.model.attention_half import FFNInput
from services.common.model.block_fp8_moe import BlockFp8Experts, block_expert_forward
from services.common.model.fp8_moe import Fp8Experts, fp8_grouped_expert_forward
from services.common.model.layers import SwiGLU
from services.common.model.moe import looped_expert_forward


@dataclass(frozen=True)
class ShardSpec:
    """Which part of the feed-forward a shard holds: shard `index` of `num_shards`."""

    index: int = 0
    num_shards: int = 1
    split_mlp: bool = True  # dense MLPs and shared experts: a slice of columns, or whole

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.num_shards:
            raise ValueError(f"FFN index {self.index} is outside 0..{self.num_shards - 1}")

    def range_of(self, size: int) -> tuple[int, int]:
        """This shard's contiguous, balanced part of `size` items."""
        return self.index * size // self.num_shards, (self.index + 1) * size // self.num_shards

    def mlp_range(self, size: int) -> tuple[int, int]:
        """The intermediate columns of a `size`-wide MLP this shard holds."""
        return self.range_of(size) if self.split_mlp else (0, size)


class RoutedExperts(nn.Module):
    """Stacked experts first_expert .. first_expert + E_local - 1 in the checkpoint's form:
    gate_proj, up_proj [E_local, F, H] and down_proj [E_local, H, F], wide."""

    def __init__(self, gate: Tensor, up: Tensor, down: Tensor, first_expert: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (_Stacked(w) for w in (gate, up, down))
        self.first_expert = first_expert
        self.expert_forward = looped_expert_forward  # grouped once built on a GPU (kernel_choice)

    def forward(self, x: FFNInput) -> Tensor:
        """Each token's local experts' outputs, weighted: [T, H] in h's dtype."""
        weights = (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
        return self.expert_forward(x.h, x.weights, x.ids, *weights, self.first_expert)


class _Stacked(nn.Module):
    """One projection of every local expert: `weight` (the checkpoint's name)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)


class Fp8RoutedExperts(nn.Module):
    """`RoutedExperts` in e4m3 with per-row scales: FP8 grouped GEMMs on a GPU."""

    def __init__(self, experts: Fp8Experts, first_expert: int) -> None:
        super().__init__()
        self.experts = experts
        self.first_expert = first_expert
        # the steps around the GEMMs in plain torch; Triton once built on a GPU (kernel_choice)
        self.expert_forward = fp8_grouped_expert_forward

    def forward(self, x: FFNInput) -> Tensor:
        return self.expert_forward(x.h, x.weights, x.ids, self.experts, self.first_expert)


class BlockFp8RoutedExperts(nn.Module):
    """`RoutedExperts` as the checkpoint stores them, in block FP8 (`block_fp8_moe.py`)."""

    def __init__(self, experts: BlockFp8Experts, first_expert: int, total_experts: int) -> None:
        super().__init__()
        self.experts = experts
        self.first_expert = first_expert
        self.total_experts = total_experts
        self.expert_forward = block_expert_forward  # the kernels once built on Hopper

    def forward(self, x: FFNInput) -> Tensor:
        return self.expert_forward(
            x.h, x.weights, x.ids, self.experts, self.first_expert, self.total_experts
        )


class DenseFFN(nn.Module):
    """A dense layer's feed-forward (or this shard's columns of it)."""

    def __init__(self, mlp: SwiGLU) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x: FFNInput, mlp_rows: Tensor | None = None) -> Tensor:
        return _rows(self.mlp, x.h, mlp_rows)


class MoEFFN(nn.Module):
    """A MoE layer's: the shared expert (or its columns) plus this shard's routed experts."""

    def __init__(self, share_expert: SwiGLU, moe: nn.Module) -> None:
        super().__init__()
        self.share_expert = share_expert
        self.moe = moe

    def forward(self, x: FFNInput, mlp_rows: Tensor | None = None) -> Tensor:
        return _rows(self.share_expert, x.h, mlp_rows) + self.moe(x)


def _rows(mlp: SwiGLU, h: Tensor, rows: Tensor | None) -> Tensor:
    """mlp(h) for `rows` of h (None: all of them), zeros elsewhere: [T, H]."""
    if rows is None:
        return mlp(h)
    out = torch.zeros_like(h)
    if rows.numel():
        out[rows] = mlp(h[rows]).to(h.dtype)
    return out


class FFNHalf(nn.Module):
    """Every layer's feed-forward shard: `forward(layer, x)` is this shard's partial sum."""

    def __init__(self, cfg: ModelConfig, spec: ShardSpec, layers: list[nn.Module]) -> None:
        super().__init__()
        self.cfg = cfg
        self.spec = spec
        self.layers = nn.ModuleList(layers)

    @property
    def expert_range(self) -> range:
        """The routed experts this shard holds."""
        return range(*self.spec.range_of(self.cfg.moe_num_experts))

    def forward(self, layer: int, x: FFNInput, mlp_rows: Tensor | None = None) -> Tensor:
        """x.h: [T, H] -> this shard's part of layer `layer`'s feed-forward, [T, H].

        `mlp_rows`: the rows whose dense / shared-expert work this shard does (None: all);
        routed experts always serve every row.
        """
        return self.layers[layer](x, mlp_rows)
