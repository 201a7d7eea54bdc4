"""The MoE layer's Triton kernels (`kernels/experts.py`) against their plain-torch references,
on fresh random inputs, for a whole expert set, shards of it, and a shard no token chose."""

from __future__ import annotations

import pytest
import torch

from services.common.kernels import experts
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
    q, scales = experts.gather_quantize(x, groups)
    ref_q, ref_scales = experts.gather_quantize_reference(x, groups)
    local = int(groups.offsets[-1])
    assert q.shape == (tokens * TOP_K, 1000) and q.dtype == torch.float8_e4m3fn
    assert_same_e4m3(q, scales, ref_q, ref_scales, local)


@pytest.mark.parametrize("shard", SHARDS)
def test_silu_mul_quantize_matches_torch_in_float32(shard):
    _, _, groups = routed(300, shard, seed=1)
    gate = torch.randn(900, 640, device="cuda", dtype=torch.bfloat16) * 4
    up = torch.randn_like(gate)
    q, scales = experts.silu_mul_quantize(gate, up, groups)
    ref_q, ref_scales = experts.silu_mul_quantize_reference(gate, up, groups)
    assert_same_e4m3(q, scales, ref_q, ref_scales, int(groups.offsets[-1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shard", SHARDS)
@pytest.mark.parametrize("tokens", [1, 37, 512])
def test_combine_sums_local_expert_outputs_like_torch(dtype, shard, tokens):
    weights, ids, groups = routed(tokens, shard, seed=7 + tokens)
    y = torch.randn(tokens * TOP_K, 1500, device="cuda", dtype=dtype)
    out = experts.combine(y, weights, groups, dtype)
    ref = experts.combine_reference(y, weights, groups, dtype)
    assert out.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out, ref, **tol)
    if int(groups.offsets[-1]) == 0:  # no token chose this shard: nothing to add
        assert out.abs().max().item() == 0


def test_a_row_too_long_for_one_program_is_refused():
    _, _, groups = routed(4, (0, 16), seed=2)
    x = torch.randn(4, experts.MAX_ROW + 1, device="cuda")
    with pytest.raises(ValueError, match="MAX_ROW"):
        experts.gather_quantize(x, groups)


def test_the_kernels_are_chosen_for_the_gpu_and_the_references_for_the_cpu():
    assert experts.ops_for(torch.device("cuda")) is experts.TRITON
    assert experts.ops_for(torch.device("cpu")) is experts.REFERENCE
