"""FP8 routed experts against the exact loop on the same (dequantised) weights, on a GPU.

Bound, ||out - ref|| / ||ref||: 6e-2. The weights are the same on both sides; what differs is
the activations' per-token e4m3 rounding before each GEMM (2^-4 of a value at worst, a few
percent over a row) and bf16 outputs. Against wide weights (an FFN shard's twin) the weights'
own rounding adds as much again: 8e-2.
"""

from __future__ import annotations

import pytest
import torch

from services.common.kernels.experts import REFERENCE, TRITON
from services.common.model.attention_half import FFNInput
from services.common.model.build import build_ffn_half
from services.common.model.checkpoint_writer import random_tensor
from services.common.model.ffn_half import Fp8RoutedExperts, ShardSpec
from services.common.model.fp8_moe import Fp8Experts, fp8_grouped_expert_forward
from services.common.model.moe import grouped_expert_forward, looped_expert_forward, route
from services.common.model.schema import checkpoint_tensors, is_ffn_tensor
from tests.support.models import small_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def experts(e: int, f: int, h: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    gate = torch.randn(e, f, h, device="cuda", generator=g) * h**-0.5
    up = torch.randn(e, f, h, device="cuda", generator=g) * h**-0.5
    down = torch.randn(e, h, f, device="cuda", generator=g) * f**-0.5
    return Fp8Experts.quantize(gate, up, down)


@pytest.mark.parametrize("ops", [TRITON, REFERENCE], ids=["triton", "reference"])
@pytest.mark.parametrize("tokens", [1, 17, 256])
@pytest.mark.parametrize("shard", [(0, 16), (0, 5), (11, 16)])
def test_fp8_grouped_experts_match_the_loop_on_the_same_weights(tokens, shard, ops):
    a, b = shard
    fp8 = experts(16, 512, 1024)
    local = Fp8Experts(*(t[a:b] for t in vars(fp8).values()))
    x = torch.randn(tokens, 1024, device="cuda", dtype=torch.bfloat16)
    weights, ids = route(torch.randn(tokens, 16, device="cuda"), 3, renormalize=False)
    out = fp8_grouped_expert_forward(x, weights, ids, local, first_expert=a, ops=ops).float()
    ref = looped_expert_forward(x.float(), weights, ids, *local.dequantized(), first_expert=a)
    if ref.norm() == 0:  # no token routed to this shard
        assert out.norm() == 0
        return
    assert ((out - ref).norm() / ref.norm()).item() < 6e-2


def test_fp8_experts_hold_half_the_bytes_of_bf16():
    fp8 = experts(4, 512, 1024)
    assert fp8.gate.dtype == torch.float8_e4m3fn and fp8.gate.element_size() == 1
    assert fp8.gate_scale.shape == (4, 512) and fp8.down_scale.shape == (4, 1024)


def test_an_ffn_shard_with_fp8_experts_tracks_its_wide_twin():
    # What an FFN instance serving a block-FP8 checkpoint on a GPU holds.
    cfg = small_config(hidden_size=256, moe_intermediate_size=128)
    tensors = {
        name: random_tensor(name, shape, torch.bfloat16, seed=1).cuda()
        for name, shape in checkpoint_tensors(cfg).items()
        if is_ffn_tensor(name)
    }
    spec = ShardSpec(1, 2)  # the second half of the experts
    wide = build_ffn_half(cfg, tensors, spec)
    fp8 = build_ffn_half(cfg, tensors, spec, fp8_experts=True)
    assert isinstance(fp8.layers[1].moe, Fp8RoutedExperts)
    assert fp8.layers[1].moe.expert_forward.keywords["ops"] is TRITON  # chosen for the GPU, once
    assert wide.layers[1].moe.expert_forward.func is grouped_expert_forward
    h = torch.randn(40, 256, device="cuda", dtype=torch.bfloat16)
    weights, ids = route(torch.randn(40, cfg.moe_num_experts, device="cuda"), 3, False)
    a = fp8(1, FFNInput(h, ids, weights)).float()
    b = wide(1, FFNInput(h, ids, weights)).float()
    assert ((a - b).norm() / b.norm()).item() < 8e-2  # weights and activations in e4m3
