"""Routed experts in the checkpoint's block FP8 (`model/block_fp8_moe.py`), on the CPU: the
masked layout's bookkeeping and the whole step in plain torch (the oracle the GPU kernels are
held to in tests/gpu/test_block_fp8_moe.py), and a shard built from FP8 expert tensors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from services.common.config import ModelConfig
from services.common.kernels.fp8 import DEFAULT_BLOCK, dequantize_block_fp8, quantize_block_fp8
from services.common.model import block_fp8_moe as block
from services.common.model.attention_half import FFNInput
from services.common.model.build import build_ffn_half, fp8_weights_on
from services.common.model.checkpoint_writer import random_tensor
from services.common.model.ffn_half import BlockFp8RoutedExperts, RoutedExperts, ShardSpec
from services.common.model.moe import ExpertGroups, looped_expert_forward, route
from services.common.model.schema import checkpoint_tensors, is_ffn_tensor
from services.common.model.weights import SCALE_SUFFIX
from tests.support.models import small_config

HIDDEN, WIDTH, EXPERTS, TOP_K = 256, 384, 8, 3


def random_experts(count: int, seed: int) -> block.BlockFp8Experts:
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, generator=g) * shape[-1] ** -0.5

    gate, up, down = w(count, WIDTH, HIDDEN), w(count, WIDTH, HIDDEN), w(count, HIDDEN, WIDTH)
    (gq, gs), (uq, us), (dq, ds) = (quantize_block_fp8(t) for t in (gate, up, down))
    return block.BlockFp8Experts.stack(gq, gs, uq, us, dq, ds)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("first, count", [(0, 8), (2, 3), (7, 1)])
def test_each_local_assignment_gets_its_own_slot_in_its_experts_rows(first, count):
    weights, ids = route(torch.randn(50, EXPERTS), TOP_K, False)
    slots = block.MaskedSlots.of(ExpertGroups.of(ids, count, first), count, 50)
    local = (ids.flatten() >= first) & (ids.flatten() < first + count)
    taken = slots.positions[local]
    assert taken.unique().numel() == taken.numel()  # no two assignments share a row
    expert_of_slot = taken // slots.capacity
    assert torch.equal(expert_of_slot, ids.flatten()[local] - first)
    assert (taken % slots.capacity < slots.counts[expert_of_slot]).all()  # inside masked_m
    assert (slots.positions[~local] == int(slots.limit)).all()
    assert slots.counts.tolist() == [int((ids == first + e).sum()) for e in range(count)]
    assert slots.capacity % block.ROW_ALIGN == 0 and slots.capacity >= int(slots.counts.max())


@pytest.mark.parametrize("first, count, tokens", [(0, 8, 5), (2, 3, 37), (5, 3, 200)])
def test_the_step_equals_the_experts_up_to_fp8_activations(first, count, tokens):
    """The block scales are used as stored: what is left is rounding the two activations to
    e4m3 (1 x 128 groups), about 2-3% each on Gaussian inputs; a misplaced row is ~100%."""
    experts = random_experts(count, seed=tokens)
    weights, ids = route(torch.randn(tokens, EXPERTS), TOP_K, False)
    x = torch.randn(tokens, HIDDEN).bfloat16()
    gate, up, down = experts.dequantized()
    ref = looped_expert_forward(x.float(), weights, ids, gate, up, down, first)
    out = block.block_expert_forward(x, weights, ids, experts, first, EXPERTS)
    assert out.shape == (tokens, HIDDEN) and out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 0.06


def test_a_shard_no_token_chose_adds_nothing():
    experts = random_experts(2, seed=1)
    weights = torch.full((4, TOP_K), 1 / TOP_K)
    ids = torch.tensor([[0, 1, 2]] * 4)
    out = block.block_expert_forward(torch.randn(4, HIDDEN), weights, ids, experts, 5, EXPERTS)
    assert out.abs().max().item() == 0


def test_gate_and_up_stack_into_one_weight_per_expert():
    experts = random_experts(3, seed=2)
    assert experts.gate_up.shape == (3, 2 * WIDTH, HIDDEN)
    assert experts.gate_up_scale.shape == (3, 2 * WIDTH // 128, HIDDEN // 128)
    with pytest.raises(ValueError, match="not whole 128 x 128 blocks"):
        q, s = quantize_block_fp8(torch.randn(1, 200, HIDDEN))
        block.BlockFp8Experts.stack(q, s, q, s, q.transpose(1, 2), s.transpose(1, 2))


def fp8_shard(cfg: ModelConfig, spec: ShardSpec):
    """An FFN shard built from tensors as the loader hands them on Hopper: routed experts in
    block FP8 with their scales, everything else wide; and the same shard from wide experts."""
    shapes = {n: s for n, s in checkpoint_tensors(cfg).items() if is_ffn_tensor(n)}
    wide = {n: random_tensor(n, s, torch.float32, 0) for n, s in shapes.items()}
    fp8 = dict(wide)
    for name in [n for n in wide if ".moe." in n and n.endswith("_proj.weight")]:
        q, s = quantize_block_fp8(wide[name])
        fp8[name], fp8[name + SCALE_SUFFIX] = q, s
        wide[name] = dequantize_block_fp8(q, s, DEFAULT_BLOCK, torch.float32)
    return (
        build_ffn_half(cfg, fp8, spec, dtype=torch.float32),
        build_ffn_half(cfg, wide, spec, dtype=torch.float32),
    )


def test_a_shard_built_from_fp8_experts_holds_them_as_stored_and_computes_the_same():
    cfg = dataclasses.replace(
        small_config(), hidden_size=256, moe_intermediate_size=256, share_expert_dim=256
    )
    spec = ShardSpec(1, 2)
    shard, wide = fp8_shard(cfg, spec)
    layer = cfg.moe_layers[0]
    moe = shard.layers[layer].moe
    assert isinstance(moe, BlockFp8RoutedExperts) and isinstance(
        wide.layers[layer].moe, RoutedExperts
    )
    assert moe.first_expert == spec.range_of(cfg.moe_num_experts)[0]
    assert moe.experts.gate_up.dtype == torch.float8_e4m3fn
    assert moe.expert_forward.keywords["ops"] is block.REFERENCE_OPS  # the CPU's choice
    h = torch.randn(9, cfg.hidden_size)
    weights, ids = route(torch.randn(9, cfg.moe_num_experts), cfg.moe_top_k, False)
    x = FFNInput(h, ids, weights)
    assert rel_err(shard(layer, x), wide(layer, x)) < 0.06


def test_experts_the_kernel_cannot_take_are_widened_instead():
    """A block-FP8 expert width that is not whole 128-wide blocks (a small test model's) is
    served as before: widened at build, wide or requantised experts."""
    cfg = small_config()
    assert cfg.moe_intermediate_size % 128
    shard, wide = fp8_shard(cfg, ShardSpec(0, 1))
    layer = cfg.moe_layers[0]
    assert isinstance(shard.layers[layer].moe, RoutedExperts)
    h = torch.randn(5, cfg.hidden_size)
    weights, ids = route(torch.randn(5, cfg.moe_num_experts), cfg.moe_top_k, False)
    x = FFNInput(h, ids, weights)
    torch.testing.assert_close(shard(layer, x), wide(layer, x))


def test_the_cpu_loads_experts_wide():
    assert fp8_weights_on("cpu") is None
    assert not block.runs_on(torch.device("cpu"))
