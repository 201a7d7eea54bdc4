"""An FFN instance's layers replayed from CUDA graphs give what eager layers give, on a GPU.

A micro-batch is padded to a token bucket, so the GEMMs see more rows than the eager layer
and may pick other kernels: bf16 sums in another order. The tests allow that much, check
that graphs were really captured and replayed, and that padding rows change no real row.
"""

from __future__ import annotations

import pytest
import torch

from services.common.model.attention_half import FFNInput
from services.common.model.build import build_ffn_half
from services.common.model.checkpoint_writer import random_tensor
from services.common.model.ffn_half import ShardSpec
from services.common.model.moe import route
from services.common.model.schema import checkpoint_tensors, is_ffn_tensor
from services.ffn.ffn_graphs import FFNGraphs, capturable
from tests.support.models import small_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CFG = small_config(hidden_size=256, moe_intermediate_size=128, intermediate_size=384)


def shard(spec: ShardSpec, fp8_experts: bool, dtype=torch.bfloat16):
    tensors = {
        name: random_tensor(name, shape, dtype, seed=3).cuda()
        for name, shape in checkpoint_tensors(CFG).items()
        if is_ffn_tensor(name)
    }
    return build_ffn_half(CFG, tensors, spec, fp8_experts=fp8_experts, dtype=dtype)


def ffn_input(layer: int, n: int) -> FFNInput:
    h = torch.randn(n, CFG.hidden_size, device="cuda", dtype=torch.bfloat16)
    if not CFG.is_moe_layer(layer):
        return FFNInput(h)
    weights, ids = route(torch.randn(n, CFG.moe_num_experts, device="cuda"), CFG.moe_top_k, False)
    return FFNInput(h, ids, weights)


@pytest.mark.parametrize("fp8_experts", [False, True])
@pytest.mark.parametrize("spec", [ShardSpec(0, 1), ShardSpec(1, 2)])
def test_graph_replayed_ffn_layers_give_the_eager_output(spec, fp8_experts):
    ffn = shard(spec, fp8_experts)
    assert capturable(ffn)
    graphs = FFNGraphs(ffn, max_tokens=96, dtype=torch.bfloat16)
    moe = CFG.moe_layers[0]
    for n in (1, 5, 24, 70, 96):  # exact buckets and padded ones
        for layer in (0, moe):
            x = ffn_input(layer, n)
            fast, plain = graphs.run(layer, x), ffn(layer, x)
            assert fast is not None and fast.shape == plain.shape
            error = (fast.float() - plain.float()).norm() / plain.float().norm()
            assert error.item() < 2e-2, (n, layer)
    assert graphs.enabled and len(graphs.graphs) == 2 * len({1, 8, 24, 96})  # (layer, bucket)


def test_padding_rows_change_no_real_row_and_a_bucket_is_reused():
    ffn = shard(ShardSpec(0, 1), fp8_experts=False)
    graphs = FFNGraphs(ffn, max_tokens=64, dtype=torch.bfloat16)
    moe = CFG.moe_layers[0]
    x = ffn_input(moe, 20)  # bucket 24: four padding rows
    first = graphs.run(moe, x).clone()
    # The same rows again, with other garbage left in the static buffers' padding first.
    graphs.run(moe, ffn_input(moe, 24))
    again = graphs.run(moe, x)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert len(graphs.graphs) == 1


def test_float32_shards_are_not_captured_and_too_many_tokens_fall_back():
    assert not capturable(shard(ShardSpec(0, 1), False, torch.float32))  # looped experts sync
    graphs = FFNGraphs(shard(ShardSpec(0, 1), False), max_tokens=16, dtype=torch.bfloat16)
    assert graphs.run(0, ffn_input(0, 17)) is None
