"""An FFN instance's step: gather every attention instance's tokens for a micro-batch,
compute this instance's share of the feed-forward (its FFN half), send each its partial output.

A step starts with every attention instance's header (the step number and its tokens per
micro-batch), so every receive has a known size and instances with no tokens are simply
skipped; the first FFN instance answers each attention instance with the step's total, from
which they agree on whether the cluster goes idle (remote_ffn.py). Layers and micro-batches
go in the order the attention side sends them, so no message is ever ambiguous.
"""

from __future__ import annotations

import torch
from torch import Tensor

from services.common.activations import Layout
from services.common.config import ModelConfig
from services.common.metrics import FFNMetrics, StepSampler
from services.common.model.attention_half import FFNInput
from services.common.model.ffn_half import FFNHalf
from services.common.pipeline_timer import PipelineTimer
from services.common.transport import A2F, F2A, PeerFailure, Pending, Transport, channel
from services.ffn.ffn_graphs import FFNGraphs, capturable
from services.ffn.instance_group import InstanceGroup


class FFNMonitor:
    """Sampled steps' times and expert loads into the FFN instance's metrics."""

    def __init__(self, metrics: FFNMetrics, sampler: StepSampler, experts: range) -> None:
        self.metrics = metrics
        self.sampler = sampler
        self.experts = range(0)  # this instance's routed experts: their loads are counted
        self.watch(experts)

    def watch(self, experts: range) -> None:
        """Count the loads of `experts`: this instance's routed experts (from now on)."""
        for expert in self.experts:
            if expert not in experts:
                self.metrics.expert_tokens.remove(str(expert))
        self.experts = experts
        for expert in experts:
            self.metrics.expert_tokens.labels(str(expert))

    def record(self, timer: PipelineTimer, expert_counts: Tensor | None) -> None:
        m = self.metrics
        for seconds in timer.computes:
            m.layer_compute_time.observe(seconds)
        m.attention_wait.observe(timer.waits.get("attention", 0.0))
        m.step_time.observe(timer.elapsed())
        if expert_counts is not None:
            counts = expert_counts.tolist()
            for expert in self.experts:
                m.expert_tokens.labels(str(expert)).inc(counts[expert])


