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
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist
from torch import Tensor


class PeerFailure(RuntimeError):
    """A peer did not deliver within the step timeout, or its connection broke."""


@dataclass(frozen=True)
class Pending:
    """One posted transfer and what to say if it never completes."""

    work: dist.Work
    peer: str
    what: str


class Transport:
    def __init__(self, peer_names: dict[int, str], timeout_s: float, on_gpu: bool = False) -> None:
        self.peer_names = peer_names  # rank -> "ffn instance 1" etc.
        self.timeout = timedelta(seconds=timeout_s)
        self.on_gpu = on_gpu  # NCCL: waits are stream dependencies, not host waits

    def send(self, tensor: Tensor, dst: int, tag: int, what: str) -> Pending:
        return Pending(dist.isend(tensor, dst, tag=tag), self.peer_names[dst], what)

    def recv(self, tensor: Tensor, src: int, tag: int, what: str) -> Pending:
        return Pending(dist.irecv(tensor, src, tag=tag), self.peer_names[src], what)

    def wait(self, pending: Pending) -> None:
        try:
            completed = pending.work.wait() if self.on_gpu else pending.work.wait(self.timeout)
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
