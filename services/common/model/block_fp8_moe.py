"""Routed experts in the checkpoint's own block FP8: no requantisation, a masked grouped GEMM.

A block-FP8 checkpoint stores each expert's gate, up and down projections in e4m3 with one
float32 scale per 128 x 128 block. `Fp8Experts` (fp8_moe.py) requantises them to one scale per
row, the mode `torch._scaled_grouped_mm` takes, which adds about as much error as the block
quantisation itself (6.6% against the dequantised experts). Here they stay as stored, gate and
up stacked into one [2F, H] weight per expert (one GEMM reads both), and the activations are
quantised with one scale per 1 x 128 values of a row (DeepGEMM's recipe).

The step, for T tokens routed top-K over this shard's E experts, in the masked layout (each
expert's rows padded to M = T, the most any expert can get):

    gather + quantise (1 x 128)      x [T, H]          -> [E, M, H] e4m3
    masked GEMM, gate|up             [E, M, H]         -> [E, M, 2F] bf16
    silu(gate) * up + quantise       [E, M, 2F]        -> [E, M, F] e4m3
    masked GEMM, down                [E, M, F]         -> [E, M, H] bf16
    combine (weighted, per token)    [E, M, H]         -> [T, H]

Only the rows an expert was given are touched (`counts`, on the device); nothing is read back
to the host, so a step can be captured in a CUDA graph. The buffers hold E x T rows, which is
what DeepGEMM's masked layout costs: about 47 KB per row at Step-3's shapes (0.3 GB for 3
experts at 2048 tokens).

`block_expert_forward_on` chooses the kernels once, when the experts are built: Triton around
DeepGEMM's GEMM where DeepGEMM loads (a Hopper GPU), else plain torch (the reference the
kernels are tested against). Where DeepGEMM does not load, the loader does not keep the
experts in FP8 at all (`build.fp8_weights_on`): they are requantised per row as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from services.common import kernels
from services.common.kernels import grouped_gemm
from services.common.kernels.experts import combine_at, combine_reference_at, launch_quantize_rows
from services.common.kernels.fp8 import (
    DEFAULT_BLOCK,
    FP8_DTYPE,
    GROUP,
    dequantize_block_fp8,
    quantize_activation_reference,
)
from services.common.kernels.fp8_gemm import masked_grouped_gemm
from services.common.model.moe import ExpertGroups

# Each expert's rows are padded to a multiple of DeepGEMM's largest row tile: a tile that
# straddled two experts' rows would write the first's padding over the second's output.
ROW_ALIGN = 256


@dataclass(frozen=True)
class BlockFp8Experts:
    """gate|up [E, 2F, H] and down [E, H, F] in e4m3, their 128 x 128 block scales
    [E, 2F/128, H/128] and [E, H/128, F/128] in float32: the checkpoint's, as stored."""

    gate_up: Tensor
    gate_up_scale: Tensor
    down: Tensor
    down_scale: Tensor

    @classmethod
    def stack(
        cls, gate: Tensor, gate_s: Tensor, up: Tensor, up_s: Tensor, down: Tensor, down_s: Tensor
    ) -> BlockFp8Experts:
        """From the checkpoint's three (weight, weight_scale_inv) pairs of E experts."""
        if not cls.fits(gate, down):
            raise ValueError(f"experts {list(gate.shape)} are not whole 128 x 128 blocks")
        gate_up = torch.cat([gate, up], dim=1)
        scale = torch.cat([gate_s, up_s], dim=1).float()
        return cls(gate_up, scale, down.contiguous(), down_s.float().contiguous())

    @staticmethod
    def fits(gate: Tensor, down: Tensor) -> bool:
        """Whether experts of these shapes ([E, F, H], [E, H, F]) are whole 128 x 128 blocks,
        the only shapes the grouped GEMM takes."""
        return all(n % DEFAULT_BLOCK[0] == 0 for n in (*gate.shape[1:], *down.shape[1:]))

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    def dequantized(self) -> tuple[Tensor, Tensor, Tensor]:
        """gate, up [E, F, H] and down [E, H, F] in float32."""
        gate_up = dequantize_block_fp8(
            self.gate_up, self.gate_up_scale, DEFAULT_BLOCK, torch.float32
        )
        gate, up = gate_up.chunk(2, dim=1)
        down = dequantize_block_fp8(self.down, self.down_scale, DEFAULT_BLOCK, torch.float32)
        return gate, up, down


