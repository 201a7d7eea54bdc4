"""Point-to-point tensor transfers between AFD instances over torch.distributed.

The same code runs on gloo (CPU) and NCCL (GPU). Transfers are asynchronous: `send` and
`recv` return at once, and `wait` (exactly once per transfer) makes what follows depend on one.

- On gloo, `wait` blocks this thread, bounded by the step timeout, so a peer that died or
  hangs fails the step with a message naming it instead of hanging forever.
- On NCCL, `wait` only orders the current CUDA stream after the transfer, so a layer's
  sends, receives and compute queue up without the host ever waiting for the GPU. (A timed
  wait would spin the host until the transfer ends.) A dead peer is caught by the process
  group's watchdog instead, after the same step timeout (`join_group`), which ends the
  process with the timed-out operation in its log.

Every transfer goes on a channel: its direction (attention to FFN, or back) and micro-batch
slot. On NCCL each channel is a process group of its own (`channel_groups`), so its
transfers run on their own NCCL stream: NCCL runs the operations of one communicator in
order, and on one group the send of micro-batch i + 1 would queue behind the receive of
micro-batch i's answer, which is exactly the wait the pipeline exists to hide. On gloo the
channel is the tag.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist
from torch import Tensor

from services.common.cluster_config import MAX_MICRO_BATCHES

A2F, F2A = "attention to FFN", "FFN to attention"
MAX_SLOTS = MAX_MICRO_BATCHES  # micro-batches a step may have (cluster_config.py)
NUM_CHANNELS = 2 * MAX_SLOTS
STEPS = NUM_CHANNELS  # step headers and summaries: the tag after the data channels


def channel(direction: str, slot: int) -> int:
    """The channel of a transfer: [0, MAX_SLOTS) towards FFN, the next MAX_SLOTS back."""
    if not 0 <= slot < MAX_SLOTS:
        raise ValueError(f"micro-batch slot {slot} is outside 0..{MAX_SLOTS - 1}")
    return slot if direction == A2F else MAX_SLOTS + slot


def channel_groups() -> list[dist.ProcessGroup]:
    """One NCCL group of every rank per channel. Collective: every member calls it, in the
    same order, right after joining the default group."""
    return [dist.new_group(backend="nccl") for _ in range(NUM_CHANNELS)]


def steps_group() -> dist.ProcessGroup:
    """A gloo group of every rank for the step headers (collective, as `channel_groups`)."""
    return dist.new_group(backend="gloo")


class Traffic:
    """Bytes this process's data-plane transfers carried, by direction (a2f: attention to
    FFN, f2a: back) and way (sent, received), over every epoch: what the metrics export.
    Plain integers, added to on each posted transfer (a metric's lock would cost more)."""

    def __init__(self) -> None:
        self.bytes = {(d, w): 0 for d in ("a2f", "f2a") for w in ("sent", "received")}

    def add(self, channel: int, way: str, tensor: Tensor) -> None:
        direction = "a2f" if channel < MAX_SLOTS else "f2a"
        self.bytes[(direction, way)] += tensor.numel() * tensor.element_size()


class PeerFailure(RuntimeError):
    """A peer did not deliver within the step timeout, or its connection broke."""


@dataclass(frozen=True)
class Pending:
    """One posted transfer and what to say if it never completes."""

    work: dist.Work
    peer: str
    what: str
    host: bool = False  # a CPU tensor on gloo: its wait blocks, bounded by the step timeout


class Transport:
    def __init__(
        self,
        peer_names: dict[int, str],
        timeout_s: float,
        groups: list[dist.ProcessGroup] | None = None,
        headers: dist.ProcessGroup | None = None,
        traffic: Traffic | None = None,
    ) -> None:
        """`groups`: NCCL, one group per channel (`channel_groups`), and `headers` the gloo
        group of the step headers (`steps_group`); None: gloo throughout, tags. `traffic`: where
        the data channels' bytes are counted (headers are not)."""
        self.peer_names = peer_names  # rank -> "ffn instance 1" etc.
        self.timeout = timedelta(seconds=timeout_s)
        self.groups = groups
        self.headers = headers
        self.on_gpu = groups is not None  # NCCL: waits are stream dependencies
        self.traffic = traffic or Traffic()

    def send(self, tensor: Tensor, dst: int, channel: int, what: str) -> Pending:
        try:
            work = dist.isend(tensor, dst, group=self._group(channel), tag=channel)
        except RuntimeError as err:  # the connection to the peer is already broken
            raise self._failure(dst, what, err) from err
        self.traffic.add(channel, "sent", tensor)
        return Pending(work, self.peer_names[dst], what)

    def recv(self, tensor: Tensor, src: int, channel: int, what: str) -> Pending:
        try:
            work = dist.irecv(tensor, src, group=self._group(channel), tag=channel)
        except RuntimeError as err:
            raise self._failure(src, what, err) from err
        self.traffic.add(channel, "received", tensor)
        return Pending(work, self.peer_names[src], what)

    def send_header(self, tensor: Tensor, dst: int, what: str) -> Pending:
        """A step header or summary (a small CPU tensor) on the STEPS channel."""
        try:
            work = dist.isend(tensor, dst, group=self.headers, tag=STEPS)
        except RuntimeError as err:
            raise self._failure(dst, what, err) from err
        return Pending(work, self.peer_names[dst], what, host=True)

    def recv_header(self, tensor: Tensor, src: int, what: str) -> Pending:
        try:
            work = dist.irecv(tensor, src, group=self.headers, tag=STEPS)
        except RuntimeError as err:
            raise self._failure(src, what, err) from err
        return Pending(work, self.peer_names[src], what, host=True)

    def _failure(self, rank: int, what: str, err: RuntimeError) -> PeerFailure:
        return PeerFailure(f"{self.peer_names[rank]} failed {what}: {str(err).splitlines()[0]}")

    def _group(self, channel: int) -> dist.ProcessGroup | None:
        return None if self.groups is None else self.groups[channel]

    def wait(self, pending: Pending) -> None:
        try:
            if self.on_gpu and not pending.host:
                completed = pending.work.wait()
            else:
                completed = pending.work.wait(self.timeout)
        except RuntimeError as err:
            raise PeerFailure(
                f"{pending.peer} failed {pending.what}: {str(err).splitlines()[0]}"
            ) from err
        if completed is False:
            raise PeerFailure(
                f"{pending.peer} did not answer {pending.what} within "
                f"{self.timeout.total_seconds():g} s"
            )

    def drain(self, pending: list[Pending]) -> None:
        """Wait for every transfer in the list and empty it: a gloo transfer must be waited
        for exactly once (a second wait blocks until the timeout)."""
        while pending:
            self.wait(pending.pop(0))
