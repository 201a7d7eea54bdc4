"""The model cut once: the attention half and FFN halves (shards) against the whole model.

Shards' partial sums add up to the whole feed-forward, in either MLP layout; block-FP8 MLP
weights cut on their 128-blocks stay FP8 and track the dequantised model; the runner's
micro-batch pipeline over the local FFN executor gives the reference model's tokens.
"""

import pytest
import torch

from services.attention.builder import local_engine
from services.attention.engine import EngineConfig
from services.attention.scheduler import SchedulerConfig
from services.common.completion import Completions
from services.common.kernels.fp8 import quantize_block_fp8
from services.common.model.attention_half import FFNInput
from services.common.model.build import build_ffn_half
from services.common.model.checkpoint_writer import random_tensor
from services.common.model.ffn_half import ShardSpec
from services.common.model.fp8_linear import Fp8Linear
from services.common.model.reference import reference_greedy
from services.common.model.schema import checkpoint_tensors, is_ffn_tensor
from services.common.sampling_params import SamplingParams
from services.ffn.ffn_graphs import capturable
from tests.support.models import small_config

CFG = small_config()


def ffn_tensors(cfg, dtype=torch.float64, seed=0):
    shapes = {n: s for n, s in checkpoint_tensors(cfg).items() if is_ffn_tensor(n)}
    return {n: random_tensor(n, s, dtype, seed) for n, s in shapes.items()}


def ffn_input(cfg, layer, tokens=7, dtype=torch.float64):
    h = torch.randn(tokens, cfg.hidden_size, dtype=dtype)
    if not cfg.is_moe_layer(layer):
        return FFNInput(h)
    ids = torch.randint(0, cfg.moe_num_experts, (tokens, cfg.moe_top_k))
    return FFNInput(h, ids, torch.rand(tokens, cfg.moe_top_k, dtype=dtype))


@pytest.mark.parametrize("num_shards", [2, 3])
def test_split_shards_partial_sums_add_up_to_the_whole_feed_forward(num_shards):
    tensors = ffn_tensors(CFG)
    whole = build_ffn_half(CFG, tensors, dtype=torch.float64)
    shards = [build_ffn_half(CFG, tensors, ShardSpec(f, num_shards)) for f in range(num_shards)]
    for layer in (0, CFG.moe_layers[0]):  # a dense layer and a MoE layer
        x = ffn_input(CFG, layer)
        total = sum(shard(layer, x) for shard in shards)
        torch.testing.assert_close(total, whole(layer, x), rtol=1e-12, atol=1e-12)


def test_whole_mlp_shards_each_serve_their_rows_and_still_add_up():
    tensors = ffn_tensors(CFG)
    whole = build_ffn_half(CFG, tensors)
    shards = [build_ffn_half(CFG, tensors, ShardSpec(f, 2, split_mlp=False)) for f in (0, 1)]
    rows = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5, 6])]  # who computes which MLP row
    for layer in (0, CFG.moe_layers[0]):
        x = ffn_input(CFG, layer)
        total = sum(shard(layer, x, r) for shard, r in zip(shards, rows, strict=True))
        torch.testing.assert_close(total, whole(layer, x), rtol=1e-12, atol=1e-12)


def test_a_cpu_shard_is_never_captured_in_cuda_graphs():
    assert not capturable(build_ffn_half(CFG, ffn_tensors(CFG, torch.float32)))


def test_fp8_mlp_weights_stay_fp8_where_a_shard_cuts_on_their_blocks():
    cfg = small_config(hidden_size=128, intermediate_size=384, share_expert_dim=128)
    wide = ffn_tensors(cfg, torch.float32)
    fp8 = dict(wide)
    for name in [n for n in wide if (".mlp." in n or ".share_expert." in n)]:
        fp8[name], fp8[name + "_scale_inv"] = quantize_block_fp8(wide[name])
    # 3 shards of the dense MLP's 384 columns: 128 each, whole blocks. The shared expert's
    # 128 columns in 3 cut inside a block: that shard's slice is widened instead.
    shard = build_ffn_half(cfg, fp8, ShardSpec(1, 3), dtype=torch.float32)
    assert isinstance(shard.layers[0].mlp.gate_proj, Fp8Linear)
    assert isinstance(shard.layers[0].mlp.down_proj, Fp8Linear)
    moe = cfg.moe_layers[0]
    assert isinstance(shard.layers[moe].share_expert.down_proj, torch.nn.Linear)
    exact = build_ffn_half(cfg, wide, ShardSpec(1, 3), dtype=torch.float32)
    for layer in (0, moe):
        x = ffn_input(cfg, layer, dtype=torch.float32)
        a, b = shard(layer, x), exact(layer, x)
        # The weights' and activations' e4m3 rounding, a few percent.
        assert ((a - b).norm() / b.norm()).item() < 0.1


@pytest.mark.parametrize("num_micro_batches", [1, 2, 3, 4])
def test_the_runner_gives_the_reference_tokens_with_any_micro_batch_count(
    tiny_model_f64, num_micro_batches
):
    config = EngineConfig(
        block_size=4,
        max_model_len=128,
        scheduler=SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=40),
    )
    engine = local_engine(tiny_model_f64, config, num_micro_batches=num_micro_batches)
    prompts = [[7, 8, 9], list(range(20, 45)), [300], list(range(100, 112)), [5, 6]]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    results = Completions()
    for i, prompt in enumerate(prompts):
        results.add_request(str(i), prompt, params)
        engine.add_request(str(i), prompt, params)
    while engine.has_unfinished_requests():
        for output in engine.step():
            results.add(output)
    for i, prompt in enumerate(prompts):
        eos = tiny_model_f64.cfg.eos_token_ids
        assert results[str(i)].token_ids == reference_greedy(tiny_model_f64, prompt, 8, eos)
