"""The engine's runner: the attention half here, the FFN half behind an executor.

One step runs K micro-batches through the layers in a pipeline:

    for layer:  for micro-batch i:
        wait for the FFN output of (layer - 1, i)       # waits only for micro-batch i
        segment: x_i += that output; x_i, ffn_input = attention_layer(x_i); stage ffn_input
        send micro-batch i's FFN input

With `RemoteFFN` (AFD) the FFN instances work on micro-batch i while this process computes
attention for i + 1; with `LocalFFN` (colocated) staging computes at once and a decode-only
step replays from one CUDA graph (decode_graphs.py) as one micro-batch, there being nothing
to overlap. With `RemoteFFN` a decode-only step replays each segment, the GPU work between
two transfers, from a graph of its own (segment_graphs.py). The same pipeline serves every
case, so their tokens are the same.

Knows nothing of requests' sampling parameters or stopping rules (engine.py).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from services.attention.decode_graphs import DecodeGraphs
from services.attention.ffn_executor import FFNExecutor
from services.attention.kv_cache import KVCache, PagedAttention
from services.attention.micro_batches import split_micro_batches
from services.attention.monitor import PipelineMonitor
from services.attention.scheduler import ScheduledChunk
from services.attention.segment_graphs import SegmentGraphs
from services.attention.static_inputs import GraphKey
from services.attention.step_inputs import StepInputs, prepare_inputs
from services.common.model.attention_half import AttentionHalf
from services.common.pipeline_timer import PipelineTimer


class _Eager:
    """A micro-batch computed eagerly, its residual stream a tensor of its own."""

    def __init__(self, runner: ModelRunner, slot: int, inputs: StepInputs) -> None:
        self.runner, self.slot, self.inputs = runner, slot, inputs
        self.rows = inputs.num_tokens
        self.x, self.cos, self.sin = runner.attention.embed(inputs.token_ids, inputs.positions)

    def segment(self, index: int) -> None:
        args = (self.x, self.cos, self.sin, self.inputs.backend)
        self.x = self.runner.segment(index, self.slot, self.rows, *args)

    def residual(self) -> Tensor:
        return self.x


class _Replayed:
    """A decode micro-batch replayed from segment graphs, padded to its graphs' batch."""

    def __init__(self, graphs: SegmentGraphs, slot: int, key: GraphKey, inputs: StepInputs):
        self.graphs, self.slot, self.key, self.inputs = graphs, slot, key, inputs
        self.rows = key[0]

    def segment(self, index: int) -> None:
        self.graphs.replay(index, self.slot, self.key)

    def residual(self) -> Tensor:
        return self.graphs.residual(self.slot, self.key)


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
        self.segments: SegmentGraphs | None = None
        # The last step's logits at its prompt rows (step_inputs.prompt_row_positions), in
        # chunk order; None when no chunk asked for prompt logprobs.
        self.prompt_logits: Tensor | None = None

    def use_graphs(
        self,
        max_batch: int,
        max_context: int,
        whole_steps: bool | None = None,
    ) -> None:
        """Replay decode-only steps of up to `max_batch` sequences (per micro-batch) from CUDA
        graphs: whole steps where the executor may be captured, segments between transfers
        otherwise. `whole_steps=False` takes segments with any executor."""
        whole = self.ffn.capturable if whole_steps is None else whole_steps
        if whole and not self.ffn.capturable:
            raise ValueError("a step with transfers to FFN instances cannot be one CUDA graph")
        if whole:
            self.graphs = DecodeGraphs(
                self.decode_logits, self.cache, self.scale, max_batch, max_context
            )
            return
        self.ffn.reserve(max_batch)
        self.segments = SegmentGraphs(
            self.attention.embed, self.segment, self.cache, self.scale,
            max_batch, max_context, self.num_micro_batches,
        )  # fmt: skip

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> Tensor:
        """Compute every chunk; logits [sampling chunks, V] in chunk order. A step with no
        chunks still begins and ends (AFD's FFN instances step with every attention one)."""
        whole, self.prompt_logits = None, None
        if self.graphs is not None and chunks:
            whole = prepare_inputs(chunks, self.cache, self.scale)
            # A graph's logits are the sampled rows': prompt rows take the eager path.
            logits = self.graphs.run(whole) if not whole.prompt_rows.numel() else None
            if logits is not None:
                return logits[whole.sample_rows]
        groups = split_micro_batches(chunks, self.num_micro_batches)
        if len(groups) == 1 and whole is not None:
            inputs = {0: whole}
        else:
            inputs = {
                s: prepare_inputs(g, self.cache, self.scale) for s, g in enumerate(groups) if g
            }
        batches = self._micro_batches(inputs)
        rows = [0] * len(groups)
        for mb in batches:
            rows[mb.slot] = mb.rows
        self.ffn.begin(rows)
        if not batches:
            self.ffn.end()
            return torch.empty(0, self.model_config.vocab_size, device=self.device)
        timer = PipelineTimer(self.device, self.monitor is not None and self.monitor.sampled())
        residuals = self._pipeline(batches, timer)
        if timer.active:
            self.monitor.record(timer)
        pairs = list(zip(batches, residuals, strict=True))
        prompt = [x[mb.inputs.prompt_rows] for mb, x in pairs if mb.inputs.prompt_rows.numel()]
        if prompt:
            self.prompt_logits = self.attention.logits(torch.cat(prompt))
        return self.attention.logits(torch.cat([x[mb.inputs.sample_rows] for mb, x in pairs]))

    def _micro_batches(self, inputs: dict[int, StepInputs]) -> list[_Eager | _Replayed]:
        """Replayed micro-batches when segment graphs serve every one, else eager ones."""
        if self.segments is not None and inputs:
            self.segments.follow(self.ffn.generation)
            keys = {slot: self.segments.load(slot, i) for slot, i in inputs.items()}
            if None not in keys.values():
                return [_Replayed(self.segments, s, keys[s], i) for s, i in inputs.items()]
        return [_Eager(self, slot, i) for slot, i in inputs.items()]

    def segment(
        self,
        index: int,
        slot: int,
        rows: int,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        backend: PagedAttention,
        padding: Tensor | None = None,
    ) -> Tensor:
        """Micro-batch `slot`'s GPU work between two transfers: layer index - 1's FFN output
        added to the residual stream x [rows, H], layer `index`'s attention half, its FFN
        input staged; the new x. `padding` [rows, 1]: rows that route to no expert."""
        if index > 0:
            x = x + self.ffn.output(index - 1, slot, rows)
        x, ffn_input = self.attention.layers[index](x, cos, sin, backend)
        if padding is not None and ffn_input.ids is not None:
            no_expert = self.model_config.moe_num_experts
            ffn_input = replace(ffn_input, ids=ffn_input.ids.masked_fill(padding, no_expert))
        self.ffn.stage(index, slot, ffn_input)
        return x

    def decode_logits(self, token_ids: Tensor, positions: Tensor, backend: PagedAttention):
        """One micro-batch through every layer, logits [T, V] for every row: what a decode
        step's CUDA graph captures."""
        n = token_ids.numel()
        self.ffn.begin([n])
        mb = _Eager(self, 0, StepInputs(token_ids, positions, backend, torch.arange(n)))
        (x,) = self._pipeline([mb], PipelineTimer(self.device, False))
        return self.attention.logits(x)

    def _pipeline(self, batches: list[_Eager | _Replayed], timer: PipelineTimer) -> list[Tensor]:
        """Every micro-batch through every layer; their residual streams at the end."""
        ffn = self.ffn
        for index in range(len(self.attention.layers)):
            for mb in batches:
                if index > 0:
                    timer.waited("f2a", ffn.receive, mb.slot)
                timer.waited("a2f", ffn.wait_sent, mb.slot)  # the slot's buffer is free
                timer.computed(mb.segment, index)
                ffn.send(index, mb.slot, mb.rows)
        residuals, last = [], len(self.attention.layers) - 1
        for mb in batches:
            timer.waited("f2a", ffn.receive, mb.slot)
            residuals.append(mb.residual() + ffn.output(last, mb.slot, mb.rows))
        timer.waited("a2f", ffn.end)
        return residuals
