"""Scheduling invariants: token budget, chunked prefill, decode priority, preemption."""

import pytest

from services.attention.block_manager import BlockManager
from services.attention.scheduler import Scheduler, SchedulerConfig
from services.attention.sequence import Sequence, SequenceStatus
from services.common.sampling_params import SamplingParams


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=16, caching=True):
    manager = BlockManager(num_blocks, block_size, caching)
    return Scheduler(SchedulerConfig(max_num_seqs, budget), manager)


def add(scheduler, request_id, num_tokens, first_token=0):
    seq = Sequence(request_id, list(range(first_token, first_token + num_tokens)), SamplingParams())
    scheduler.add(seq)
    return seq


def run_step(scheduler, next_token=1):
    """One engine step without a model: computed chunks, a token for each sampling chunk."""
    out = scheduler.schedule()
    scheduler.update(out)
    for chunk in out.chunks:
        if chunk.samples:
            chunk.seq.token_ids.append(next_token)
    return out


def test_long_prompt_is_chunked_and_decodes_keep_running():
    scheduler = make_scheduler(budget=8)
    short = add(scheduler, "short", 3)
    out = run_step(scheduler)
    assert [(c.seq, c.num_tokens) for c in out.chunks] == [(short, 3)]
    long = add(scheduler, "long", 20, first_token=100)

    seen = []
    for _ in range(4):
        out = run_step(scheduler)
        assert out.num_tokens <= 8
        # The running decode is scheduled first, every step, with exactly one token.
        assert out.chunks[0].seq is short and out.chunks[0].num_tokens == 1
        seen += [c.num_tokens for c in out.chunks if c.seq is long]
    assert seen == [7, 7, 6, 1]  # 20 prompt tokens in budget-sized chunks, then a decode
    assert long.num_computed_tokens == 21 and long.num_tokens == 22


def test_only_the_final_chunk_samples():
    scheduler = make_scheduler(budget=5)
    add(scheduler, "a", 12)
    flags = [run_step(scheduler).chunks[0].samples for _ in range(3)]
    assert flags == [False, False, True]


def test_max_num_seqs_caps_the_running_set():
    scheduler = make_scheduler(max_num_seqs=2, budget=100)
    for i in range(4):
        add(scheduler, f"r{i}", 3)
    out = run_step(scheduler)
    assert len(out.chunks) == 2 and len(scheduler.waiting) == 2


def test_admission_waits_for_free_blocks_in_arrival_order():
    scheduler = make_scheduler(num_blocks=4, block_size=4, budget=100)
    add(scheduler, "big", 12)  # 3 blocks
    add(scheduler, "next", 8)  # 2 blocks: must wait
    add(scheduler, "tiny", 1)  # would fit, but arrival order is kept
    out = run_step(scheduler)
    assert [c.seq.request_id for c in out.chunks] == ["big"]
    assert [s.request_id for s in scheduler.waiting] == ["next", "tiny"]


def test_preemption_frees_the_newest_sequence_and_it_recomputes():
    scheduler = make_scheduler(num_blocks=4, block_size=2, budget=100, caching=False)
    first, second = add(scheduler, "first", 3), add(scheduler, "second", 3)
    run_step(scheduler)  # each holds 2 blocks; 4 tokens each now
    out = run_step(scheduler)  # both decode within their 2 blocks; 5 tokens each
    assert not out.preempted
    out = run_step(scheduler)  # first needs a third block: second is preempted
    assert out.preempted == [second]
    assert second.status is SequenceStatus.WAITING and second.num_computed_tokens == 0
    assert second.block_table == [] and scheduler.waiting[0] is second
    assert [c.seq for c in out.chunks] == [first]
    assert second.num_preemptions == 1

    scheduler.finish(first, "stop")
    out = run_step(scheduler)  # second comes back and recomputes all its 5 tokens at once
    assert [(c.seq, c.start, c.num_tokens, c.samples) for c in out.chunks] == [(second, 0, 5, True)]


def test_a_lone_sequence_that_runs_out_preempts_itself_rather_than_hang():
    scheduler = make_scheduler(num_blocks=2, block_size=2, budget=100, caching=False)
    seq = add(scheduler, "only", 3)
    run_step(scheduler)
    run_step(scheduler)  # 4 tokens computed: both blocks full
    out = run_step(scheduler)  # the 5th token needs a third block that does not exist
    assert out.preempted == [seq] and out.chunks == []


def test_prefix_hits_skip_computation():
    scheduler = make_scheduler(block_size=4, budget=100)
    first = add(scheduler, "first", 9)
    run_step(scheduler)
    second = add(scheduler, "second", 10)  # same first 9 tokens
    out = run_step(scheduler)
    chunk = next(c for c in out.chunks if c.seq is second)
    assert (chunk.start, chunk.num_tokens) == (8, 2)
    assert second.num_cached_tokens == 8
    assert second.block_table[:2] == first.block_table[:2]


def test_finish_releases_blocks_from_any_queue():
    scheduler = make_scheduler(num_blocks=8, block_size=4)
    running, waiting = add(scheduler, "run", 4), add(scheduler, "wait", 4)
    scheduler.config = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=16)
    run_step(scheduler)
    scheduler.finish(running, "abort")
    scheduler.finish(waiting, "abort")
    assert scheduler.num_unfinished == 0
    assert scheduler.block_manager.num_free_blocks == 8
    assert running.finish_reason == "abort" and running.is_finished


def test_config_is_validated():
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
