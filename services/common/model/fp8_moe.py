"""Routed experts in FP8 on a GPU: grouped GEMMs over e4m3 weights.

Each expert's weights carry one float32 scale per output row, and each token's activations
are quantised to e4m3 with one scale per token (`kernels.fp8.quantize_fp8`), the two scaling
modes `torch._scaled_grouped_mm` takes on Hopper. Half the bytes of bf16 experts, which is
what a memory-bound MoE layer costs. A block-FP8 checkpoint's 128 x 128 scales do not fit that
mode: its experts are requantised once, at load, to rows (`Fp8Experts.quantize` on the
dequantised weights), which adds about as much error as the block quantisation itself.
Around the GEMMs, the gather, the quantisations and the weighted sum run as Triton kernels
that skip other shards' assignment rows (`kernels/experts.py`), or as their plain-torch
references: `fp8_expert_forward_on` chooses once, when the experts are built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from services.common.kernels.experts import REFERENCE, ExpertOps, ops_for
from services.common.kernels.fp8 import quantize_rows_fp8
from services.common.model.moe import ExpertGroups


@dataclass(frozen=True)
class Fp8Experts:
    """gate, up [E, F, H] and down [E, H, F] in e4m3; their scales [E, F], [E, F], [E, H]."""

    gate: Tensor
    up: Tensor
    down: Tensor
    gate_scale: Tensor
    up_scale: Tensor
    down_scale: Tensor

    @classmethod
    def quantize(cls, gate: Tensor, up: Tensor, down: Tensor) -> Fp8Experts:
        """From wide weights, one scale per (expert, output row)."""
        (g, gs), (u, us), (d, ds) = (quantize_rows_fp8(w) for w in (gate, up, down))
        return cls(g, u, d, gs, us, ds)

    def dequantized(self) -> tuple[Tensor, Tensor, Tensor]:
        """gate, up, down in float32: what the FP8 GEMMs multiply by."""
        return tuple(
            w.float() * s[..., None]
            for w, s in ((self.gate, self.gate_scale), (self.up, self.up_scale),
                         (self.down, self.down_scale))
        )  # fmt: skip


def fp8_expert_forward_on(device: torch.device) -> Callable[..., Tensor]:
    """`fp8_grouped_expert_forward` with the steps around its GEMMs chosen once for `device`:
    the Triton kernels where they run, else their plain-torch references."""
    return partial(fp8_grouped_expert_forward, ops=ops_for(device))


def fp8_grouped_expert_forward(
    x: Tensor,
    weights: Tensor,
    ids: Tensor,
    experts: Fp8Experts,
    first_expert: int = 0,
    ops: ExpertOps = REFERENCE,
) -> Tensor:
    """The routed experts over FP8 weights (`moe.expert_forward_on`'s sum): three scaled
    grouped GEMMs, no host sync; gather, quantisations and combine from `ops`."""
    groups = ExpertGroups.of(ids, experts.gate.shape[0], first_expert)
    h, h_scale = ops.gather_quantize(x, groups)

    def gemm(a: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor) -> Tensor:
        return torch._scaled_grouped_mm(
            a, w.transpose(-2, -1), a_scale, w_scale, offs=groups.offsets,
            out_dtype=torch.bfloat16,
        )  # fmt: skip

    gate = gemm(h, h_scale, experts.gate, experts.gate_scale)
    up = gemm(h, h_scale, experts.up, experts.up_scale)
    act, act_scale = ops.silu_mul_quantize(gate, up, groups)
    y = gemm(act, act_scale, experts.down, experts.down_scale)
    return ops.combine(y, weights, groups, x.dtype)
