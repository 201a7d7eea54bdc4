"""Registration: who has joined, and the membership once every expected instance has.

Each instance registers its role, index, address and model fingerprint; the membership forms
when the last expected one arrives, and every waiter gets the same value. Ranks: attention
instances 0..M-1 by index, FFN instances M..M+N-1 by index.

Plain Python and thread-safe: one Condition guards the state and wakes waiters when the
membership forms or the cluster shuts down. Knows nothing of gRPC, torch or how the store
is hosted; detecting dead members from heartbeats is for later.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.common.cluster import ATTENTION, ROLES, Member, Membership, Slot
from services.controller.errors import Conflict, Refused, ShuttingDown

FIRST_EPOCH = 1


@dataclass(frozen=True)
class ClusterSpec:
    """What the controller expects, from its command line."""

    num_attention_instances: int
    num_ffn_instances: int
    num_micro_batches: int
    fingerprint: str  # of the model every member must serve

    def __post_init__(self) -> None:
        for name in ("num_attention_instances", "num_ffn_instances", "num_micro_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.fingerprint:
            raise ValueError("fingerprint must not be empty")

    def num_instances(self, role: str) -> int:
        return self.num_attention_instances if role == ATTENTION else self.num_ffn_instances

    def slots(self) -> list[Slot]:
        """Every expected place, in rank order."""
        return [(role, index) for role in ROLES for index in range(self.num_instances(role))]


@dataclass(frozen=True)
class RegistrationPending:
    """The wait ran out before the membership formed."""

    missing: tuple[Slot, ...]  # in rank order


class Registry:
    def __init__(
        self,
        spec: ClusterSpec,
        store_host: str,
        store_port: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self._store = (store_host, store_port)
        self._clock = clock
        self._cond = threading.Condition()
        self._addresses: dict[Slot, str] = {}
        self._last_seen: dict[Slot, float] = {}
        self._membership: Membership | None = None
        self._shutting_down = False

    def register(self, role: str, index: int, address: str, fingerprint: str) -> None:
        """Take the place (role, index). Taking it again from the same address is a no-op."""
        self._check_slot(role, index)
        if not address:
            raise ValueError(f"{role} instance {index} registered without an address")
        if fingerprint != self.spec.fingerprint:
            raise Refused(
                f"{role} instance {index} serves model fingerprint {fingerprint or '(none)'} "
                f"but the cluster serves {self.spec.fingerprint}: start it with the same "
                "checkpoint"
            )
        with self._cond:
            if self._shutting_down:
                raise ShuttingDown("the cluster is shutting down")
            slot = (role, index)
            taken_by = self._addresses.get(slot)
            if taken_by is not None and taken_by != address:
                raise Conflict(
                    f"{role} instance {index} is already registered from {taken_by}; "
                    f"{address} cannot take it too: give each {role} instance its own index"
                )
            self._addresses[slot] = address
            self._last_seen[slot] = self._clock()
            if self._membership is None and len(self._addresses) == len(self.spec.slots()):
                self._membership = self._form()
                self._cond.notify_all()

    def wait(self, timeout_s: float) -> Membership | RegistrationPending:
        """The membership, once every expected instance has registered (at most timeout_s)."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._shutting_down or self._membership is not None, timeout_s
            )
            if self._shutting_down:
                raise ShuttingDown("the cluster is shutting down")
            if self._membership is not None:
                return self._membership
            missing = tuple(slot for slot in self.spec.slots() if slot not in self._addresses)
            return RegistrationPending(missing)

    def heartbeat(self, role: str, index: int) -> bool:
        """Record that (role, index) is alive; False asks it to shut down."""
        self._check_slot(role, index)
        with self._cond:
            if self._shutting_down:
                return False
            if (role, index) not in self._addresses:
                raise Refused(f"{role} instance {index} sent a heartbeat before registering")
            self._last_seen[(role, index)] = self._clock()
            return True

    def last_seen(self, role: str, index: int) -> float | None:
        """When (role, index) last registered or sent a heartbeat, on this registry's clock."""
        with self._cond:
            return self._last_seen.get((role, index))

    @property
    def epoch(self) -> int:
        """The membership's epoch, or 0 while it is still forming."""
        with self._cond:
            return 0 if self._membership is None else self._membership.epoch

    def count(self, role: str, state: str, silent_after_s: float) -> int:
        """Instances of `role` in `state`: "missing" (not registered), "alive" (heard from
        within `silent_after_s`) or "silent" (registered, not heard from since)."""
        now = self._clock()
        with self._cond:
            indices = range(self.spec.num_instances(role))
            seen = [self._last_seen.get((role, i)) for i in indices]
        if state == "missing":
            return sum(t is None for t in seen)
        alive = sum(t is not None and now - t <= silent_after_s for t in seen)
        return alive if state == "alive" else sum(t is not None for t in seen) - alive

    def shut_down(self) -> None:
        with self._cond:
            self._shutting_down = True
            self._cond.notify_all()

    def _check_slot(self, role: str, index: int) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        expected = self.spec.num_instances(role)
        if not 0 <= index < expected:
            raise Refused(
                f"{role} index {index} is out of range: the cluster expects {expected} "
                f"{role} instance(s), indices 0..{expected - 1}"
            )

    def _form(self) -> Membership:
        members = tuple(
            Member(role, index, rank, self._addresses[(role, index)])
            for rank, (role, index) in enumerate(self.spec.slots())
        )
        host, port = self._store
        return Membership(
            epoch=FIRST_EPOCH,
            world_size=len(members),
            store_host=host,
            store_port=port,
            num_micro_batches=self.spec.num_micro_batches,
            members=members,
        )
