"""The build-time choice of implementations: plain torch wherever the Triton kernels cannot run.

CI has no GPU, so here every layer of a built model must hold its reference; the GPU side of
the choice (the kernels swapped in) is checked in tests/gpu/test_norm_rope.py.
"""

import pytest
import torch

from services.common import kernels
from services.common.kernels import experts, norm_rope
from services.common.kernels.fp8 import FP8_DTYPE, FP8_MAX, quantize_fp8
from services.common.model.attention import MFAAttention
from services.common.model.build import build_ffn_half
from services.common.model.checkpoint_writer import random_tensor
from services.common.model.ffn_half import Fp8RoutedExperts, RoutedExperts, ShardSpec
from services.common.model.fp8_moe import (
    Fp8Experts,
    fp8_expert_forward_on,
    fp8_grouped_expert_forward,
)
from services.common.model.kernel_choice import choose_kernels
from services.common.model.layers import RMSNorm
from services.common.model.moe import (
    expert_forward_on,
    grouped_expert_forward,
    looped_expert_forward,
)
from services.common.model.schema import checkpoint_tensors, is_ffn_tensor
from tests.support.models import random_model, small_config


def test_the_kernels_are_not_available_off_a_gpu():
    assert not kernels.available("cpu")
    assert not kernels.available(torch.device("meta"))
    assert experts.ops_for(torch.device("cpu")) is experts.REFERENCE


def test_a_model_built_on_the_cpu_holds_the_plain_torch_paths():
    model = random_model(small_config(), torch.bfloat16)
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    attns = [m for m in model.modules() if isinstance(m, MFAAttention)]
    routed = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    assert norms and attns and routed
    assert all(m.impl is norm_rope.rms_norm_reference for m in norms)
    assert all(m.rope is norm_rope.rope_reference for m in attns)
    assert all(m.expert_forward is looped_expert_forward for m in routed)


def test_an_ffn_shard_read_layer_by_layer_gets_the_choice():
    """An FFN instance builds its shard from a per-layer reader: the pass reaches it too."""
    cfg = small_config()
    shapes = {n: s for n, s in checkpoint_tensors(cfg).items() if is_ffn_tensor(n)}

    def layer(i):
        prefix = f"model.layers.{i}."
        return {
            n: random_tensor(n, s, torch.bfloat16, 0)
            for n, s in shapes.items()
            if n.startswith(prefix)
        }

    shard = build_ffn_half(cfg, layer, ShardSpec(1, 2))
    for routed in shard.modules():
        if isinstance(routed, RoutedExperts):
            routed.expert_forward = grouped_expert_forward  # as if chosen for elsewhere
    choose_kernels(shard)
    routed = [m for m in shard.modules() if isinstance(m, RoutedExperts)]
    assert len(routed) == len(cfg.moe_layers)
    assert all(m.expert_forward is looped_expert_forward for m in routed)


def test_the_pass_puts_back_the_references_for_a_model_moved_off_the_gpu():
    """A choice made for one device is replaced, not kept, when the pass runs again."""
    model = random_model(small_config())
    norm = model.attention.norm
    attn = model.attention.layers[0].self_attn
    norm.impl = norm_rope.rms_norm  # as if built on a GPU
    attn.rope = norm_rope.rope
    choose_kernels(model)
    assert norm.impl is norm_rope.rms_norm_reference
    assert attn.rope is norm_rope.rope_reference


def test_fp8_experts_take_the_plain_torch_steps_off_a_gpu():
    gate, up, down = torch.randn(2, 8, 16), torch.randn(2, 8, 16), torch.randn(2, 16, 8)
    routed = Fp8RoutedExperts(Fp8Experts.quantize(gate, up, down), first_expert=0)
    assert routed.expert_forward is fp8_grouped_expert_forward  # REFERENCE ops by default
    choose_kernels(routed)
    assert routed.expert_forward.keywords["ops"] is experts.REFERENCE
    assert fp8_expert_forward_on(torch.device("cpu")).keywords["ops"] is experts.REFERENCE


def test_grouped_experts_only_for_bf16_on_a_gpu():
    assert expert_forward_on(torch.device("cpu"), torch.bfloat16) is looped_expert_forward
    assert expert_forward_on(torch.device("cpu"), torch.float32) is looped_expert_forward


def test_fp8_max_is_e4m3s_largest_finite_value():
    assert FP8_MAX == torch.finfo(FP8_DTYPE).max
    q, scales = quantize_fp8(torch.tensor([[-3.0, 1.5, 0.0]]))
    assert q.float().abs().max().item() == FP8_MAX  # the largest value lands on the maximum
    assert scales.item() == pytest.approx(3.0 / FP8_MAX, rel=1e-6)
