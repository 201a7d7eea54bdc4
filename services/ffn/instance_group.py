"""The processes of one FFN instance of G GPUs, as one of them sees them.

An FFN instance of G processes is one unit of the cluster. Each attention instance sends
each micro-batch to one process of each FFN instance, its *door* (attention instance a enters
at process a % G: services/common/ffn_instances.py), so an attention instance's traffic
grows with the number of FFN instances, not of FFN GPUs. Inside the instance the processes
exchange what their doors received (`gather`: every process then holds the micro-batch of
every attention instance), each computes its shard of the feed-forward over all of it (the
instance's experts split over its processes, and its columns of the dense and shared-expert
MLPs), the partial sums are added up inside the instance (`reduce`), and each door returns
the rows of its attention instances: one partial per FFN instance, as a one-process
instance returns today.

The exchange runs on the instance's own process groups (`InstanceGroups`): `data` for
activations (NCCL on GPUs, where it stays on the node's NVLink), `headers` (gloo) for the
step's counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from services.common.ffn_instances import InstanceGroups, door_of


@dataclass(frozen=True)
class InstanceGroup:
    groups: InstanceGroups  # formed by every member when the epoch's group is joined

    @property
    def position(self) -> int:
        return self.groups.position

    @property
    def size(self) -> int:
        return self.groups.size

    def door_of(self, attention_index: int) -> int:
        """The position of the process attention instance `attention_index` sends to."""
        return door_of(attention_index, self.size)

    def serves(self, attention_index: int) -> bool:
        return self.door_of(attention_index) == self.position

    def share_counts(self, counts: Tensor) -> Tensor:
        """counts [attention instances, K]: this process's doors' rows filled, the others'
        zero -> every row, from the process each came to."""
        dist.all_reduce(counts, group=self.groups.headers)
        return counts

    def gather(self, mine: Tensor, sizes: list[int]) -> list[Tensor]:
        """Every process's received bytes (`mine`: this one's; `sizes`: each process's byte
        count, known to all from the shared counts) -> the G byte strings, in position order."""
        width = max(max(sizes), 1)
        padded = torch.zeros(width, dtype=torch.uint8, device=mine.device)
        padded[: mine.numel()].copy_(mine)
        rows = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(rows, padded, group=self.groups.data)
        return [row[:size] for row, size in zip(rows, sizes, strict=True)]

    def reduce(self, partial: Tensor) -> Tensor:
        """This process's partial sum [T, H] -> the instance's (the sum over its processes)."""
        dist.all_reduce(partial, group=self.groups.data)
        return partial