class FFNWorker:
    def __init__(
        self,
        cfg: ModelConfig,
        shard: FFNHalf,
        transport: Transport,
        attention_ranks: list[int],
        num_micro_batches: int,
        max_tokens_per_step: int,
        dtype: torch.dtype,
        device: torch.device,
        fp8_dispatch: bool = False,
        monitor: FFNMonitor | None = None,
        summarises: bool = True,
        cuda_graphs: bool = True,
        instance: InstanceGroup | None = None,
    ) -> None:
        """`monitor`: where tokens per micro-batch and sampled steps' times go; `summarises`:
        see `rebind`; `cuda_graphs`: replay each micro-batch's layer from a CUDA graph where
        the shard can be captured (ffn_graphs.py); `instance`: this process is one of an
        FFN instance's several (instance_group.py; None: the instance is this process)."""
        if instance is not None and not shard.spec.split_mlp:
            raise ValueError(
                "an FFN instance of several processes splits its MLPs: the replicated layout "
                "takes one-process FFN instances"
            )
        self.monitor = monitor
        self.cfg = cfg
        self.shard = shard
        self.dtype = dtype
        self.device = device
        self.layouts = {
            False: Layout(cfg.hidden_size, 0, dtype, fp8_dispatch),
            True: Layout(cfg.hidden_size, cfg.moe_top_k, dtype, fp8_dispatch),
        }
        self.num_micro_batches = num_micro_batches
        self.max_tokens_per_step = max_tokens_per_step
        self.num_tokens_computed = 0
        self._expert_counts: Tensor | None = None  # a sampled step's, on the device
        self.cuda_graphs = cuda_graphs
        self.graphs: FFNGraphs | None = None
        self.attention_ranks: list[int] = []
        self.rebind(transport, attention_ranks, summarises, instance)

    def reshard(self, shard: FFNHalf | None) -> None:
        """Hold another share of the weights (the FFN side was scaled); None drops this one
        first, so two shares are never in memory at once."""
        self.shard = shard
        if shard is not None and self.monitor is not None:
            self.monitor.watch(shard.expert_range)
        self._build_graphs()

    def _build_graphs(self) -> None:
        """Graphs for this shard, sized for a micro-batch of every attention member's whole
        step budget (or none: eager, on a CPU or a shard that cannot be captured)."""
        self.graphs = None
        if self.shard is not None and self.cuda_graphs and capturable(self.shard):
            max_tokens = self.max_tokens_per_step * len(self.attention_ranks)
            self.graphs = FFNGraphs(self.shard, max_tokens, self.dtype)

    def rebind(
        self,
        transport: Transport,
        attention_ranks: list[int],
        summarises: bool = True,
        instance: InstanceGroup | None = None,
    ) -> None:
        """Serve a new membership epoch: its group, its attention members, its instance's
        groups. `summarises`: this is (a process of) the first FFN instance, which sends
        every step's total to the attention side."""
        resized = len(attention_ranks) != len(self.attention_ranks)
        self.instance = instance
        self.transport = transport
        self.attention_ranks = attention_ranks
        self.summarises = summarises and len(attention_ranks) > 1
        if resized:
            self._build_graphs()  # sized for the attention count
        # Per micro-batch slot: a receive buffer per attention instance, one send buffer.
        n, k, device = self.max_tokens_per_step, self.num_micro_batches, self.device
        in_bytes = n * self.layouts[True].bytes_per_token
        out_bytes = len(attention_ranks) * n * self.cfg.hidden_size * self.dtype.itemsize
        self._recv_bufs = [
            [torch.empty(in_bytes, dtype=torch.uint8, device=device) for _ in attention_ranks]
            for _ in range(k)
        ]
        self._send_bufs = [
            torch.empty(out_bytes, dtype=torch.uint8, device=device) for _ in range(k)
        ]
        self._sends: list[list[Pending]] = [[] for _ in range(k)]

    @torch.inference_mode()
    def run_step(self, step: int) -> int:
        """Receive `step`'s headers, compute it; its total tokens over every attention member."""
        counts = self._headers(step)  # [attention member, in rank order][micro-batch]
        total = sum(map(sum, counts))
        summaries = []
        if self.summarises:
            summary = torch.tensor([step, total], dtype=torch.int64)
            what = f"step {step}'s summary"
            summaries = [
                self.transport.send_header(summary, r, what)
                for a, r in enumerate(self.attention_ranks)
                if self._door(a)
            ]
        self._compute(counts)
        self.transport.drain(summaries)
        return total

    def _headers(self, step: int) -> list[list[int]]:
        """Every attention instance's tokens per micro-batch: from its header, or (several
        processes per instance) from the process it sent its header to."""
        what = f"step {step}'s header"
        size = 1 + self.num_micro_batches  # the step, then tokens per micro-batch
        doors = [a for a in range(len(self.attention_ranks)) if self._door(a)]
        headers = {a: torch.zeros(size, dtype=torch.int64) for a in doors}
        pending = {
            a: self.transport.recv_header(headers[a], self.attention_ranks[a], what) for a in doors
        }
        counts = torch.zeros(len(self.attention_ranks), self.num_micro_batches, dtype=torch.int64)
        for a in doors:
            wait = pending[a]
            self.transport.wait(wait)
            if int(headers[a][0]) != step:
                raise PeerFailure(
                    f"{wait.peer} sent the header of step {int(headers[a][0])} for step "
                    f"{step}: the members are out of step"
                )
            counts[a] = headers[a][1:]
        if self.instance is not None:
            counts = self.instance.share_counts(counts)
        return counts.tolist()

    def _door(self, attention_index: int) -> bool:
        """Whether this process receives from (and answers) that attention instance."""
        return self.instance is None or self.instance.serves(attention_index)

    def _compute(self, counts: list[list[int]]) -> None:
        # Per micro-batch, not per step: a micro-batch replayed from CUDA graphs arrives
        # padded to its bucket, so a step's micro-batches may add up to a little more.
        for a, row in enumerate(counts):
            if max(row) > self.max_tokens_per_step:
                raise ValueError(
                    f"attention instance {a} sent {max(row)} rows in one micro-batch, more "
                    f"than the cluster's max_num_batched_tokens {self.max_tokens_per_step}: "
                    "the members disagree on the cluster's facts (cluster_config.py)"
                )
        slots = [
            (slot, [row[slot] for row in counts])
            for slot in range(len(counts[0]))
            if any(row[slot] for row in counts)
        ]
        # Whose dense / shared-expert rows this instance computes depends on the plan only.
        mlp_rows = {slot: self._mlp_rows(self._sources(sizes)) for slot, sizes in slots}
        monitor = self.monitor
        timed = bool(slots) and monitor is not None and monitor.sampler.next()
        timer = PipelineTimer(self.device, timed)
        for layer in range(self.cfg.num_hidden_layers):
            layout = self.layouts[self.cfg.is_moe_layer(layer)]
            for slot, sizes in slots:
                self._micro_batch(layer, layout, slot, sizes, mlp_rows[slot], timer)
        for slot, _ in slots:
            self.transport.drain(self._sends[slot])
        if monitor is not None:
            for _, sizes in slots:
                monitor.metrics.micro_batch_tokens.observe(sum(sizes))
            if timed:
                monitor.record(timer, self._expert_counts)
                self._expert_counts = None

    def _micro_batch(
        self,
        layer: int,
        layout: Layout,
        slot: int,
        sizes: list[int],
        mlp_rows: Tensor,
        timer: PipelineTimer,
    ) -> None:
        what = f"layer {layer}, micro-batch {slot}"
        sources = self._sources(sizes)
        received = []
        for a, n in sources:
            if not self._door(a):
                continue
            view = self._recv_bufs[slot][a][: n * layout.bytes_per_token]
            pending = self.transport.recv(view, self.attention_ranks[a], channel(A2F, slot), what)
            received.append((view, n, pending))
        for _, _, pending in received:
            timer.waited("attention", self.transport.wait, pending)
        if self.instance is None:
            parts = [layout.unpack(view, n) for view, n, _ in received]
        else:
            parts = self._exchanged(layout, sources, [view for view, _, _ in received])
        x = _joined(parts)  # [n_total, H], attention instances in order
        out = timer.computed(self._forward, layer, x, mlp_rows)
        if self.instance is not None:
            out = self.instance.reduce(out)  # this instance's partial sum
        if timer.active and x.ids is not None:
            self._count_experts(x.ids)
        self.num_tokens_computed += x.h.shape[0]

        self.transport.drain(self._sends[slot])  # the slot's send buffer is free again
        hidden = self.cfg.hidden_size
        packed = self._send_bufs[slot][: out.numel() * self.dtype.itemsize]
        packed.view(self.dtype).copy_(out.reshape(-1))
        sends, start = [], 0
        for a, n in sources:
            size = n * hidden * self.dtype.itemsize
            if self._door(a):
                part = packed[start : start + size]
                rank = self.attention_ranks[a]
                sends.append(self.transport.send(part, rank, channel(F2A, slot), what))
            start += size
        self._sends[slot] = sends

    def _exchanged(
        self, layout: Layout, sources: list[tuple[int, int]], mine: list[Tensor]
    ) -> list[tuple[Tensor, Tensor | None, Tensor | None]]:
        """Every attention instance's message of this micro-batch, unpacked in instance
        order, from the processes of this FFN instance that received them (`mine`: this
        one's, in attention order)."""
        group, per_token = self.instance, layout.bytes_per_token
        sizes = [0] * group.size
        for a, n in sources:
            sizes[group.door_of(a)] += n * per_token
        empty = torch.empty(0, dtype=torch.uint8, device=self.device)
        rows = group.gather(torch.cat(mine) if mine else empty, sizes)
        offsets, parts = [0] * group.size, []
        for a, n in sources:
            door, size = group.door_of(a), n * per_token
            parts.append(layout.unpack(rows[door][offsets[door] : offsets[door] + size], n))
            offsets[door] += size
        return parts

    def _forward(self, layer: int, x: FFNInput, mlp_rows: Tensor | None) -> Tensor:
        if self.graphs is not None and mlp_rows is None:
            out = self.graphs.run(layer, x)
            if out is not None:
                return out
        return self.shard(layer, x, mlp_rows)

    def _count_experts(self, ids: Tensor) -> None:
        """Add a sampled layer's assignments per expert (every expert, this step's total)."""
        # Padding rows route to expert E (none): counted past the end, then dropped.
        experts = self.cfg.moe_num_experts
        counts = torch.bincount(ids.flatten(), minlength=experts + 1)[:experts]
        self._expert_counts = (
            counts if self._expert_counts is None else self._expert_counts + counts
        )

    @staticmethod
    def _sources(sizes: list[int]) -> list[tuple[int, int]]:
        """(attention index, tokens) of the attention instances with tokens in a micro-batch."""
        return [(a, n) for a, n in enumerate(sizes) if n]

    def _mlp_rows(self, sources: list[tuple[int, int]]) -> Tensor | None:
        """Rows whose dense / shared-expert work is done here (None: all of them). Split
        MLPs serve every row; whole (replicated) ones the rows of the attention instances
        this one serves, a % N == f, so each row is computed by exactly one instance."""
        spec = self.shard.spec
        if spec.split_mlp:
            return None
        rows, start = [], 0
        for a, n in sources:
            if a % spec.num_shards == spec.index:
                rows.append(torch.arange(start, start + n, device=self.device))
            start += n
        if not rows:
            return torch.empty(0, dtype=torch.long, device=self.device)
        return torch.cat(rows)


def _joined(parts: list[tuple[Tensor, Tensor | None, Tensor | None]]) -> FFNInput:
    """The attention instances' unpacked messages as one FFN input, in instance order. One
    message (one attention instance, the common case) is used as it is: no copy."""
    if len(parts) == 1:
        return FFNInput(*parts[0])
    h, ids, weights = zip(*parts, strict=True)
    routed = ids[0] is not None
    return FFNInput(
        torch.cat(h),
        torch.cat(ids) if routed else None,
        torch.cat(weights) if routed else None,
    )
