"""Decode steps replayed from CUDA graphs give what eager steps give, on a GPU.

The graphs pad the batch to a bucket (padding rows write a scratch block) and widen the block
tables to a context bucket, so the decode kernel may split contexts differently from an eager
step: bf16 sums in another order, so a near-tie may flip a token. The tests allow that much
and no more, and check that graphs were really used.
"""

from __future__ import annotations

import pytest
import torch

from services.attention.builder import local_engine
from services.attention.engine import EngineConfig
from services.attention.scheduler import SchedulerConfig
from services.common.sampling_params import SamplingParams
from tests.support.models import random_model, small_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# 16 query heads of 32 sharing one K/V head: the smallest shape the MFA decode kernel takes.
CFG = small_config(num_attention_heads=16, head_dim=32)
PROMPTS = [[7 + 13 * i + j for j in range(n)] for i, n in enumerate((1, 9, 17, 40, 5, 33, 70, 3))]
PARAMS = SamplingParams(max_tokens=40, temperature=0.0, logprobs=0, ignore_eos=True)


def engine(model, graphs: bool, max_num_seqs: int = 32):
    config = EngineConfig(
        block_size=16,
        num_kv_blocks=256,
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64),
        cuda_graphs=graphs,
    )
    return local_engine(model, config)


def assert_same_generations(fast, plain) -> None:
    same = [f.token_ids == p.token_ids for f, p in zip(fast, plain, strict=True)]
    assert sum(same) >= len(same) - 1
    for f, p in zip(fast, plain, strict=True):
        shorter = min(len(f.token_ids), len(p.token_ids))
        pairs = zip(f.token_ids, p.token_ids, strict=False)
        agree = next((i for i, (a, b) in enumerate(pairs) if a != b), shorter)
        for a, b in zip(f.logprobs[:agree], p.logprobs[:agree], strict=True):
            assert abs(a.logprob - b.logprob) < 0.05


def test_graph_replayed_decode_gives_the_eager_tokens_and_logprobs():
    model = random_model(CFG, torch.bfloat16, device="cuda")
    graphed = engine(model, graphs=True)
    fast = graphed.generate(PROMPTS, PARAMS)
    plain = engine(model, graphs=False).generate(PROMPTS, PARAMS)
    assert_same_generations(fast, plain)
    graphs = graphed.runner.graphs
    assert graphs.enabled and graphs.graphs  # the decode steps did replay
    # Every request generates 40 tokens, so once all 8 decode, each step is a batch of 8.
    assert {batch for batch, _ in graphs.graphs} >= {8}


def test_padding_rows_leave_every_sequence_cache_alone():
    # 3 sequences pad to bucket 4; a lone sequence afterwards reads only its own cache.
    model = random_model(CFG, torch.bfloat16, device="cuda")
    graphed = engine(model, graphs=True)
    first = graphed.generate(PROMPTS[:3], PARAMS)
    alone = graphed.generate(PROMPTS[3:4], PARAMS)
    plain = engine(model, graphs=False)
    assert_same_generations(first + alone, plain.generate(PROMPTS[:4], PARAMS))
    assert (4, 64) in graphed.runner.graphs.graphs


def test_a_batch_larger_than_max_num_seqs_never_reaches_a_graph_and_float32_never_captures():
    model = random_model(CFG, torch.float32, device="cuda")
    assert engine(model, graphs=True).runner.graphs is None  # the kernel serves 16-bit caches
    bf16 = random_model(CFG, torch.bfloat16, device="cuda")
    graphs = engine(bf16, graphs=True, max_num_seqs=6).runner.graphs
    assert graphs.inputs.batch_buckets == [1, 2, 4, 6] and not graphs.fits(7)