@dataclass(frozen=True)
class MaskedSlots:
    """Where a step's local assignments sit in the masked layout: expert e's i-th row is slot
    e * capacity + i. `rows[r]` is the slot of sorted row r (`ExpertGroups` order),
    `positions[t * K + k]` the slot of assignment (t, k); both are `limit` (past every slot)
    for other shards' assignments. `counts[e]` is expert e's rows (DeepGEMM's `masked_m`)."""

    rows: Tensor
    positions: Tensor
    counts: Tensor
    limit: Tensor  # [1]: E * capacity
    capacity: int
    num_experts: int  # E

    @classmethod
    def of(cls, groups: ExpertGroups, num_experts: int, tokens: int) -> MaskedSlots:
        """`tokens`: T. Top-k picks k distinct experts, so no expert gets more than T rows."""
        assignments = groups.order.numel()
        capacity = max(1, -(-tokens // ROW_ALIGN)) * ROW_ALIGN
        ends = groups.offsets
        counts = torch.diff(ends, prepend=ends.new_zeros(1))
        sorted_rows = torch.arange(assignments, dtype=ends.dtype, device=ends.device)
        expert = torch.searchsorted(ends, sorted_rows, right=True)  # num_experts: not local
        local = expert < num_experts
        expert = expert.clamp(max=num_experts - 1).long()
        limit = num_experts * capacity
        start = (ends - counts).long()
        slot = expert * capacity + sorted_rows.long() - start[expert]
        rows = torch.where(local, slot, limit)
        positions = torch.empty_like(rows)
        positions[groups.order] = rows
        limit_t = torch.full((1,), limit, dtype=rows.dtype, device=rows.device)
        return cls(rows, positions, counts, limit_t, capacity, num_experts)


@dataclass(frozen=True)
class BlockOps:
    """The steps of `block_expert_forward` in one implementation (kernels or plain torch)."""

    gather_quantize: Callable[[Tensor, ExpertGroups, MaskedSlots], tuple[Tensor, Tensor]]
    silu_mul_quantize: Callable[[Tensor, ExpertGroups, MaskedSlots], tuple[Tensor, Tensor]]
    gemm: Callable[..., Tensor]  # grouped_gemm.masked_gemm's signature
    combine: Callable[[Tensor, Tensor, MaskedSlots, torch.dtype], Tensor]


def block_expert_forward(
    x: Tensor,
    weights: Tensor,
    ids: Tensor,
    experts: BlockFp8Experts,
    first_expert: int = 0,
    total_experts: int | None = None,
    ops: BlockOps | None = None,
) -> Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) over this shard's experts, [T, H] in
    x's dtype (see the module's docstring). `total_experts`: all shards' (for the GEMM's
    expected rows per expert)."""
    ops = ops or REFERENCE_OPS
    n = experts.num_experts
    groups = ExpertGroups.of(ids, n, first_expert)
    slots = MaskedSlots.of(groups, n, x.shape[0])
    expected = max(1, -(-ids.numel() // (total_experts or n)))
    h, h_scale = ops.gather_quantize(x, groups, slots)
    width = experts.gate_up.shape[1]
    gate_up = torch.empty(n, slots.capacity, width, dtype=torch.bfloat16, device=x.device)
    ops.gemm(h, h_scale, experts.gate_up, experts.gate_up_scale, slots.counts, expected, gate_up)
    act, act_scale = ops.silu_mul_quantize(gate_up, groups, slots)
    y = torch.empty(n, slots.capacity, experts.down.shape[1], dtype=torch.bfloat16, device=x.device)
    ops.gemm(act, act_scale, experts.down, experts.down_scale, slots.counts, expected, y)
    return ops.combine(y, weights, slots, x.dtype)


def gather_quantize(x: Tensor, groups: ExpertGroups, slots: MaskedSlots) -> tuple[Tensor, Tensor]:
    """x [T, H] -> ([E, M, H] e4m3, its 1 x 128 scales, M-major): slot rows[r] holds
    x[tokens[r]]; other slots unwritten."""
    shape = (slots.num_experts, slots.capacity, x.shape[1])
    q = torch.empty(shape, dtype=FP8_DTYPE, device=x.device)
    scales = grouped_gemm.scales_like(q)
    launch_quantize_rows(
        x.contiguous(), x, groups.tokens, slots.rows, groups.offsets[-1:], q.view(-1, x.shape[1]),
        scales, group=GROUP, silu_mul=False,
    )  # fmt: skip
    return q, scales


def silu_mul_quantize(
    gate_up: Tensor, groups: ExpertGroups, slots: MaskedSlots
) -> tuple[Tensor, Tensor]:
    """[E, M, 2F] -> ([E, M, F] e4m3 silu(gate) * up, 1 x 128 scales, M-major), local slots."""
    n, capacity, width = gate_up.shape
    flat = gate_up.view(-1, width)
    q = torch.empty(n, capacity, width // 2, dtype=FP8_DTYPE, device=gate_up.device)
    scales = grouped_gemm.scales_like(q)
    launch_quantize_rows(
        flat[:, : width // 2], flat[:, width // 2 :], slots.rows, slots.rows,
        groups.offsets[-1:], q.view(-1, width // 2), scales, group=GROUP, silu_mul=True,
    )  # fmt: skip
    return q, scales


def combine(y: Tensor, weights: Tensor, slots: MaskedSlots, dtype: torch.dtype) -> Tensor:
    """y [E, M, H] -> [T, H]: each token's local expert outputs, weighted."""
    return combine_at(y.view(-1, y.shape[-1]), weights, slots.positions, slots.limit, dtype)


