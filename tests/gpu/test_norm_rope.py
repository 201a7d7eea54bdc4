"""The Triton RMSNorm and RoPE kernels against their plain-torch references, on fresh random
inputs at Step-3's shapes (hidden 7168, share_q_dim 2048, 64 query heads and one K/V head of
256) and odd ones, for 1 to a few hundred tokens.

Also: a model built on the GPU takes these kernels (and grouped experts) at build time, and a
float64 one keeps plain torch. Skipped without CUDA or Triton (CI has neither); run on a GPU
machine with `pytest tests/gpu/test_norm_rope.py`.

Error bounds: both sides compute in float32 and round once to the output dtype. They differ in
the order of RMSNorm's sum, rsqrt's last bit and whether a multiply-add is fused, all ~1e-7
relative, so an output differs by at most one unit in the last place of a 16-bit dtype (2^-7
relative for bf16, 2^-10 for fp16) and rarely at all: at least 99% of 16-bit outputs must be
bit-identical. In float32 the bound is 1e-5 relative, plus 1e-6 of the largest output in
absolute terms: where RoPE's two products cancel, a fused multiply-add leaves the result one
rounding of the products off, which is tiny next to them but not next to the result.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from services.common.kernels import experts, norm_rope
from services.common.kernels.norm_rope import rms_norm_reference, rope_reference
from services.common.model.attention import MFAAttention
from services.common.model.ffn_half import RoutedExperts
from services.common.model.kernel_choice import choose_kernels
from services.common.model.layers import RMSNorm, rope_cos_sin
from services.common.model.moe import grouped_expert_forward
from tests.support.models import random_model, small_config

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton"),
]

EPS = 1e-5
THETA = 5e5
TOKENS = (1, 7, 64, 333)
NORM_DIMS = (7168, 2048, 1000, 17)  # hidden, share_q_dim, and two that are not powers of two
ROPE_SHAPES = ((64, 256), (1, 256), (5, 10), (17, 130))  # (heads, head_dim): q, k, odd ones
TOLERANCE = {  # (rtol, atol as a fraction of the largest |output|)
    torch.bfloat16: (2**-7, 1e-6),  # one unit in the last place
    torch.float16: (2**-10, 1e-6),
    torch.float32: (1e-5, 1e-6),
}


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    rtol, atol = TOLERANCE[out.dtype]
    atol *= ref.detach().abs().max().item()
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    if out.dtype != torch.float32:
        assert (out == ref).float().mean().item() >= 0.99


def random_rows(*shape: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """randn with a log-normal scale per row, so a row normalised by another's rms shows."""
    x = torch.randn(*shape, generator=gen, device="cuda")
    return (x * torch.exp(torch.randn(*shape[:-1], 1, generator=gen, device="cuda"))).to(dtype)


def random_norm(dim: int, gen: torch.Generator, weight_dtype=torch.float32) -> RMSNorm:
    norm = RMSNorm(dim, EPS).cuda().to(weight_dtype)
    norm.weight.data = 1 + 0.2 * torch.randn(dim, generator=gen, device="cuda").to(weight_dtype)
    choose_kernels(norm)
    return norm


def random_cos_sin(tokens: int, dim: int, gen: torch.Generator):
    positions = torch.randint(0, 65536, (tokens,), generator=gen, device="cuda")
    return rope_cos_sin(positions, dim, THETA)  # [T, D] float32 each


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("dim", NORM_DIMS)
def test_rms_norm_matches_torch(dim, tokens, dtype, gen):
    norm = random_norm(dim, gen)
    x = random_rows(tokens, dim, dtype=dtype, gen=gen)
    assert norm.impl is norm_rope.rms_norm  # chosen when it was built on the GPU
    assert_matches(norm(x), rms_norm_reference(x, norm.weight, EPS))


def test_rms_norm_fp16_and_bf16_weight(gen):
    norm = random_norm(2048, gen, weight_dtype=torch.bfloat16)
    x = random_rows(64, 2048, dtype=torch.float16, gen=gen)
    assert_matches(norm(x), rms_norm_reference(x, norm.weight, EPS))


