"""The one-launch KV-cache write against `write_kv_reference` (`index_copy_`, the path `KVCache`
takes off CUDA), on fresh random K/V: the same bytes must land in the same slots, nothing else may
change. Both round once to the cache's dtype (e4m3 after the same float32 division), so the
bound is equality. Skips without a GPU and Triton.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from services.common.kernels.kv_write import write_kv, write_kv_reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
    reason="needs a CUDA GPU and Triton",
)


@pytest.mark.parametrize("scale", [1.0, 0.37])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float32])
@pytest.mark.parametrize("tokens", [1, 64, 333])
def test_write_matches_index_copy(tokens, cache_dtype, scale):
    slots_total, groups, dim = 4096, 1, 256
    k_cache = torch.randn(slots_total, groups, dim, device="cuda").to(cache_dtype)
    v_cache = torch.randn(slots_total, groups, dim, device="cuda").to(cache_dtype)
    slots = torch.randperm(slots_total, device="cuda")[:tokens]
    qkv = torch.randn(tokens, 2560, device="cuda").bfloat16() * 100  # past e4m3's range too
    k = qkv[:, 2048:2304].reshape(tokens, groups, dim).contiguous()
    v = qkv[:, 2304:].view(tokens, groups, dim)  # strided rows, as the fused projection's
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    write_kv_reference(expected_k, expected_v, slots, k, v, scale, scale)
    write_kv(k_cache, v_cache, slots, k, v, scale, scale)
    assert torch.equal(k_cache.view(torch.uint8), expected_k.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), expected_v.view(torch.uint8))


def test_rows_that_do_not_fit_the_cache_are_refused_and_no_rows_write_nothing():
    cache = torch.zeros(64, 1, 256, device="cuda", dtype=torch.bfloat16)
    slots = torch.arange(2, device="cuda")
    with pytest.raises(ValueError, match="do not fit"):
        write_kv(
            cache,
            cache.clone(),
            slots,
            torch.ones(2, 1, 128, device="cuda"),
            torch.ones(2, 1, 128, device="cuda"),
        )
    empty = torch.empty(0, 1, 256, device="cuda")
    write_kv(cache, cache, slots[:0], empty, empty)
    assert not cache.any()
