"""A disaggregated decode step's GPU work replayed from CUDA graphs, segment by segment.

With the FFN on other instances a step cannot be one graph: every layer hands each
micro-batch's FFN input to the data plane and waits for the answer, and those transfers are
the host's to post. What lies between two transfers of a micro-batch (the FFN output of the
layer before added to the residual stream, the layer's attention half, the next FFN input
packed into the executor's send buffer) is a segment, some fifty kernels; a graph per
(layer, micro-batch slot, batch bucket, context bucket) issues them in one launch, and the
runner posts the transfers between replays (model_runner.py).

Each slot has its own static inputs (static_inputs.py, padded to a bucket), its own residual
stream in two buffers (a segment reads one and writes the other, so running it twice gives
the same result, as capturing wants), and its own rotary tables, written by its first
segment with the embedding. Padding rows route to no expert (id E), so on the FFN instances
they cost the experts nothing. A capture that fails runs that segment eagerly, on the same
buffers, and turns the graphs off for the steps after.
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

# (token ids [B], positions [B]) -> (x [B, H], cos [B, D], sin [B, D])
Embed = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]
# (layer, slot, rows, x, cos, sin, attention, padding [rows, 1]) -> x (the runner's `segment`)
Segment = Callable[[int, int, int, Tensor, Tensor, Tensor, PagedAttention, Tensor], Tensor]

log = logging.getLogger(__name__)


class _Slot:
    """One micro-batch slot's buffers."""

    def __init__(self, inputs: StaticDecodeInputs, embed: Embed) -> None:
        self.inputs = inputs
        n = inputs.batch_buckets[-1]
        x, cos, sin = embed(inputs.token_ids[:1], inputs.positions[:1])  # shapes and dtypes
        self.x = [x.new_zeros(n, x.shape[1]) for _ in range(2)]  # layer i reads x[i % 2]
        self.cos, self.sin = cos.new_zeros(n, cos.shape[1]), sin.new_zeros(n, sin.shape[1])
        self.padding = torch.zeros(n, 1, dtype=torch.bool, device=x.device)


class SegmentGraphs:
    def __init__(
        self,
        embed: Embed,
        segment: Segment,
        cache: KVCache,
        scale: float,
        max_batch: int,
        max_context: int,
        num_slots: int,
    ) -> None:
        self.embed = embed
        self.segment = segment
        self.num_layers = cache.k.shape[0]
        self.slots = [
            _Slot(StaticDecodeInputs(cache, scale, max_batch, max_context), embed)
            for _ in range(num_slots)
        ]
        self.graphs: dict[tuple[int, int, GraphKey], torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.enabled = True
        self.generation = 0  # of the executor's buffers the graphs read and write

    def follow(self, generation: int) -> None:
        """Drop every graph if the executor's buffers were replaced since they were captured
        (a new epoch with another number of FFN instances): they are captured again."""
        if generation != self.generation:
            self.graphs.clear()
            self.generation = generation

    def load(self, slot: int, inputs: StepInputs) -> GraphKey | None:
        """Copy a decode micro-batch's inputs into `slot`'s buffers; the key of the graphs
        that serve it, or None when none do (graphs off, not decode-only, too large)."""
        if not self.enabled:
            return None
        s = self.slots[slot]
        key = s.inputs.load(inputs)
        if key is not None:
            n, batch = inputs.num_tokens, key[0]
            s.padding[:n].fill_(False)
            s.padding[n:batch].fill_(True)
        return key

    def replay(self, index: int, slot: int, key: GraphKey) -> None:
        """Segment `index` (layer `index`'s attention, layer index - 1's FFN output before it)
        of the micro-batch loaded into `slot`."""
        graph = self.graphs.get((index, slot, key))
        if graph is None:
            graph = self._capture(index, slot, key)
        if graph is None:
            self._run(index, slot, key)
        else:
            graph.replay()

    def residual(self, slot: int, key: GraphKey) -> Tensor:
        """The slot's residual stream [batch, H] after the last layer's attention half."""
        return self.slots[slot].x[self.num_layers % 2][: key[0]]

    def _run(self, index: int, slot: int, key: GraphKey) -> None:
        s, batch = self.slots[slot], key[0]
        token_ids, positions, backend = s.inputs.step_inputs(key)
        x, cos, sin = s.x[index % 2][:batch], s.cos[:batch], s.sin[:batch]
        if index == 0:
            x0, cos0, sin0 = self.embed(token_ids, positions)
            x.copy_(x0)
            cos.copy_(cos0)
            sin.copy_(sin0)
        out = self.segment(index, slot, batch, x, cos, sin, backend, s.padding[:batch])
        s.x[(index + 1) % 2][:batch].copy_(out)

    def _capture(self, index: int, slot: int, key: GraphKey) -> torch.cuda.CUDAGraph | None:
        if not self.enabled:
            return None
        try:
            # Other threads (the data plane's) keep using CUDA while this one captures.
            graph, _ = capture(lambda: self._run(index, slot, key), self.pool, "thread_local")
        except RuntimeError as err:
            log.warning("decode steps run eagerly: capturing a segment failed (%s)", err)
            self.enabled = False
            return None
        self.graphs[(index, slot, key)] = graph
        return graph