def gather_quantize_reference(
    x: Tensor, groups: ExpertGroups, slots: MaskedSlots
) -> tuple[Tensor, Tensor]:
    """`gather_quantize` in plain torch; other slots zero."""
    width = x.shape[1]
    q, s = quantize_activation_reference(x[groups.tokens], GROUP)
    return _scatter(q, s, slots, width)


def silu_mul_quantize_reference(
    gate_up: Tensor, groups: ExpertGroups, slots: MaskedSlots
) -> tuple[Tensor, Tensor]:
    """`silu_mul_quantize` in plain torch (float32); other slots zero."""
    n, capacity, width = gate_up.shape
    gate, up = gate_up.view(-1, width).float().chunk(2, dim=1)
    act = torch.nn.functional.silu(gate) * up
    local = slots.rows.clamp(max=n * capacity - 1)
    q, s = quantize_activation_reference(act[local], GROUP)
    return _scatter(q, s, slots, width // 2)


def _scatter(q: Tensor, s: Tensor, slots: MaskedSlots, width: int) -> tuple[Tensor, Tensor]:
    """Sorted rows' (q, scales) -> the masked layout at `slots.rows` (past `limit`: dropped)."""
    total = slots.num_experts * slots.capacity
    out_q = torch.zeros(total + 1, width, dtype=torch.float32, device=q.device)
    out_s = torch.zeros(total + 1, width // GROUP, device=q.device)
    out_q[slots.rows] = q.float()
    out_s[slots.rows] = s
    shape = (slots.num_experts, slots.capacity)
    return out_q[:total].to(FP8_DTYPE).view(*shape, width), out_s[:total].view(*shape, -1)


def combine_reference(y: Tensor, weights: Tensor, slots: MaskedSlots, dtype: torch.dtype) -> Tensor:
    """`combine` in plain torch."""
    return combine_reference_at(y.view(-1, y.shape[-1]), weights, slots.positions, dtype)


REFERENCE_OPS = BlockOps(
    gather_quantize_reference,
    silu_mul_quantize_reference,
    grouped_gemm.masked_gemm_reference,
    combine_reference,
)
# The GEMM: DeepGEMM's. The project's own Triton kernel in the same layout
# (`fp8_gemm.masked_grouped_gemm`) is there to be measured beside it (tests/gpu,
# benchmarks/gpu_deep_gemm.py); it is not chosen by itself until it has run on a GPU.
DEEP_GEMM_OPS = BlockOps(gather_quantize, silu_mul_quantize, grouped_gemm.masked_gemm, combine)
TRITON_OPS = BlockOps(gather_quantize, silu_mul_quantize, masked_grouped_gemm, combine)


def runs_on(device: torch.device) -> bool:
    """Whether the kernels run on `device`: Triton, and DeepGEMM loaded on a Hopper GPU."""
    return kernels.available(device) and grouped_gemm.available(device)


def ops_for(device: torch.device) -> BlockOps:
    """The kernels where they run, else plain torch."""
    return DEEP_GEMM_OPS if runs_on(device) else REFERENCE_OPS


def block_expert_forward_on(device: torch.device) -> Callable[..., Tensor]:
    """`block_expert_forward` with its steps chosen once for `device`."""
    return partial(block_expert_forward, ops=ops_for(device))
