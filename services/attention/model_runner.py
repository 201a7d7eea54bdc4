"""The engine's runner: the attention half here, the FFN half behind an executor.

One step runs K micro-batches through the layers in a pipeline:

    for layer:  for micro-batch i:
        x_i += ffn output of (layer - 1, i)             # waits only for micro-batch i
        x_i, ffn_input = attention_layer(x_i)           # the KV cache lives here
        executor.dispatch(layer, i, ffn_input)

With `RemoteFFN` (AFD) the FFN instances work on micro-batch i while this process computes
attention for i + 1; with `LocalFFN` (colocated) dispatch computes at once and a decode-only
step replays from a CUDA graph (decode_graphs.py) as one micro-batch, there being nothing to
overlap. The same pipeline serves both, so their tokens are the same.

Knows nothing of requests' sampling parameters or stopping rules (engine.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from services.attention.decode_graphs import DecodeGraphs
from services.attention.ffn_executor import FFNExecutor
from services.attention.kv_cache import KVCache, PagedAttention
from services.attention.micro_batches import split_micro_batches
from services.attention.monitor import PipelineMonitor
from services.attention.scheduler import ScheduledChunk
from services.attention.step_inputs import prepare_inputs
from services.common.model.attention_half import AttentionHalf
from services.common.pipeline_timer import PipelineTimer


@dataclass
class _MicroBatch:
    slot: int
    backend: PagedAttention
    x: Tensor  # [n, H] residual stream
    cos: Tensor
    sin: Tensor


class ModelRunner:
    """A `Runner` for the engine (engine.py)."""

    def __init__(
        self,
        attention: AttentionHalf,
        ffn: FFNExecutor,
        cache: KVCache,
        num_micro_batches: int = 1,
        monitor: PipelineMonitor | None = None,
    ) -> None:
        """`monitor`: where sampled steps' stage times go (None: nothing is timed)."""
        self.attention = attention
        self.ffn = ffn
        self.cache = cache
        self.num_micro_batches = num_micro_batches
        self.monitor = monitor
        self.model_config = attention.cfg
        self.device = attention.device
        self.scale = attention.cfg.head_dim**-0.5
        self.graphs: DecodeGraphs | None = None

    def use_graphs(self, max_batch: int, max_context: int) -> None:
        """Replay decode-only steps of up to `max_batch` sequences from CUDA graphs."""
        if not self.ffn.capturable:
            raise ValueError("a step with transfers to FFN instances cannot be one CUDA graph")
        self.graphs = DecodeGraphs(
            self.decode_logits, self.cache, self.scale, max_batch, max_context
        )

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> Tensor:
        """Compute every chunk; logits [sampling chunks, V] in chunk order. A step with no
        chunks still begins and ends (AFD's FFN instances step with every attention one)."""
        groups = split_micro_batches(chunks, self.num_micro_batches)
        self.ffn.begin([sum(c.num_tokens for c in group) for group in groups])
        if not chunks:
            self.ffn.end()
            return torch.empty(0, self.model_config.vocab_size, device=self.device)
        whole = prepare_inputs(chunks, self.cache, self.scale) if len(groups) == 1 else None
        if self.graphs is not None:
            whole = whole or prepare_inputs(chunks, self.cache, self.scale)
            logits = self.graphs.run(whole)
            if logits is not None:
                self.ffn.end()
                return logits[whole.sample_rows]
        timer = PipelineTimer(self.device, self.monitor is not None and self.monitor.sampled())
        batches, rows = [], []
        for slot, group in enumerate(groups):
            if group:
                inputs = (
                    whole if len(groups) == 1 else prepare_inputs(group, self.cache, self.scale)
                )
                x, cos, sin = self.attention.embed(inputs.token_ids, inputs.positions)
                batches.append(_MicroBatch(slot, inputs.backend, x, cos, sin))
                rows.append(inputs.sample_rows)
        self._pipeline(batches, timer)
        if timer.active:
            self.monitor.record(timer)
        hidden = torch.cat([mb.x[r] for mb, r in zip(batches, rows, strict=True)])
        return self.attention.logits(hidden)

    def decode_logits(self, token_ids: Tensor, positions: Tensor, backend: PagedAttention):
        """One micro-batch through every layer, logits [T, V] for every row: what a decode
        step's CUDA graph captures."""
        x, cos, sin = self.attention.embed(token_ids, positions)
        batch = _MicroBatch(0, backend, x, cos, sin)
        self.ffn.begin([token_ids.numel()])
        self._pipeline([batch], PipelineTimer(self.device, False))
        return self.attention.logits(batch.x)

    def _pipeline(self, batches: list[_MicroBatch], timer: PipelineTimer) -> None:
        ffn = self.ffn
        for index, layer in enumerate(self.attention.layers):
            for mb in batches:
                if index > 0:
                    mb.x = mb.x + timer.waited("f2a", ffn.combine, mb.slot)
                timer.waited("a2f", ffn.wait_sent, mb.slot)  # the slot's buffer is free
                mb.x, ffn_input = timer.computed(layer, mb.x, mb.cos, mb.sin, mb.backend)
                ffn.dispatch(index, mb.slot, ffn_input)
        for mb in batches:
            mb.x = mb.x + timer.waited("f2a", ffn.combine, mb.slot)
        timer.waited("a2f", ffn.end)
