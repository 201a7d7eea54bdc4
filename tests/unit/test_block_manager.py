"""The block manager's bookkeeping: allocation, sharing of cached prefixes, LRU eviction."""

from services.attention.block_manager import BlockManager
from services.attention.sequence import Sequence
from services.common.sampling_params import SamplingParams


def make_seq(tokens, request_id="r"):
    return Sequence(request_id, list(tokens), SamplingParams())


def compute(manager, seq, num_tokens, cached=()):
    """What the scheduler and engine do for one chunk: allocate, compute, register."""
    assert manager.allocate(seq, num_tokens, list(cached))
    seq.num_computed_tokens += len(cached) * manager.block_size + num_tokens
    manager.cache_full_blocks(seq)


def test_allocate_rounds_up_to_blocks_and_free_returns_them():
    manager = BlockManager(num_blocks=10, block_size=4)
    seq = make_seq(range(9))
    assert manager.allocate(seq, 9)
    assert len(seq.block_table) == 3 and manager.num_free_blocks == 7
    seq.num_computed_tokens = 9
    assert manager.allocate(seq, 3)  # positions 9..11 still fit in block 3
    assert len(seq.block_table) == 3
    assert manager.allocate(seq, 4)  # 12 computed + ... crosses into a fourth block
    assert len(seq.block_table) == 4
    manager.free(seq)
    assert seq.block_table == [] and manager.num_free_blocks == 10


def test_allocate_is_all_or_nothing():
    manager = BlockManager(num_blocks=3, block_size=4)
    seq = make_seq(range(20))
    assert not manager.allocate(seq, 20)
    assert seq.block_table == [] and manager.num_free_blocks == 3


def test_prefix_is_shared_and_leaves_one_token_to_compute():
    manager = BlockManager(num_blocks=16, block_size=4)
    first = make_seq(range(12), "a")
    compute(manager, first, 12)
    assert manager.num_cached_blocks == 3

    # Same 12 tokens: only 2 blocks may be hit, the last token must be computed for logits.
    again = make_seq(range(12), "b")
    hits = manager.lookup_prefix(again.token_ids)
    assert hits == first.block_table[:2]

    longer = make_seq([*range(12), 99, 98], "c")
    hits = manager.lookup_prefix(longer.token_ids)
    assert hits == first.block_table[:3]
    compute(manager, longer, 2, hits)
    assert longer.block_table[:3] == first.block_table[:3]
    assert manager.blocks[first.block_table[0]].ref_count == 2

    different = make_seq([*range(4), 7, 7, 7, 7, 8], "d")
    assert manager.lookup_prefix(different.token_ids) == first.block_table[:1]


def test_hash_chains_through_the_prefix():
    """A block with the same tokens after a different prefix is a different block."""
    manager = BlockManager(num_blocks=16, block_size=2)
    compute(manager, make_seq([1, 2, 3, 4, 0]), 5)
    assert manager.lookup_prefix([9, 9, 3, 4, 0]) == []


def test_freed_cached_blocks_survive_until_needed_then_lru_evicted():
    manager = BlockManager(num_blocks=4, block_size=2)
    old = make_seq([1, 2, 3, 4], "old")
    compute(manager, old, 4)
    manager.free(old)
    assert manager.num_free_blocks == 4 and manager.num_cached_blocks == 2
    assert manager.lookup_prefix([1, 2, 3, 4, 5]) == [0, 1]

    # Two fresh blocks come from never-used ones first; the cache is intact.
    other = make_seq([7, 7, 7, 7], "other")
    assert manager.allocate(other, 4)
    assert sorted(other.block_table) == [2, 3]
    assert manager.lookup_prefix([1, 2, 3, 4, 5]) == [0, 1]

    # Now space is short: the least recently freed cached block is evicted first. `old` freed
    # its tail (block 1) before its head (block 0), so the head lives longest.
    third = make_seq([5], "third")
    assert manager.allocate(third, 1)
    assert third.block_table == [1]
    assert manager.lookup_prefix([1, 2, 3, 4, 5]) == [0]


def test_reviving_a_cached_block_takes_it_out_of_the_free_pool():
    manager = BlockManager(num_blocks=3, block_size=2)
    first = make_seq([1, 2, 3], "a")
    compute(manager, first, 3)
    manager.free(first)
    hits = manager.lookup_prefix([1, 2, 3])
    second = make_seq([1, 2, 3], "b")
    assert manager.allocate(second, 1, hits)
    assert manager.num_free_blocks == 1
    assert manager.blocks[hits[0]].ref_count == 1


def test_twin_blocks_computed_concurrently_do_not_corrupt_the_cache():
    manager = BlockManager(num_blocks=8, block_size=2)
    a, b = make_seq([1, 2, 3], "a"), make_seq([1, 2, 3], "b")
    compute(manager, a, 3)
    compute(manager, b, 3)
    assert manager.lookup_prefix([1, 2, 3]) == [a.block_table[0]]
    manager.free(b)  # b's private twin is reused without touching a's entry
    assert manager.allocate(make_seq([0] * 8, "c"), 8)
    assert manager.lookup_prefix([1, 2, 3]) == [a.block_table[0]]


def test_prefix_caching_can_be_disabled():
    manager = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    compute(manager, make_seq([1, 2, 3]), 3)
    assert manager.lookup_prefix([1, 2, 3]) == [] and manager.num_cached_blocks == 0
