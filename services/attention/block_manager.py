"""The paged KV cache's bookkeeping: which fixed-size blocks each sequence owns.

Blocks are reference counted so sequences with a common prefix share them (automatic prefix
caching). A block that fills up is keyed by the hash of its tokens and of the blocks before
it; when its last owner finishes it stays findable until the space is needed, reused least
recently freed first. Plain Python: no tensors, no knowledge of layers or dtypes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from services.attention.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set once full and computed
    token_ids: tuple[int, ...] = ()  # kept to rule out hash collisions


def chain_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    """A full block's key: its tokens and, through `parent`, every token before it."""
    return hash((parent, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need at least one block of one slot, got {num_blocks} x {block_size}"
            )
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Unowned blocks, least recently freed first; cached ones among them can still be hit.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def lookup_prefix(self, token_ids: list[int]) -> list[int]:
        """Ids of cached blocks holding the longest full-block prefix of `token_ids`.

        Leaves at least one token uncached: the engine needs its logits to sample.
        Takes no references; pass the result to `allocate`.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent: int | None = None
        for start in range(0, len(token_ids) - 1 - self.block_size + 1, self.block_size):
            tokens = tuple(token_ids[start : start + self.block_size])
            parent = chain_hash(parent, tokens)
            block_id = self._cached.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> bool:
        """Make room for `num_new_tokens` after the computed ones, all or nothing.

        `cached` (only for a sequence without blocks) are prefix hits from `lookup_prefix`;
        they count as computed. Returns False, changing nothing, when blocks run out.
        """
        if cached and seq.block_table:
            raise ValueError("prefix hits can only start a sequence's block table")
        num_computed = seq.num_computed_tokens + len(cached) * self.block_size
        num_needed = self.num_blocks_for(num_computed + num_new_tokens)
        num_fresh = num_needed - len(seq.block_table) - len(cached)
        num_revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        if num_fresh + num_revived > self.num_free_blocks:
            return False
        for block_id in cached:
            self._take(block_id)
            seq.block_table.append(block_id)
        for _ in range(max(num_fresh, 0)):
            seq.block_table.append(self._take_fresh())
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Key every block of `seq` that is now full and computed, so others can share it."""
        if not self.enable_prefix_caching:
            return
        parent: int | None = None
        for index in range(seq.num_computed_tokens // self.block_size):
            block = self.blocks[seq.block_table[index]]
            if block.block_hash is None:
                start = index * self.block_size
                block.token_ids = tuple(seq.token_ids[start : start + self.block_size])
                block.block_hash = chain_hash(parent, block.token_ids)
                # A twin computed concurrently keeps the entry; this block stays private.
                self._cached.setdefault(block.block_hash, block.block_id)
            parent = block.block_hash

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references. Its last blocks go first in line for reuse, so a prefix
        shared by many requests outlives their individual tails."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        seq.block_table = []

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that nobody holds."""
        for block_id in self._free:
            self._forget(self.blocks[block_id])

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _take_fresh(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        self._forget(block)  # evicted: its old contents are about to be overwritten
        block.ref_count = 1
        return block_id

    def _forget(self, block: Block) -> None:
        if block.block_hash is not None and self._cached.get(block.block_hash) == block.block_id:
            del self._cached[block.block_hash]
        block.block_hash = None
        block.token_ids = ()
