"""The attention side of AFD: every layer's feed-forward work goes to the FFN instances.

One step runs K micro-batches through the layers in a pipeline:

    for layer:  for micro-batch i:
        x_i += sum of FFN partials of (layer - 1, i)      # waits only for micro-batch i
        x_i  = x_i + attn(norm(x_i))                      # the KV cache lives here
        send norm(x_i) (+ expert ids and weights) to every FFN instance, asynchronously

so while the FFN instances work on micro-batch i, this process computes attention for i+1.
Partials are summed in FFN-instance order, so results do not depend on arrival order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from services.attention.kv_cache import KVCache
from services.attention.micro_batches import split_micro_batches
from services.attention.model_runner import StepInputs, prepare_inputs
from services.attention.scheduler import ScheduledChunk
from services.common.activations import Layout
from services.common.metrics import DIRECTIONS, AttentionMetrics, StepSampler
from services.common.model.layers import rope_cos_sin
from services.common.model.step3 import MoEDecoderLayer, Step3ForCausalLM
from services.common.pipeline_timer import PipelineTimer
from services.common.transport import A2F, F2A, Pending, Transport, channel

PlanSink = Callable[[int, list[int]], None]  # (step, tokens per micro-batch) -> control plane


@dataclass(frozen=True)
class PipelineConfig:
    num_micro_batches: int = 3
    fp8_dispatch: bool = False  # e4m3 with per-token scales on the attention-to-FFN direction

    def __post_init__(self) -> None:
        if not 1 <= self.num_micro_batches <= 4:
            raise ValueError(f"micro-batches must be 1 to 4, got {self.num_micro_batches}")


@dataclass
class _MicroBatch:
    inputs: StepInputs
    cos: Tensor
    sin: Tensor
    x: Tensor  # [n, H] residual stream
    sends: list[Pending]
    recvs: list[tuple[Tensor, Pending]]  # (partial [n, H] view, its transfer) per FFN


class PipelineMonitor:
    """Sampled steps' stage times into the attention instance's pipeline metrics."""

    def __init__(self, metrics: AttentionMetrics, sampler: StepSampler) -> None:
        self.metrics = metrics
        self.sampler = sampler

    def record(self, timer: PipelineTimer) -> None:
        m, step = self.metrics, timer.elapsed()
        for seconds in timer.computes:
            m.layer_attention_time.observe(seconds)
        for direction in DIRECTIONS:
            m.transfer_wait.labels(direction).observe(timer.waits.get(direction, 0.0))
        ffn_wait = timer.waits.get("f2a", 0.0)
        m.ffn_wait.observe(ffn_wait)
        m.bubble_ratio.set(ffn_wait / step if step > 0 else 0.0)


class DisaggregatedRunner:
    """A `Runner` for the engine: attention here, feed-forward on the FFN instances."""

    def __init__(
        self,
        model: Step3ForCausalLM,
        cache: KVCache,
        transport: Transport,
        ffn_ranks: list[int],
        plan_sink: PlanSink,
        config: PipelineConfig,
        max_tokens_per_step: int,
        monitor: PipelineMonitor | None = None,
    ) -> None:
        """`monitor`: where sampled steps' stage times go (None: nothing is timed)."""
        cfg = model.cfg
        self.monitor = monitor
        self.model = model
        self.model_config = cfg
        self.cache = cache
        self.transport = transport
        self.ffn_ranks = ffn_ranks
        self.plan_sink = plan_sink
        self.config = config
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.scale = cfg.head_dim**-0.5
        self.step = 0
        self.dense_layout = Layout(cfg.hidden_size, 0, self.dtype, config.fp8_dispatch)
        self.moe_layout = Layout(cfg.hidden_size, cfg.moe_top_k, self.dtype, config.fp8_dispatch)
        # Buffers allocated once per micro-batch slot and reused every layer and step.
        k, n = config.num_micro_batches, max_tokens_per_step
        self._send_bufs = [self._bytes(n * self.moe_layout.bytes_per_token) for _ in range(k)]
        self._partial_bytes = n * cfg.hidden_size * self.dtype.itemsize
        self._recv_bufs = self._partial_buffers(len(ffn_ranks))

    def rebind(self, transport: Transport, ffn_ranks: list[int]) -> None:
        """Serve a new membership epoch: its group, its FFN ranks (as many as before, or
        another number when the FFN side was scaled), its step numbers from 0."""
        if len(ffn_ranks) != len(self.ffn_ranks):
            self._recv_bufs = self._partial_buffers(len(ffn_ranks))
        self.transport = transport
        self.ffn_ranks = ffn_ranks
        self.step = 0

    def _partial_buffers(self, num_ffn: int) -> list[list[Tensor]]:
        """Per micro-batch slot, a receive buffer for each FFN instance's partial sum."""
        k = self.config.num_micro_batches
        return [[self._bytes(self._partial_bytes) for _ in range(num_ffn)] for _ in range(k)]

    def _bytes(self, size: int) -> Tensor:
        return torch.empty(size, dtype=torch.uint8, device=self.device)

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> Tensor:
        groups = split_micro_batches(chunks, self.config.num_micro_batches)
        timed = bool(chunks) and self.monitor is not None and self.monitor.sampler.next()
        step, self.step = self.step, self.step + 1
        self.plan_sink(step, [sum(c.num_tokens for c in g) for g in groups])
        slots = [(i, self._micro_batch(g)) for i, g in enumerate(groups) if g]
        cfg = self.model_config
        timer = PipelineTimer(self.device, timed)
        for layer_index, layer in enumerate(self.model.model.layers):
            for slot, mb in slots:
                if layer_index > 0:
                    mb.x = mb.x + timer.waited("f2a", self._combine, mb)
                timer.waited("a2f", self.transport.drain, mb.sends)  # the slot's buffer is free
                timer.computed(self._layer, layer, layer_index, slot, mb)
        hidden = []
        for _, mb in slots:
            mb.x = mb.x + timer.waited("f2a", self._combine, mb)
            timer.waited("a2f", self.transport.drain, mb.sends)
            hidden.append(mb.x[mb.inputs.sample_rows])
        if timer.active:
            self.monitor.record(timer)
        if not hidden:
            return torch.empty(0, cfg.vocab_size, device=self.device)
        return self.model.compute_logits(self.model.model.norm(torch.cat(hidden)))

    def _layer(self, layer, layer_index: int, slot: int, mb: _MicroBatch) -> None:
        """Micro-batch `slot`'s attention half of a layer, its FFN input sent on its way."""
        mb.x = layer.attend(mb.x, mb.cos, mb.sin, mb.inputs.backend)
        h = layer.post_attention_layernorm(mb.x)
        if isinstance(layer, MoEDecoderLayer):
            weights, ids = layer.moe.route(h)
            self._dispatch(slot, mb, self.moe_layout, h, ids, weights, layer_index)
        else:
            self._dispatch(slot, mb, self.dense_layout, h, None, None, layer_index)

    def _micro_batch(self, chunks: list[ScheduledChunk]) -> _MicroBatch:
        inputs = prepare_inputs(chunks, self.cache, self.scale)
        cos, sin = rope_cos_sin(
            inputs.positions, self.model_config.head_dim, self.model_config.rope_theta
        )
        x = self.model.model.embed_tokens(inputs.token_ids)
        return _MicroBatch(inputs, cos, sin, x, [], [])

    def _dispatch(
        self,
        slot: int,
        mb: _MicroBatch,
        layout: Layout,
        h: Tensor,
        ids: Tensor | None,
        weights: Tensor | None,
        layer: int,
    ) -> None:
        """Send micro-batch `slot`'s FFN input to every FFN instance; post the receives.
        The slot's earlier sends must have completed (the caller drains them)."""
        message = layout.pack(self._send_bufs[slot], h, ids, weights)
        what = f"layer {layer}, micro-batch {slot}"
        n, hidden = h.shape
        out, back = channel(A2F, slot), channel(F2A, slot)
        mb.sends = [self.transport.send(message, r, out, what) for r in self.ffn_ranks]
        mb.recvs = []
        for rank, buf in zip(self.ffn_ranks, self._recv_bufs[slot], strict=True):
            view = buf[: n * hidden * self.dtype.itemsize]
            mb.recvs.append((view, self.transport.recv(view, rank, back, what)))

    def _combine(self, mb: _MicroBatch) -> Tensor:
        """Sum the FFN instances' partial outputs, in instance order."""
        acc = torch.promote_types(self.dtype, torch.float32)
        total = torch.zeros(mb.x.shape, dtype=acc, device=self.device)
        for view, pending in mb.recvs:
            self.transport.wait(pending)
            total += view.view(self.dtype).view(mb.x.shape)
        return total.to(self.dtype)
