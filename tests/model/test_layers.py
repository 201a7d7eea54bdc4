"""The model math against independent formulations of the same equations."""

import math

import pytest
import torch

from services.common.kernels.norm_rope import rope_reference
from services.common.model.attention import causal_attention, causal_attention_sdpa
from services.common.model.attention_half import FFNInput, Router
from services.common.model.ffn_half import RoutedExperts
from services.common.model.layers import RMSNorm, rope_cos_sin
from services.common.model.moe import (
    expert_forward_per_token,
    grouped_expert_forward,
    looped_expert_forward,
    route,
)
from services.common.model.reference import reference_logits
from tests.support.models import random_model, small_config

torch.manual_seed(0)


def random_experts(e=8, f=16, h=24, dtype=torch.float32):
    scale = h**-0.5
    return (
        torch.randn(e, f, h, dtype=dtype) * scale,
        torch.randn(e, f, h, dtype=dtype) * scale,
        torch.randn(e, h, f, dtype=dtype) * f**-0.5,
    )


@pytest.mark.parametrize("num_tokens", [1, 7, 64])
def test_vectorised_moe_matches_the_per_token_loop(num_tokens):
    gate, up, down = random_experts(dtype=torch.float64)
    x = torch.randn(num_tokens, 24, dtype=torch.float64)
    weights, ids = route(torch.randn(num_tokens, 8, dtype=torch.float64), 3, renormalize=False)
    fast = looped_expert_forward(x, weights.double(), ids, gate, up, down)
    slow = expert_forward_per_token(x, weights.double(), ids, gate, up, down)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)


def test_expert_shards_sum_to_the_whole():
    """An FFN instance holding experts [a, b) returns its partial sum; partials add up."""
    gate, up, down = random_experts(dtype=torch.float64)
    x = torch.randn(10, 24, dtype=torch.float64)
    weights, ids = route(torch.randn(10, 8, dtype=torch.float64), 3, renormalize=False)
    weights = weights.double()
    whole = looped_expert_forward(x, weights, ids, gate, up, down)
    parts = sum(
        looped_expert_forward(x, weights, ids, gate[a:b], up[a:b], down[a:b], first_expert=a)
        for a, b in [(0, 3), (3, 5), (5, 8)]
    )
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shard", [(0, 8), (0, 3), (3, 8), (5, 6)])
def test_grouped_gemm_experts_match_the_exact_loop_for_any_shard(shard):
    # The GPU's bf16 path, run here on torch's CPU grouped GEMM.
    a, b = shard
    gate, up, down = random_experts(dtype=torch.float64)
    x = torch.randn(33, 24, dtype=torch.float64)
    weights, ids = route(torch.randn(33, 8, dtype=torch.float64), 3, renormalize=False)
    exact = looped_expert_forward(x, weights, ids, gate[a:b], up[a:b], down[a:b], first_expert=a)
    bf16 = [t[a:b].bfloat16() for t in (gate, up, down)]
    grouped = grouped_expert_forward(x.bfloat16(), weights, ids, *bf16, first_expert=a)
    torch.testing.assert_close(grouped.double(), exact, rtol=0.05, atol=0.02)


def test_router_is_softmax_topk_without_renormalisation():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    weights, ids = route(logits, 2, renormalize=False)
    probs = torch.softmax(logits, -1)
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(weights, probs[:, :2])
    assert weights.sum() < 1  # the k weights are not rescaled to one
    weights, _ = route(logits, 2, renormalize=True)
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))


def test_the_attention_halfs_router_and_the_ffn_halfs_experts_make_the_moe():
    cfg = small_config()
    router = Router(cfg).double()
    torch.nn.init.normal_(router.gate.weight, std=0.2)
    e, f, h = cfg.moe_num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    gate, up, down = random_experts(e, f, h, torch.float64)
    x = torch.randn(5, h, dtype=torch.float64)
    weights, ids = router(x)
    assert torch.equal(ids, route(x @ router.gate.weight.T, cfg.moe_top_k, False)[1])
    expected = expert_forward_per_token(x, weights.double(), ids, gate, up, down)
    ffn_input = FFNInput(x, ids, weights.double())
    torch.testing.assert_close(RoutedExperts(gate, up, down, 0)(ffn_input), expected)


