"""The MoE layer's Triton kernels against the torch forms they replace, on fresh random
inputs, for a whole expert set, shards of it, and a shard no token chose."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.common.activations import quantize_fp8
from services.common.kernels import experts as moe_kernels
from services.common.model.moe import ExpertGroups, route

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

EXPERTS, TOP_K = 16, 3
SHARDS = [(0, 16), (0, 1), (11, 16), (5, 6)]  # [first, end) of the local experts


def routed(tokens: int, shard: tuple[int, int], seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    weights, ids = route(torch.randn(tokens, EXPERTS, device="cuda", generator=g), TOP_K, False)
    first, end = shard
    return weights, ids, ExpertGroups.of(ids, end - first, first)


def assert_same_e4m3(q, scales, ref_q, ref_scales, rows: int) -> None:
    """Equal scales, and codes at most one e4m3 step apart (division rounding may differ)."""
    torch.testing.assert_close(scales[:rows], ref_scales[:rows], rtol=1e-6, atol=0)
    codes, ref_codes = q[:rows].view(torch.uint8).int(), ref_q[:rows].view(torch.uint8).int()
    assert (codes - ref_codes).abs().max().item() <= 1 if rows else True


@pytest.mark.parametrize("shard", SHARDS)
@pytest.mark.parametrize("tokens", [1, 37, 512])
def test_gather_quantize_quantises_each_local_row_like_torch(shard, tokens):
    weights, ids, groups = routed(tokens, shard, seed=tokens)
    x = torch.randn(tokens, 1000, device="cuda", dtype=torch.bfloat16) * 3
    q, scales = moe_kernels.gather_quantize(x, groups)
    ref_q, ref_scales = quantize_fp8(x[groups.tokens])
    local = int(groups.offsets[-1])
    assert q.shape == (tokens * TOP_K, 1000) and q.dtype == torch.float8_e4m3fn
    assert_same_e4m3(q, scales, ref_q, ref_scales, local)


@pytest.mark.parametrize("shard", SHARDS)
def test_silu_mul_quantize_matches_torch_in_float32(shard):
    _, _, groups = routed(300, shard, seed=1)
    gate = torch.randn(900, 640, device="cuda", dtype=torch.bfloat16) * 4
    up = torch.randn_like(gate)
    q, scales = moe_kernels.silu_mul_quantize(gate, up, groups)
    ref_q, ref_scales = quantize_fp8(F.silu(gate.float()) * up.float())
    assert_same_e4m3(q, scales, ref_q, ref_scales, int(groups.offsets[-1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shard", SHARDS)
@pytest.mark.parametrize("tokens", [1, 37, 512])
def test_combine_sums_local_expert_outputs_like_torch(dtype, shard, tokens):
    weights, ids, groups = routed(tokens, shard, seed=7 + tokens)
    x = torch.empty(tokens, 1500, device="cuda", dtype=dtype)
    y = torch.randn(tokens * TOP_K, 1500, device="cuda", dtype=dtype)
    out = moe_kernels.combine(y, weights, groups, dtype)
    ref = groups.combine(y, weights, x)
    assert out.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out, ref, **tol)
    if int(groups.offsets[-1]) == 0:  # no token chose this shard: nothing to add
        assert out.abs().max().item() == 0


def test_a_row_too_long_for_one_program_is_not_supported():
    x = torch.empty(1, moe_kernels.MAX_ROW + 1, device="cuda")
    assert not moe_kernels.supports(x) and moe_kernels.supports(x[:, :128])
    assert not moe_kernels.supports(torch.empty(1, 8))  # CPU
