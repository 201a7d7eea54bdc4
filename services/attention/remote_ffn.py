"""The FFN executor of AFD: every layer's feed-forward goes to the FFN instances.

A step begins with a header to every FFN instance (the step number and its rows per
micro-batch: its tokens, padded up to a bucket when the step replays CUDA graphs), so the
FFN instances size their receives from the data plane itself and no step waits for the
controller. Every member follows one rule, so they agree without asking:
a step with tokens on any attention instance is always followed by another, in which every
attention instance takes part (with no tokens, if it has none); after a step with none the
cluster is idle until an attention instance with work opens the next step through the
controller (step_bell.py), which wakes the others. Attention instances learn a step's total
from the first FFN instance's summary (with one attention instance, its own count is it).

Each send hands a micro-batch's FFN input (normed activations, plus expert ids and weights
in MoE layers), packed by `stage`, to every FFN instance, asynchronously, and posts the
receives of their partial outputs; `receive` waits for those and `output` sums them in
FFN-instance order, so results do not depend on arrival order. The runner's pipeline
(model_runner.py) computes attention for micro-batch i + 1 while the FFN instances work on
micro-batch i.

Buffers are allocated once per micro-batch slot and reused every layer and step, so `stage`
and `output` may be replayed from CUDA graphs (segment_graphs.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from services.attention.step_bell import StepBell
from services.common.activations import Layout
from services.common.config import ModelConfig
from services.common.model.attention_half import FFNInput
from services.common.transport import A2F, F2A, PeerFailure, Pending, Transport, channel


@dataclass(frozen=True)
class PipelineConfig:
    """The cluster's facts this executor needs (validated in `ClusterConfig`)."""

    num_micro_batches: int = 3
    fp8_dispatch: bool = False  # e4m3 with per-token scales on the attention-to-FFN direction