def test_rms_norm_on_strided_and_batched_rows(gen):
    """inter_norm reads q_low, a split of the fused q|k|v output: rows 2560 apart."""
    norm = random_norm(2048, gen)
    qkv = random_rows(64, 2560, dtype=torch.bfloat16, gen=gen)
    q_low = qkv.split((2048, 256, 256), dim=-1)[0]
    assert_matches(norm(q_low), rms_norm_reference(q_low, norm.weight, EPS))
    x = random_rows(3, 5, 2048, dtype=torch.bfloat16, gen=gen)  # [batch, T, N]
    assert_matches(norm(x), rms_norm_reference(x, norm.weight, EPS))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("heads,dim", ROPE_SHAPES)
def test_rope_matches_torch(heads, dim, tokens, dtype, gen):
    x = random_rows(tokens, heads, dim, dtype=dtype, gen=gen)
    cos, sin = random_cos_sin(tokens, dim, gen)
    assert_matches(norm_rope.rope(x, cos, sin), rope_reference(x, cos, sin))


def test_rope_fp16(gen):
    x = random_rows(64, 64, 256, dtype=torch.float16, gen=gen)
    cos, sin = random_cos_sin(64, 256, gen)
    assert_matches(norm_rope.rope(x, cos, sin), rope_reference(x, cos, sin))


def test_rope_on_a_view_of_the_fused_projection(gen):
    """k as the engine has it: [T, 1, 256] viewed out of q|k|v, rows 2560 apart."""
    qkv = random_rows(64, 2560, dtype=torch.bfloat16, gen=gen)
    k = qkv.split((2048, 256, 256), dim=-1)[1].view(64, 1, 256)
    cos, sin = random_cos_sin(64, 256, gen)
    assert_matches(norm_rope.rope(k, cos, sin), rope_reference(k, cos, sin))


def test_gradients_come_from_the_reference(gen):
    norm = random_norm(96, gen)
    x = random_rows(5, 4, 96, dtype=torch.float32, gen=gen).requires_grad_()
    cos, sin = random_cos_sin(5, 96, gen)
    grad = torch.randn(5, 4, 96, generator=gen, device="cuda")
    norm_rope.rope(norm(x), cos, sin).backward(grad)
    fast = x.grad.clone(), norm.weight.grad.clone()
    x.grad = norm.weight.grad = None
    rope_reference(rms_norm_reference(x, norm.weight, EPS), cos, sin).backward(grad)
    torch.testing.assert_close(fast, (x.grad, norm.weight.grad), rtol=1e-5, atol=1e-6)


def test_a_model_built_on_the_gpu_takes_the_kernels_and_float64_keeps_torch():
    cfg = small_config()
    for dtype, kernel in ((torch.bfloat16, True), (torch.float32, True), (torch.float64, False)):
        model = random_model(cfg, dtype, device="cuda")
        norms = [m.impl for m in model.modules() if isinstance(m, RMSNorm)]
        ropes = [m.rope for m in model.modules() if isinstance(m, MFAAttention)]
        expected = (
            (norm_rope.rms_norm, norm_rope.rope) if kernel else (rms_norm_reference, rope_reference)
        )
        assert set(norms) == {expected[0]} and set(ropes) == {expected[1]}, dtype
    # bf16 experts: grouped GEMMs with the Triton combine, chosen once.
    model = random_model(cfg, torch.bfloat16, device="cuda")
    routed = next(m for m in model.modules() if isinstance(m, RoutedExperts))
    assert routed.expert_forward.func is grouped_expert_forward
    assert routed.expert_forward.keywords["ops"] is experts.TRITON


@pytest.mark.parametrize("tokens", TOKENS)
def test_rope_qk_is_both_ropes_in_one_launch(tokens, gen):
    """q [T, 64, 256] and k [T, 1, 256] viewed out of q|k|v, as the FP8 layer has them."""
    q = random_rows(tokens, 64, 256, dtype=torch.bfloat16, gen=gen)
    qkv = random_rows(tokens, 2560, dtype=torch.bfloat16, gen=gen)
    k = qkv.split((2048, 256, 256), dim=-1)[1].view(tokens, 1, 256)
    cos, sin = random_cos_sin(tokens, 256, gen)
    q_out, k_out = norm_rope.rope_qk(q, k, cos, sin)
    assert torch.equal(q_out, norm_rope.rope(q, cos, sin))
    assert torch.equal(k_out, norm_rope.rope(k, cos, sin))
