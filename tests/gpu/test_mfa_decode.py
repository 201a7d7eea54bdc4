"""The Triton MFA decode kernel against its plain-torch reference, on fresh random inputs.

Skipped without CUDA or Triton (CI has neither); run on a GPU machine with
`pytest tests/gpu/test_mfa_decode.py`.

Error bound: ||out - ref|| / ||ref|| per sequence, the reference in float32. The kernel's
products are exact and its sums fp32; what remains is rounding the softmax weights to the
16-bit dot operand and the output to bf16, each ~2^-9 relative, so 5e-3 is about twice what
rounding alone gives and far under what one wrong token, split or page would cost. FP8 KV is
held to the same bound against the reference on the dequantised cache: e4m3 widens exactly to
fp16, so quantisation is not the kernel's error.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import pytest
import torch

from services.common.kernels.fp8 import FP8_MAX
from services.common.kernels.mfa_decode import CONFIGS, mfa_decode, mfa_decode_reference

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton"),
]

HEADS, HEAD_DIM = 64, 256  # Step-3: 64 query heads share one K/V head of 256
SCALE = HEAD_DIM**-0.5
REL_ERR = 5e-3

CONTEXTS = {
    "one_token": [1],
    "ragged": [1, 15, 16, 17, 100, 333, 1000, 2049],  # lengths on and off page boundaries
    "long": [4096, 3001, 5000],
    "many_uniform": [512] * 40,
}


def random_inputs(context_lens: list[int], block_size: int, kv_dtype: torch.dtype, seed: int):
    """A paged cache whose blocks are handed out in shuffled order, with slack blocks between.

    Returns q, k_cache, v_cache, block_tables, context_lens, k_scale, v_scale; the block
    tables are a strided view padded with -1 past each sequence's last block.
    """
    gen = torch.Generator("cuda").manual_seed(seed)
    batch = len(context_lens)
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    width = max(blocks_per_seq) + 3
    num_blocks = 2 * sum(blocks_per_seq) + 7
    order = torch.randperm(num_blocks, generator=gen, device="cuda").int()
    tables = torch.full((batch, 2 * width), -1, dtype=torch.int32, device="cuda")
    used = 0
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = order[used : used + n]
        used += n
    tables = tables[:, :width]  # row stride 2 * width: not contiguous

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=gen, device="cuda") * std

    q = randn(batch, HEADS, HEAD_DIM, std=2.0).bfloat16()  # std 2: peaked and flat heads
    k = randn(num_blocks * block_size, 1, HEAD_DIM)
    v = randn(num_blocks * block_size, 1, HEAD_DIM)
    lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    if kv_dtype != torch.float8_e4m3fn:
        return q, k.to(kv_dtype), v.to(kv_dtype), tables, lens, None, None
    k_scale, v_scale = k.abs().max().item() / FP8_MAX, v.abs().max().item() / FP8_MAX
    k8, v8 = (k / k_scale).to(torch.float8_e4m3fn), (v / v_scale).to(torch.float8_e4m3fn)
    return q, k8, v8, tables, lens, k_scale, v_scale


def check(context_lens, block_size, kv_dtype, num_splits, config=None, bound=None):
    seed = int.from_bytes(os.urandom(4), "little")
    q, k, v, tables, lens, k_scale, v_scale = random_inputs(
        context_lens, block_size, kv_dtype, seed
    )
    kwargs = dict(block_size=block_size, k_scale=k_scale, v_scale=v_scale)
    out = mfa_decode(q, k, v, tables, lens, SCALE, num_splits=num_splits, config=config, **kwargs)
    ref = mfa_decode_reference(q, k, v, tables, lens, SCALE, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), f"seed {seed}"
    err = (out.float() - ref.float()).flatten(1).norm(dim=1) / ref.float().flatten(1).norm(dim=1)
    worst = int(err.argmax())
    assert err.max() < (bound or REL_ERR), (
        f"seed {seed}: sequence {worst} (context {context_lens[worst]}) has relative error "
        f"{err.max():.2e}"
    )


@pytest.mark.parametrize("num_splits", [1, 3, None], ids=["unsplit", "3splits", "auto"])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("contexts", CONTEXTS.values(), ids=CONTEXTS.keys())
def test_bf16_matches_reference(contexts, block_size, num_splits):
    check(contexts, block_size, torch.bfloat16, num_splits)


@pytest.mark.parametrize("num_splits", [1, None], ids=["unsplit", "auto"])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("contexts", ["ragged", "long"])
def test_fp8_kv_matches_reference_on_the_dequantised_cache(contexts, block_size, num_splits):
    check(CONTEXTS[contexts], block_size, torch.float8_e4m3fn, num_splits)


# e4m3 products: the queries (and the probabilities) rounded to e4m3 too, ~3% per value.
FP8_MMA = {
    "qk": dataclasses.replace(CONFIGS["fp8"], fp8_mma=True, fp8_pv=False),
    "qk_pv": dataclasses.replace(CONFIGS["fp8"], fp8_mma=True, v_transposed=True),
}


@pytest.mark.parametrize("num_splits", [1, None], ids=["unsplit", "auto"])
@pytest.mark.parametrize("config", FP8_MMA.values(), ids=FP8_MMA.keys())
@pytest.mark.parametrize("contexts", ["ragged", "long"])
def test_fp8_kv_on_e4m3_tensor_cores_stays_within_its_rounding(contexts, config, num_splits):
    check(CONTEXTS[contexts], 16, torch.float8_e4m3fn, num_splits, config, bound=6e-2)


def test_more_splits_than_a_short_sequence_has_tokens():
    """Splits past a sequence's end see no tokens and must weigh nothing in the merge."""
    check([2, 3000], 16, torch.bfloat16, num_splits=12)


def test_split_attention_is_deterministic():
    """The splits merge in a fixed order, so the same inputs give the same bits."""
    q, k, v, tables, lens, _, _ = random_inputs([4000, 2500, 9], 16, torch.bfloat16, seed=1)
    first = mfa_decode(q, k, v, tables, lens, SCALE, num_splits=8)
    for _ in range(5):
        assert torch.equal(mfa_decode(q, k, v, tables, lens, SCALE, num_splits=8), first)


def test_fp16_cache_and_flat_cache_shape():
    q, k, v, tables, lens, _, _ = random_inputs([77, 1500], 16, torch.float16, seed=0)
    q = q.half()
    out = mfa_decode(q, k[:, 0], v[:, 0], tables, lens, SCALE)  # [num_slots, D] caches
    ref = mfa_decode_reference(q, k, v, tables, lens, SCALE)
    assert out.dtype == torch.float16
    assert (out.float() - ref.float()).norm() / ref.float().norm() < REL_ERR
