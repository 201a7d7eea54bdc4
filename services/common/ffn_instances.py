"""Which FFN processes form an instance, and which of them each attention instance talks to.

An FFN instance of G processes (the cluster's `ffn_instance_size`) holds the FFN places
f x G .. f x G + G - 1: consecutive ranks of the membership. Each attention instance sends
every micro-batch to one process of each FFN instance, its *door*: the attention instance
at position a of the membership (0-based, in rank order) enters at process a % G, so the
attention side's traffic grows with the number of FFN instances, not of FFN processes, and
the doors spread the attention instances over the instance's GPUs (and their NICs).
Inside the instance, the processes exchange what their doors received over groups of their
own (`form_instance_groups`): see services/ffn/instance_group.py.

Every member derives the same answers from the membership alone: no message carries them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from services.common.cluster import Membership


def door_of(attention_position: int, instance_size: int) -> int:
    """The position, inside every FFN instance, of the process that attention instance
    `attention_position` sends to."""
    return attention_position % instance_size


def instance_ranks(membership: Membership) -> list[list[int]]:
    """The ranks of each FFN instance's processes, instances in order."""
    g, ranks = membership.config.ffn_instance_size, membership.ffn_ranks
    return [ranks[start : start + g] for start in range(0, len(ranks), g)]


def door_ranks(membership: Membership, attention_rank: int) -> list[int]:
    """The rank an attention member sends to in each FFN instance, instances in order."""
    position = membership.attention_ranks.index(attention_rank)
    door = door_of(position, membership.config.ffn_instance_size)
    return [ranks[door] for ranks in instance_ranks(membership)]


@dataclass(frozen=True)
class InstanceGroups:
    """This process's FFN instance's own process groups: `data` for the activations (NCCL on
    GPUs, where the instance's GPUs share a node), `headers` (gloo) for each step's counts."""

    data: dist.ProcessGroup
    headers: dist.ProcessGroup
    position: int  # this process's, 0 .. size - 1
    size: int  # G


def form_instance_groups(
    membership: Membership, rank: int, device: torch.device
) -> InstanceGroups | None:
    """Each FFN instance's groups, made by every member of the epoch in the same order (a
    torch.distributed rule: every rank takes part in every new group, member of it or not)
    right after joining the world group. Returns this process's instance's; None for an
    attention member, and where instances are one process (nothing to exchange)."""
    if membership.config.ffn_instance_size == 1:
        return None
    backend = "nccl" if device.type == "cuda" else "gloo"
    mine = None
    for ranks in instance_ranks(membership):
        data = dist.new_group(ranks, backend=backend)
        headers = dist.new_group(ranks, backend="gloo")
        if rank in ranks:
            mine = InstanceGroups(data, headers, ranks.index(rank), len(ranks))
    return mine
