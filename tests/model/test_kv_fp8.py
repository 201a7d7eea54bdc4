"""An FP8 (e4m3) KV cache: what it stores comes back within e4m3's precision, it holds
several times the tokens in the same bytes, and the engine over it tracks the engine over a
full-precision cache."""

from __future__ import annotations

import pytest
import torch

from services.attention.builder import local_engine
from services.attention.engine import EngineConfig, default_num_kv_blocks
from services.attention.kv_cache import KVCache
from services.attention.scheduler import SchedulerConfig
from services.common.sampling_params import SamplingParams
from tests.support.models import random_model, small_config

CFG = small_config()
PROMPTS = [[3 + 17 * i + j for j in range(n)] for i, n in enumerate((1, 6, 19, 33))]


def test_what_an_fp8_cache_stores_comes_back_within_e4m3_precision():
    cache = KVCache(CFG, num_blocks=8, block_size=4, dtype=torch.float32, device="cpu",
                    kv_dtype=torch.float8_e4m3fn)  # fmt: skip
    assert cache.k.dtype == torch.float8_e4m3fn and cache.fp8
    g = torch.Generator().manual_seed(0)
    k = torch.randn(5, 1, CFG.head_dim, generator=g) * 3
    v = torch.randn(5, 1, CFG.head_dim, generator=g)
    v[0, 0, 0] = 1e6  # beyond e4m3: clamped to its largest value, never NaN
    slots = torch.tensor([0, 3, 7, 12, 30])
    cache.write(2, slots, k, v)
    k_back, v_back = cache.read(2, slots, torch.float32)
    assert k_back.dtype == torch.float32
    # e4m3 keeps 3 mantissa bits: within 1/16 of each value (plus the subnormal floor).
    assert ((k_back - k).abs() <= k.abs() / 16 + 2**-9).all()
    assert v_back[0, 0, 0] == 448.0 and not v_back.isnan().any()
    assert ((v_back - v).abs()[1:] <= v.abs()[1:] / 16 + 2**-9).all()
    assert cache.read(1, slots, torch.float32)[0].abs().max() == 0  # other layers untouched


def test_an_fp8_cache_holds_four_times_the_tokens_of_a_float32_one():
    block = KVCache.bytes_per_block(CFG, 4, torch.float32)  # K and V of every layer
    budget = 100 * block
    config = EngineConfig(kv_cache_bytes=budget, block_size=4)
    fp8 = EngineConfig(kv_cache_bytes=budget, block_size=4, kv_cache_dtype="fp8")
    assert default_num_kv_blocks(CFG, config, torch.float32) == 100
    assert default_num_kv_blocks(CFG, fp8, torch.float32) == 400


def test_an_unknown_kv_cache_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="kv cache dtype must be one of auto, fp8, got 'int4'"):
        EngineConfig(kv_cache_dtype="int4")


def test_the_engine_over_an_fp8_cache_tracks_a_full_precision_one():
    model = random_model(CFG, torch.float32)
    params = SamplingParams(max_tokens=10, temperature=0.0, logprobs=0, ignore_eos=True)

    def engine(kv: str):
        config = EngineConfig(
            block_size=4, num_kv_blocks=64, kv_cache_dtype=kv,
            scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16),
        )  # fmt: skip
        return local_engine(model, config)

    fp8 = engine("fp8").generate(PROMPTS, params)
    full = engine("auto").generate(PROMPTS, params)
    first_agree = sum(a.token_ids[0] == b.token_ids[0] for a, b in zip(fp8, full, strict=True))
    assert first_agree >= len(PROMPTS) - 1
    for a, b in zip(fp8, full, strict=True):
        pairs = zip(a.token_ids, b.token_ids, strict=True)
        agree = next((i for i, (x, y) in enumerate(pairs) if x != y), len(a.token_ids))
        # e4m3 keeps each K and V value to ~3% (3 mantissa bits); through the softmax and
        # five layers of this random model that moves a token's logprob by up to ~0.15.
        for x, y in zip(a.logprobs[:agree], b.logprobs[:agree], strict=True):
            assert abs(x.logprob - y.logprob) < 0.3
