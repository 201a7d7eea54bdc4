"""Who is in the cluster: the membership the controller hands every attention and FFN process.

Ranks follow one rule, so every process derives the same torch.distributed world: the
attention members take the first ranks by index, then the FFN members by index. Every FFN
place is always filled (they hold the experts); an attention place may be empty for an epoch
(its instance died and was left out), so attention indices may have gaps.

A place is one process. An FFN instance of G processes (the cluster's `ffn_instance_size`)
holds the G places instance x G .. instance x G + G - 1, so the membership lists its processes
in order and every member derives the instances from it (ffn_instances.py).

Plain values; knows nothing of gRPC or torch. `services.common.control_client` re-exports them.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from services.common.cluster_config import ClusterConfig

ATTENTION = "attention"
FFN = "ffn"
ROLES = (ATTENTION, FFN)

Slot = tuple[str, int]  # (role, index): one place in the cluster

HEARTBEAT_INTERVAL_S = 1.0  # how often a member tells the controller it is alive
SILENT_AFTER_S = 3 * HEARTBEAT_INTERVAL_S  # not heard from this long: presumed dead
MEMBER_STATES = ("missing", "alive", "silent")  # not registered / heard from / not lately
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")  # bind addresses that name no one host


def place_name(role: str, index: int, ffn_instance_size: int = 1) -> str:
    """How messages name a place: "attention instance 2", "ffn instance 1", or, for a
    process of a several-process FFN instance, "ffn instance 1 process 3"."""
    if role == FFN and ffn_instance_size > 1:
        instance, position = divmod(index, ffn_instance_size)
        return f"{role} instance {instance} process {position}"
    return f"{role} instance {index}"


def reachable_host(bind_host: str) -> str:
    """The host peers reach a server bound to `bind_host` at: itself, or this machine's name
    for a wildcard (which names no one host)."""
    return socket.gethostname() if bind_host in WILDCARD_HOSTS else bind_host


@dataclass(frozen=True)
class Member:
    role: str  # "attention" or "ffn"
    index: int  # 0-based within its role
    rank: int  # rank in the torch.distributed world group
    address: str  # host:port of the member's own gRPC server (health, API)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"member role must be one of {ROLES}, got {self.role!r}")
        if self.index < 0 or self.rank < 0:
            raise ValueError(f"member index and rank must be >= 0, got {self.index}, {self.rank}")
        if not self.address:
            raise ValueError(f"{self.role} instance {self.index} has an empty address")


@dataclass(frozen=True)
class Membership:
    epoch: int  # 1 for the first membership; a re-formed cluster gets a new one
    world_size: int
    store_host: str  # torch.distributed TCPStore hosted by the controller
    store_port: int
    config: ClusterConfig  # the facts every member takes from here (cluster_config.py)
    members: tuple[Member, ...]  # ordered by rank

    def __post_init__(self) -> None:
        if self.epoch < 1:
            raise ValueError(f"membership epoch must be >= 1, got {self.epoch}")
        if not 0 < self.store_port < 65536:
            raise ValueError(f"store_port must be a TCP port, got {self.store_port}")
        ranks = [member.rank for member in self.members]
        if ranks != list(range(self.world_size)):
            raise ValueError(
                f"members must hold ranks 0..{self.world_size - 1} in order, got {ranks}"
            )
        roles = [member.role for member in self.members]
        if roles != sorted(roles, key=ROLES.index):
            raise ValueError(f"attention members must precede FFN members, got {roles}")
        attention = [member.index for member in self.members if member.role == ATTENTION]
        if not attention or attention != sorted(set(attention)):
            raise ValueError(f"attention indices must be distinct and ascending, got {attention}")
        ffn = [member.index for member in self.members if member.role == FFN]
        if ffn != list(range(len(ffn))) or not ffn:
            raise ValueError(f"ffn indices must be 0..{len(ffn) - 1}, got {ffn}")
        if len(ffn) % self.config.ffn_instance_size:
            raise ValueError(
                f"{len(ffn)} FFN processes do not make whole FFN instances of "
                f"{self.config.ffn_instance_size}"
            )

    def name_of(self, member: Member) -> str:
        return place_name(member.role, member.index, self.config.ffn_instance_size)

    def address_of(self, role: str, index: int) -> str | None:
        """The address of the member in place (role, index), or None if it is empty."""
        for member in self.members:
            if member.role == role and member.index == index:
                return member.address
        return None

    def rank_of(self, role: str, index: int) -> int:
        for member in self.members:
            if member.role == role and member.index == index:
                return member.rank
        raise KeyError(f"no {role} instance {index} in membership epoch {self.epoch}")

    @property
    def attention_ranks(self) -> list[int]:
        return [member.rank for member in self.members if member.role == ATTENTION]

    @property
    def attention_indices(self) -> list[int]:
        """The attention members' indices, in rank order (the order of a step plan's rows)."""
        return [member.index for member in self.members if member.role == ATTENTION]

    @property
    def ffn_ranks(self) -> list[int]:
        return [member.rank for member in self.members if member.role == FFN]


@dataclass(frozen=True)
class ClusterState:
    """What the controller says of the cluster as a whole (GetMembership)."""

    epoch: int  # the current epoch, formed or forming
    membership: Membership | None  # the newest formed one; None before the first forms
    num_attention_places: int  # the cluster's size: places, filled or not
    num_ffn_places: int
    config: ClusterConfig  # what the membership will carry: known before the first forms
