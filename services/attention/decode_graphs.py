"""Decode steps replayed from CUDA graphs, when the FFN runs in this process.

At serving batch sizes a decode step in eager PyTorch is bound by launches, not by the GPU:
each layer is some fifty kernels of a few microseconds of GPU work each, and Python and the
driver spend longer than that issuing every one. A CUDA graph of the whole forward issues
them in one launch. Graphs are captured on first use, one per (batch bucket, context bucket)
of the padded static inputs (static_inputs.py).

What this module does not know: the model (it captures the runner's `decode_logits`),
scheduling or sampling; `run` answers None for a step it does not serve (not decode-only,
too large, or a capture failed), which the runner then computes eagerly. Steps whose FFN runs
elsewhere replay per layer and micro-batch instead (segment_graphs.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from services.attention.kv_cache import KVCache, PagedAttention
from services.attention.static_inputs import GraphKey, StaticDecodeInputs
from services.attention.step_inputs import StepInputs
from services.common.cuda_graph import capture
from services.common.model.moe import GROUPED_DTYPES

# (token ids [B], positions [B], attention over the cache) -> logits [B, V]
DecodeForward = Callable[[Tensor, Tensor, PagedAttention], Tensor]

log = logging.getLogger(__name__)


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
        self.inputs = StaticDecodeInputs(cache, scale, max_batch, max_context)
        self.graphs: dict[GraphKey, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.enabled = True

    def fits(self, batch: int) -> bool:
        return self.enabled and self.inputs.fits(batch)

    def run(self, inputs: StepInputs) -> Tensor | None:
        """Logits [B, V] of a decode-only step (rows in order), or None for a step these
        graphs do not serve (a capture that failed turns them off for good)."""
        if not self.enabled:
            return None
        key = self.inputs.load(inputs)
        if key is None:
            return None
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(key)
            except RuntimeError as err:
                log.warning("decode steps run eagerly: capturing one failed (%s)", err)
                self.enabled = False
                return None
        graph, logits = self.graphs[key]
        graph.replay()
        return logits[: inputs.num_tokens]

    def _capture(self, key: GraphKey) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        # The eager run before the capture writes the step's own K/V, which the replay then
        # writes again, unchanged.
        graph, logits = capture(lambda: self.forward(*self.inputs.step_inputs(key)), self.pool)
        log.info("captured a decode step graph: batch %d, context %d", key[0],
                 key[1] * self.inputs.cache.block_size)  # fmt: skip
        return graph, logits
