"""Decode steps replayed from CUDA graphs.

At serving batch sizes a decode step in eager PyTorch is bound by launches, not by the GPU:
each layer is some fifty kernels of a few microseconds of GPU work each, and Python and the
driver spend longer than that issuing every one. A CUDA graph of the whole forward issues
them in one launch. Graphs are captured on first use, one per (batch bucket, context bucket):
- the batch is padded up to the next of `BATCH_BUCKETS`; padding rows read and write one
  position of the cache's scratch block, so no sequence's K/V is touched;
- the block tables are as wide as the context bucket (the longest sequence rounded up to a
  power of two blocks): the decode kernel splits contexts by that width, so one graph for
  the longest allowed context would leave a short batch's GPU mostly idle.
Every input lives in a static buffer that each step refills before replaying.

What this module does not know: the model (it captures the runner's `decode_logits`),
scheduling or sampling; `run` answers None for a step it does not serve (not decode-only,
too large, or a capture failed), which the runner then computes eagerly.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable

import torch
from torch import Tensor

from services.attention.kv_cache import DecodeBatch, KVCache, PagedAttention
from services.attention.step_inputs import StepInputs
from services.common.cuda_graph import capture
from services.common.kernels import mfa_decode
from services.common.model.moe import GROUPED_DTYPES

# (token ids [B], positions [B], attention over the cache) -> logits [B, V]
DecodeForward = Callable[[Tensor, Tensor, PagedAttention], Tensor]

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)
MIN_CONTEXT_BLOCKS = 64  # the smallest context bucket: 1024 positions at block size 16


def capturable(dtype: torch.dtype, cache: KVCache) -> bool:
    """Whether a decode step of a `dtype` model can be captured: the decode kernel serves the
    cache and the experts take the grouped GEMMs (the exact loop reads counts to the host)."""
    return cache.decode_kernel and dtype in GROUPED_DTYPES


class DecodeGraphs:
    def __init__(
        self,
        forward: DecodeForward,
        cache: KVCache,
        scale: float,
        max_batch: int,
        max_context: int,
    ) -> None:
        """`scale`: attention's softmax scale (head_dim ** -0.5)."""
        self.forward = forward
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
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.enabled = True

    def fits(self, batch: int) -> bool:
        return self.enabled and batch <= self.batch_buckets[-1]

    def run(self, inputs: StepInputs) -> Tensor | None:
        """Logits [B, V] of a decode-only step (rows in order), or None for a step these
        graphs do not serve (a capture that failed turns them off for good)."""
        backend = inputs.backend
        decode = backend.decode
        if decode is None or backend.spans or not self.fits(inputs.num_tokens):
            return None
        token_ids, positions, new_slots = inputs.token_ids, inputs.positions, backend.new_slots
        n, width = token_ids.numel(), decode.block_tables.shape[1]
        batch = self.batch_buckets[bisect_left(self.batch_buckets, n)]
        blocks = min(max(MIN_CONTEXT_BLOCKS, 1 << (width - 1).bit_length()), self.max_blocks)
        self._fill(n, batch, token_ids, positions, decode, new_slots)
        key = (batch, blocks)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(batch, blocks)
            except RuntimeError as err:
                log.warning("decode steps run eagerly: capturing one failed (%s)", err)
                self.enabled = False
                return None
        graph, logits = self.graphs[key]
        graph.replay()
        return logits[:n]

    def _fill(self, n, batch, token_ids, positions, decode, new_slots) -> None:
        width = decode.block_tables.shape[1]
        self.token_ids[:n].copy_(token_ids)
        self.positions[:n].copy_(positions)
        self.new_slots[:n].copy_(new_slots)
        self.tables[:n, :width].copy_(decode.block_tables)
        self.lens[:n].copy_(decode.context_lens)
        if batch > n:  # padding: one position of the scratch block
            self.token_ids[n:batch].zero_()
            self.positions[n:batch].zero_()
            self.new_slots[n:batch].fill_(self.cache.scratch_block * self.cache.block_size)
            self.tables[n:batch, 0].fill_(self.cache.scratch_block)
            self.lens[n:batch].fill_(1)

    def _forward(self, batch: int, blocks: int) -> Tensor:
        cache = self.cache
        splits = mfa_decode.default_num_splits(
            batch, blocks * cache.block_size, cache.k.dtype, cache.k.device
        )
        decode = DecodeBatch(self.rows[:batch], self.tables[:batch, :blocks], self.lens[:batch],
                             splits)  # fmt: skip
        backend = PagedAttention(cache, self.new_slots[:batch], [], self.scale, decode)
        return self.forward(self.token_ids[:batch], self.positions[:batch], backend)

    def _capture(self, batch: int, blocks: int) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        # The eager run before the capture writes the step's own K/V, which the replay then
        # writes again, unchanged.
        graph, logits = capture(lambda: self._forward(batch, blocks), self.pool)
        log.info("captured a decode step graph: batch %d, context %d", batch,
                 blocks * self.cache.block_size)  # fmt: skip
        return graph, logits
