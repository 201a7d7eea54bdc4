"""A disaggregated decode step's segments replayed from CUDA graphs give what eager steps give.

The AFD attention instance replays, per layer and micro-batch, the GPU work between two
transfers (segment_graphs.py). Its transfers need a second GPU; what the graphs themselves do
(static per-slot inputs padded to buckets, the residual stream in two buffers, the embedding
in the first segment, the FFN output read back from the executor's buffers) does not, so these
tests replay segments around the in-process executor, with 1 to 3 micro-batches, against the
same engine run eagerly. Tolerances as in test_decode_graphs.py (the decode kernel may split
a padded batch differently).
"""

from __future__ import annotations

import pytest
import torch

from services.attention.builder import local_engine
from services.attention.engine import Engine, EngineConfig
from services.attention.ffn_executor import LocalFFN
from services.attention.kv_cache import KVCache
from services.attention.model_runner import ModelRunner
from services.attention.scheduler import SchedulerConfig
from tests.gpu.test_decode_graphs import CFG, PARAMS, PROMPTS, assert_same_generations
from tests.support.models import random_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MAX_CONTEXT = 256 * 16


CONFIG = EngineConfig(
    block_size=16,
    num_kv_blocks=256,
    scheduler=SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=64),
    cuda_graphs=False,
)


def engine(model, num_micro_batches: int, segments: bool):
    built = local_engine(model, CONFIG, num_micro_batches=num_micro_batches)
    if segments:
        built.runner.use_graphs(32, MAX_CONTEXT, whole_steps=False)
    return built


@pytest.mark.parametrize("num_micro_batches", [1, 2, 3])
def test_segment_replayed_decode_gives_the_eager_tokens_and_logprobs(num_micro_batches):
    model = random_model(CFG, torch.bfloat16, device="cuda")
    segmented = engine(model, num_micro_batches, segments=True)
    fast = segmented.generate(PROMPTS, PARAMS)
    plain = engine(model, num_micro_batches, segments=False).generate(PROMPTS, PARAMS)
    assert_same_generations(fast, plain)
    graphs = segmented.runner.segments
    assert graphs.enabled
    # Every layer of every micro-batch slot replayed from a graph of its own.
    layers, slots = CFG.num_hidden_layers, range(num_micro_batches)
    assert {(i, s) for i, s, _ in graphs.graphs} == {(i, s) for i in range(layers) for s in slots}


def test_padded_micro_batches_leave_every_sequence_alone():
    # 3 and 2 sequences pad to buckets 4 and 2; lone sequences afterwards read only their own.
    model = random_model(CFG, torch.bfloat16, device="cuda")
    segmented = engine(model, 2, segments=True)
    first = segmented.generate(PROMPTS[:5], PARAMS)
    alone = segmented.generate(PROMPTS[5:6], PARAMS)
    plain = engine(model, 2, segments=False).generate(PROMPTS[:6], PARAMS)
    assert_same_generations(first + alone, plain)
    assert {key[0] for _, _, key in segmented.runner.segments.graphs} >= {4, 2, 1}


class FirstStaged(LocalFFN):
    """The in-process executor, keeping each (layer, slot, rows)'s first staged expert ids:
    a segment's first run is the eager one before its capture, so they hold real values."""

    def __init__(self, ffn) -> None:
        super().__init__(ffn)
        self.ids = {}

    def stage(self, layer, slot, x) -> None:
        if x.ids is not None:
            self.ids.setdefault((layer, slot, x.ids.shape[0]), x.ids.clone())
        super().stage(layer, slot, x)


def test_padding_rows_route_to_no_expert():
    model = random_model(CFG, torch.bfloat16, device="cuda")
    cache = KVCache(CFG, 256, 16, torch.bfloat16, "cuda")
    executor = FirstStaged(model.ffn)
    runner = ModelRunner(model.attention, executor, cache)
    runner.use_graphs(32, MAX_CONTEXT, whole_steps=False)
    Engine(runner, 256, CONFIG).generate([[7], [20], [33]], PARAMS)  # 3 rows pad to 4
    layer = CFG.moe_layers[0]
    ids = executor.ids[(layer, 0, 4)]
    no_expert = CFG.moe_num_experts
    assert (ids[3] == no_expert).all() and (ids[:3] < no_expert).all()


def test_graphs_over_replaced_executor_buffers_are_captured_again():
    # A new epoch with another number of FFN instances replaces the receive buffers.
    model = random_model(CFG, torch.bfloat16, device="cuda")
    segmented = engine(model, 1, segments=True)
    segmented.generate(PROMPTS[:2], PARAMS)
    old = dict(segmented.runner.segments.graphs)
    segmented.runner.ffn.generation = 1
    again = segmented.generate(PROMPTS[2:4], PARAMS)
    assert_same_generations(again, engine(model, 1, segments=False).generate(PROMPTS[2:4], PARAMS))
    graphs = segmented.runner.segments.graphs
    assert graphs and not any(graphs.get(key) is graph for key, graph in old.items())
