"""A decode batch's inputs in buffers allocated once: what a CUDA graph of a decode step reads.

A graph replays the kernels it captured on the addresses it captured, so every input of a
replayed step lives in a buffer of its own that each step refills first. The batch is padded
up to the next of `BATCH_BUCKETS`; padding rows read and write one position of the cache's
scratch block, so no sequence's K/V is touched. The block tables are as wide as the context
bucket (the longest sequence rounded up to a power of two blocks): the decode kernel splits
contexts by that width, so one graph for the longest allowed context would leave a short
batch's GPU mostly idle. A graph is keyed by the (batch bucket, context bucket) it serves.

Used by the whole-step graphs (decode_graphs.py) and, one set per micro-batch slot, by the
segment graphs of disaggregated steps (segment_graphs.py).
"""

from __future__ import annotations

from bisect import bisect_left

import torch
from torch import Tensor

from services.attention.kv_cache import DecodeBatch, KVCache, PagedAttention
from services.attention.step_inputs import StepInputs
from services.common.kernels import mfa_decode

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)
MIN_CONTEXT_BLOCKS = 64  # the smallest context bucket: 1024 positions at block size 16

GraphKey = tuple[int, int]  # (batch bucket, context bucket in blocks)


class StaticDecodeInputs:
    def __init__(self, cache: KVCache, scale: float, max_batch: int, max_context: int) -> None:
        """`scale`: attention's softmax scale (head_dim ** -0.5)."""
        self.cache = cache
        self.scale = scale
        self.batch_buckets = [b for b in BATCH_BUCKETS if b < max_batch] + [max_batch]
        self.max_blocks = -(-max_context // cache.block_size)
        device = cache.k.device
        n = self.batch_buckets[-1]
        self.token_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.new_slots = torch.zeros(n, dtype=torch.long, device=device)
        self.tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=device)
        self.lens = torch.ones(n, dtype=torch.int32, device=device)
        self.rows = torch.arange(n, device=device)

    def fits(self, batch: int) -> bool:
        return batch <= self.batch_buckets[-1]

    def load(self, inputs: StepInputs) -> GraphKey | None:
        """Copy a decode-only step's inputs in and pad them; the key of the graph that serves
        them, or None (and nothing copied) for a step no graph serves: not decode-only, or
        too large."""
        backend = inputs.backend
        decode = backend.decode
        if decode is None or backend.spans or not self.fits(inputs.num_tokens):
            return None
        n, width = inputs.num_tokens, decode.block_tables.shape[1]
        batch = self.batch_buckets[bisect_left(self.batch_buckets, n)]
        blocks = min(max(MIN_CONTEXT_BLOCKS, 1 << (width - 1).bit_length()), self.max_blocks)
        self.token_ids[:n].copy_(inputs.token_ids)
        self.positions[:n].copy_(inputs.positions)
        self.new_slots[:n].copy_(backend.new_slots)
        self.tables[:n, :width].copy_(decode.block_tables)
        self.lens[:n].copy_(decode.context_lens)
        if batch > n:  # padding: one position of the scratch block
            self.token_ids[n:batch].zero_()
            self.positions[n:batch].zero_()
            self.new_slots[n:batch].fill_(self.cache.scratch_block * self.cache.block_size)
            self.tables[n:batch, 0].fill_(self.cache.scratch_block)
            self.lens[n:batch].fill_(1)
        return batch, blocks

    def backend(self, key: GraphKey) -> PagedAttention:
        """Attention over the cache for the first `batch` rows, as a graph of `key` captures it."""
        batch, blocks = key
        cache = self.cache
        splits = mfa_decode.default_num_splits(
            batch, blocks * cache.block_size, cache.k.dtype, cache.k.device
        )
        decode = DecodeBatch(self.rows[:batch], self.tables[:batch, :blocks], self.lens[:batch],
                             splits)  # fmt: skip
        return PagedAttention(cache, self.new_slots[:batch], [], self.scale, decode)

    def step_inputs(self, key: GraphKey) -> tuple[Tensor, Tensor, PagedAttention]:
        """(token ids, positions, attention) of the first `batch` rows."""
        batch = key[0]
        return self.token_ids[:batch], self.positions[:batch], self.backend(key)