class RemoteFFN:
    capturable = False  # transfers cannot sit inside a CUDA graph

    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        transport: Transport,
        ffn_ranks: list[int],
        num_attention: int,
        bell: StepBell,
        config: PipelineConfig,
        max_tokens_per_step: int,
        on_control_wait: Callable[[float], None] | None = None,
    ) -> None:
        """`num_attention`: attention instances in the epoch; `bell`: opens steps after
        idle ones and says when a peer opened one; `on_control_wait`: told every step's
        time on the control plane (metrics)."""
        self.cfg = cfg
        self.dtype = dtype
        self.device = device
        self.transport = transport
        self.ffn_ranks = ffn_ranks
        self.num_attention = num_attention
        self.bell = bell
        self.config = config
        self.on_control_wait = on_control_wait
        self.step = 0
        self.generation = 0
        self.idle = True  # the last step had no tokens anywhere (an epoch starts idle)
        self._own = 0
        self._summary = torch.zeros(2, dtype=torch.int64)  # (step, its total tokens)
        self._header_sends: list[Pending] = []
        self._summary_recv: Pending | None = None
        self._await_first_step()
        self.layouts = {
            False: Layout(cfg.hidden_size, 0, dtype, config.fp8_dispatch),
            True: Layout(cfg.hidden_size, cfg.moe_top_k, dtype, config.fp8_dispatch),
        }
        self.moe = [cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)]
        self.max_rows = max_tokens_per_step
        k, n = config.num_micro_batches, max_tokens_per_step
        self._send_bufs = [self._bytes(n * self.layouts[True].bytes_per_token) for _ in range(k)]
        self._partial_bytes = n * cfg.hidden_size * dtype.itemsize
        self._recv_bufs = self._partial_buffers(len(ffn_ranks))
        self._sends: list[list[Pending]] = [[] for _ in range(k)]
        self._recvs: list[list[Pending]] = [[] for _ in range(k)]

    def rebind(
        self, transport: Transport, epoch: int, ffn_ranks: list[int], num_attention: int
    ) -> None:
        """Serve a new membership epoch: its group, its FFN ranks (as many as before, or
        another number when the FFN side was scaled), its step numbers from 0."""
        if len(ffn_ranks) != len(self.ffn_ranks):
            self._recv_bufs = self._partial_buffers(len(ffn_ranks))
            self.generation += 1
        self.transport = transport
        self.ffn_ranks = ffn_ranks
        self.num_attention = num_attention
        self.bell.rebind(epoch)
        self.step, self.idle = 0, True
        self._header_sends, self._summary_recv = [], None
        self._await_first_step()

    def _await_first_step(self) -> None:
        """An epoch starts idle: a peer with work will open its step 0."""
        if self.num_attention > 1:
            self.bell.watch(0)
        k = self.config.num_micro_batches
        self._sends, self._recvs = [[] for _ in range(k)], [[] for _ in range(k)]

    def _partial_buffers(self, num_ffn: int) -> list[list[Tensor]]:
        """Per micro-batch slot, a receive buffer for each FFN instance's partial sum."""
        k = self.config.num_micro_batches
        return [[self._bytes(self._partial_bytes) for _ in range(num_ffn)] for _ in range(k)]

    def _bytes(self, size: int) -> Tensor:
        return torch.empty(size, dtype=torch.uint8, device=self.device)

    def must_step(self) -> bool:
        """Whether this instance takes the next step even with nothing to compute."""
        return not self.idle or self.bell.rang(self.step)

    def begin(self, tokens_per_slot: list[int]) -> None:
        step = self.step
        start = time.perf_counter()
        if self.idle:
            self.bell.open(step)  # asynchronous: wakes the members waiting for this step
        if self.on_control_wait is not None:
            self.on_control_wait(time.perf_counter() - start)
        what = f"step {step}'s header"
        header = torch.tensor([step, *tokens_per_slot], dtype=torch.int64)
        self._header_sends = [self.transport.send_header(header, r, what) for r in self.ffn_ranks]
        self._own = sum(tokens_per_slot)
        if self.num_attention > 1:
            what = f"step {step}'s summary"
            self._summary_recv = self.transport.recv_header(self._summary, self.ffn_ranks[0], what)

    def reserve(self, max_rows: int) -> None:
        if max_rows > self.max_rows:
            raise ValueError(
                f"{max_rows} rows per micro-batch is more than the {self.max_rows} tokens a "
                "step may have (the cluster's --max-num-batched-tokens)"
            )

    def stage(self, layer: int, slot: int, x: FFNInput) -> None:
        self.layouts[self.moe[layer]].pack(self._send_bufs[slot], x.h, x.ids, x.weights)

    def send(self, layer: int, slot: int, rows: int) -> None:
        message = self._send_bufs[slot][: rows * self.layouts[self.moe[layer]].bytes_per_token]
        what = f"layer {layer}, micro-batch {slot}"
        out, back = channel(A2F, slot), channel(F2A, slot)
        self._sends[slot] = [self.transport.send(message, r, out, what) for r in self.ffn_ranks]
        size = rows * self.cfg.hidden_size * self.dtype.itemsize
        self._recvs[slot] = [
            self.transport.recv(buf[:size], rank, back, what)
            for rank, buf in zip(self.ffn_ranks, self._recv_bufs[slot], strict=True)
        ]

    def receive(self, slot: int) -> None:
        recvs, self._recvs[slot] = self._recvs[slot], []
        for pending in recvs:
            self.transport.wait(pending)

    def output(self, layer: int, slot: int, rows: int) -> Tensor:
        """The FFN instances' partial outputs summed, in instance order."""
        acc = torch.promote_types(self.dtype, torch.float32)
        size = rows * self.cfg.hidden_size * self.dtype.itemsize
        total = None
        for buf in self._recv_bufs[slot]:
            part = buf[:size].view(self.dtype).view(rows, self.cfg.hidden_size).to(acc)
            total = part if total is None else total + part
        return total.to(self.dtype)

    def wait_sent(self, slot: int) -> None:
        self.transport.drain(self._sends[slot])

    def end(self) -> None:
        for slot in range(self.config.num_micro_batches):
            self.wait_sent(slot)
        self.transport.drain(self._header_sends)
        total = self._own
        if self._summary_recv is not None:
            self.transport.wait(self._summary_recv)
            self._summary_recv = None
            if int(self._summary[0]) != self.step:
                raise PeerFailure(
                    f"{self.transport.peer_names[self.ffn_ranks[0]]} summarised step "
                    f"{int(self._summary[0])} for step {self.step}: the members are out of step"
                )
            total = int(self._summary[1])
        self.step += 1
        self.idle = total == 0
        if self.idle and self.num_attention > 1:
            self.bell.watch(self.step)  # a peer with work will open it