def test_rms_norm():
    norm = RMSNorm(6, eps=1e-5)
    norm.weight.data = torch.arange(1.0, 7.0)
    x = torch.randn(3, 6)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_rope_is_rotate_half_over_the_full_head():
    d, theta = 8, 10000.0
    x = torch.randn(1, 1, d, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.tensor([3]), d, theta)
    out = rope_reference(x, cos, sin)[0, 0]
    # Pair i rotates (x[i], x[i + d/2]) by angle 3 * theta^(-2i/d).
    for i in range(d // 2):
        angle = 3 * theta ** (-2 * i / d)
        a, b = x[0, 0, i].item(), x[0, 0, i + d // 2].item()
        assert out[i].item() == pytest.approx(a * math.cos(angle) - b * math.sin(angle), abs=1e-6)
        assert out[i + d // 2].item() == pytest.approx(
            b * math.cos(angle) + a * math.sin(angle), abs=1e-6
        )


def test_rope_scores_depend_only_on_relative_position():
    d = 16
    q, k = torch.randn(1, 1, d, dtype=torch.float64), torch.randn(1, 1, d, dtype=torch.float64)

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([pq]), d, 5e5)
        ck, sk = rope_cos_sin(torch.tensor([pk]), d, 5e5)
        return (rope_reference(q, cq, sq) * rope_reference(k, ck, sk)).sum().item()

    assert score(10, 3) == pytest.approx(score(107, 100), rel=1e-5)


def test_causal_attention_shares_one_kv_head_across_query_heads():
    n, heads, d = 5, 4, 8
    q = torch.randn(n, heads, d, dtype=torch.float64)
    k, v = torch.randn(n, 1, d, dtype=torch.float64), torch.randn(n, 1, d, dtype=torch.float64)
    out = causal_attention(q, k, v, scale=d**-0.5, q_offset=0)
    for h in range(heads):
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[:, h][None], k[:, 0][None], v[:, 0][None], is_causal=True, scale=d**-0.5
        )[0]
        torch.testing.assert_close(out[:, h], expected)


def test_attention_with_an_offset_equals_the_tail_of_a_full_pass():
    q = torch.randn(9, 4, 8, dtype=torch.float64)
    k, v = torch.randn(9, 1, 8, dtype=torch.float64), torch.randn(9, 1, 8, dtype=torch.float64)
    full = causal_attention(q, k, v, 0.3, q_offset=0)
    tail = causal_attention(q[6:], k, v, 0.3, q_offset=6)
    torch.testing.assert_close(tail, full[6:])


@pytest.mark.parametrize("n, c, groups", [(6, 6, 1), (3, 11, 1), (1, 9, 1), (7, 20, 2)])
def test_fused_attention_equals_the_exact_one_for_chunks_at_the_end_of_the_context(n, c, groups):
    # What a GPU prefill takes: a chunk of n queries after c - n tokens of context.
    q = torch.randn(n, 8, 16, dtype=torch.float64)
    k, v = (
        torch.randn(c, groups, 16, dtype=torch.float64),
        torch.randn(c, groups, 16, dtype=torch.float64),
    )
    expected = causal_attention(q, k, v, 0.25, q_offset=c - n)
    torch.testing.assert_close(causal_attention_sdpa(q, k, v, 0.25), expected)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_model_runs_in_lower_precision_close_to_float64(dtype, tolerance):
    cfg = small_config()
    exact = reference_logits(random_model(cfg, torch.float64), [1, 5, 9, 300, 7])
    low = reference_logits(random_model(cfg, dtype), [1, 5, 9, 300, 7])
    assert low.dtype == dtype
    error = (low.double() - exact).abs().max() / exact.abs().max()
    assert error < tolerance


def test_model_is_causal():
    model = random_model(small_config(), torch.float64)
    a = reference_logits(model, [3, 4, 5, 6])
    b = reference_logits(model, [3, 4, 5, 200])
    torch.testing.assert_close(a[:3], b[:3])
    assert not torch.allclose(a[3], b[3])
