"""Registration and epochs: who is in the cluster now.

Each instance registers its role, index, address and model fingerprint. An epoch's
membership forms once every place it waits for is taken: every FFN place (they hold the
experts), and every attention place whose holder is alive (the first epoch waits for all).
Ranks: the attention members by index, then the FFN members by index.

A formed epoch ends, and the next one opens, when
- a member has been silent (no heartbeat) for `silent_after_s`: presumed dead;
- a member of it registers again with `last_epoch` set to it: its data-plane group broke;
- a new member registers (a replacement, an attention place filled again, a new place);
- a member leaves (a drained instance, or one removed by scaling down).
Every live member then registers again, with `last_epoch`, and forms the next epoch with a
new torch.distributed group. `on_change` hears of each change: None when an epoch ends, the
new membership when one forms (the plan desk keys step plans by it).

Resizing (`resize`: a StatefulSet was scaled) never ends an epoch by itself: a new place
joins when its member registers (the cluster serves on while a new pod loads its weights),
and a place above the new size stays while its member is alive (an attention instance
finishes its requests, then leaves). FFN places are 0..n-1 with no gap (the experts are
split by index), so an FFN member whose lower places have never registered waits for them
rather than opening an epoch.

Plain Python and thread-safe: one Condition guards the state and wakes waiters when a
membership forms or the cluster shuts down. Knows nothing of gRPC, torch or how the store
is hosted. `tick()` (called every fraction of a second) notices silence.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from services.common.cluster import (
    ATTENTION,
    FFN,
    HEARTBEAT_INTERVAL_S,
    ROLES,
    SILENT_AFTER_S,
    ClusterState,
    Member,
    Membership,
    Slot,
    place_name,
)
from services.common.cluster_config import ClusterConfig
from services.controller.errors import Conflict, Refused, ShuttingDown

log = logging.getLogger(__name__)

FIRST_EPOCH = 1


@dataclass(frozen=True)
class ClusterSpec:
    """What the controller expects, from its command line."""

    num_attention_instances: int
    num_ffn_instances: int
    config: ClusterConfig  # the facts every membership carries
    fingerprint: str  # of the model every member must serve

    def __post_init__(self) -> None:
        for name in ("num_attention_instances", "num_ffn_instances"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.fingerprint:
            raise ValueError("fingerprint must not be empty")

    def num_instances(self, role: str) -> int:
        return self.num_attention_instances if role == ATTENTION else self.num_ffn_instances

    def num_places(self, role: str) -> int:
        """Places are processes: an FFN instance holds `ffn_instance_size` of them."""
        return self.num_instances(role) * (self.group_size if role == FFN else 1)

    @property
    def group_size(self) -> int:
        """Processes per FFN instance: FFN places join and go in whole groups of them."""
        return self.config.ffn_instance_size

    def name(self, role: str, index: int) -> str:
        return place_name(role, index, self.group_size)

    def resized(self, num_attention_instances: int, num_ffn_instances: int) -> ClusterSpec:
        return replace(
            self,
            num_attention_instances=num_attention_instances,
            num_ffn_instances=num_ffn_instances,
        )

    def slots(self) -> list[Slot]:
        """Every expected place, in rank order."""
        return [(role, index) for role in ROLES for index in range(self.num_places(role))]


@dataclass(frozen=True)
class RegistrationPending:
    """The wait ran out before the membership formed."""

    missing: tuple[Slot, ...]  # in rank order


MembershipListener = Callable[[Membership | None], None]


def rank_order(slot: Slot) -> tuple[int, int]:
    """Attention places first, then FFN places, each by index."""
    return ROLES.index(slot[0]), slot[1]


class Registry:
    def __init__(
        self,
        spec: ClusterSpec,
        store_host: str,
        store_port: int,
        clock: Callable[[], float] = time.monotonic,
        silent_after_s: float = SILENT_AFTER_S,
        on_change: MembershipListener | None = None,
    ) -> None:
        if not silent_after_s > HEARTBEAT_INTERVAL_S:
            raise ValueError(
                f"the member timeout must exceed the {HEARTBEAT_INTERVAL_S:g} s heartbeat "
                f"interval, got {silent_after_s:g} s"
            )
        self.spec = spec
        self.silent_after_s = silent_after_s
        self._store = (store_host, store_port)
        self._clock = clock
        self._on_change = on_change
        self._cond = threading.Condition()
        self._epoch = FIRST_EPOCH  # the current epoch, formed or forming
        self._addresses: dict[Slot, str] = {}  # registered for the current epoch
        self._last_seen: dict[Slot, float] = {}  # every member ever heard from (until it leaves)
        self._incarnations: dict[Slot, str] = {}  # the process that last registered each place
        self._membership: Membership | None = None  # the current epoch's, once formed
        self._previous: Membership | None = None  # the last formed one
        self._shutting_down = False

    def register(
        self,
        role: str,
        index: int,
        address: str,
        fingerprint: str,
        last_epoch: int = 0,
        incarnation: str = "",
    ) -> None:
        """Take the place (role, index) in the current epoch. `last_epoch`: the epoch the
        member last belonged to (0: none); `incarnation`: its process's own id. The same
        process taking it again while the epoch forms, or after it formed with this member
        in it, is a no-op (a retry); a new process at the same address is a new member."""
        if not address:
            raise ValueError(f"{self.spec.name(role, index)} registered without an address")
        if fingerprint != self.spec.fingerprint:
            raise Refused(
                f"{self.spec.name(role, index)} serves model fingerprint "
                f"{fingerprint or '(none)'} "
                f"but the cluster serves {self.spec.fingerprint}: start it with the same "
                "checkpoint"
            )
        slot = (role, index)
        with self._cond:
            self._check_slot(role, index)
            if self._shutting_down:
                raise ShuttingDown("the cluster is shutting down")
            formed = self._membership
            holder = (formed.address_of(*slot) if formed else None) or self._addresses.get(slot)
            if holder is not None and holder != address and not self._silent(slot):
                raise Conflict(
                    f"{self.spec.name(role, index)} is already registered from {holder}; "
                    f"{address} cannot take it too: give each {role} process its own index"
                )
            self._last_seen[slot] = self._clock()
            same_process = self._incarnations.get(slot, incarnation) == incarnation
            self._incarnations[slot] = incarnation
            if formed is not None:
                if holder == address and last_epoch < formed.epoch and same_process:
                    return  # a retry of the registration that formed this epoch
                if holder is None and slot not in self._expected():
                    return  # an FFN place past a gap: it waits for the places below it
                if last_epoch == formed.epoch:
                    why = "its data-plane group broke"
                elif holder == address:
                    why = "its process restarted"
                else:
                    why = f"{address} takes the place"
                self._open_next(f"{self.spec.name(role, index)} registered: {why}")
            self._addresses[slot] = address
            self._try_form()

    def wait(
        self, role: str, index: int, address: str, timeout_s: float
    ) -> Membership | RegistrationPending:
        """The membership with `address` in place (role, index), once formed (at most
        timeout_s)."""

        def formed_with_it() -> bool:
            m = self._membership
            return m is not None and m.address_of(role, index) == address

        with self._cond:
            self._cond.wait_for(lambda: self._shutting_down or formed_with_it(), timeout_s)
            if self._shutting_down:
                raise ShuttingDown("the cluster is shutting down")
            if formed_with_it():
                return self._membership
            expected = self._expected()
            missing = expected - set(self._addresses)
            if (role, index) not in expected:  # an FFN place past a gap waits for the gap,
                g = self.spec.group_size  # and for the rest of its instance
                end = (index // g + 1) * g
                missing |= {(FFN, i) for i in range(end) if (FFN, i) not in self._last_seen}
            return RegistrationPending(tuple(sorted(missing, key=rank_order)))

    def heartbeat(self, role: str, index: int) -> tuple[bool, int]:
        """Record that (role, index) is alive. Returns whether it should keep running (False:
        shut down), and the current epoch (a member of an older one must register again)."""
        with self._cond:
            self._check_slot(role, index)
            if self._shutting_down:
                return False, self._epoch
            if (role, index) not in self._last_seen:
                raise Refused(
                    f"{self.spec.name(role, index)} sent a heartbeat but is not registered (the "
                    "controller restarted, or the member left): register again"
                )
            self._last_seen[(role, index)] = self._clock()
            return True, self._epoch

    def leave(self, role: str, index: int) -> None:
        """(role, index) leaves for good: the cluster re-forms without it."""
        slot = (role, index)
        with self._cond:
            self._check_slot(role, index)
            if self._shutting_down:
                return
            self._last_seen.pop(slot, None)
            self._addresses.pop(slot, None)
            self._incarnations.pop(slot, None)
            formed = self._membership
            if formed is not None and formed.address_of(*slot) is not None:
                self._open_next(f"{self.spec.name(role, index)} left")
            self._try_form()

    def tick(self) -> None:
        """Notice silence: end an epoch whose member went silent; form one that waited only
        for members that went silent."""
        with self._cond:
            if self._shutting_down:
                return
            self._forget_removed()
            formed = self._membership
            if formed is None:
                self._try_form()
                return
            silent = [formed.name_of(m) for m in formed.members if self._silent((m.role, m.index))]
            if silent:
                self._open_next(
                    f"{', '.join(silent)} silent for over {self.silent_after_s:g} s, presumed dead"
                )
                self._try_form()

    def gone(self, role: str, index: int, host: str) -> None:
        """Pod `index` of `role` at `host` no longer exists: its members (an FFN pod runs
        its instance's processes) are gone, drained or not (no need to wait for their
        silence). A member that registered from another host since (its replacement) stays."""
        size = self.spec.group_size if role == FFN else 1
        for place in range(index * size, (index + 1) * size):
            self._gone(role, place, host)

    def _gone(self, role: str, index: int, host: str) -> None:
        slot = (role, index)
        with self._cond:
            formed = self._membership
            address = (formed.address_of(*slot) if formed else None) or self._addresses.get(slot)
            if address is None or address.rsplit(":", 1)[0].strip("[]") != host:
                return
            log.info("%s: its pod at %s is gone", self.spec.name(role, index), host)
            self.leave(role, index)

    def resize(self, num_attention_instances: int, num_ffn_instances: int) -> None:
        """The cluster's size changed (a StatefulSet was scaled). New places join as their
        members register; places above the new size go when their members leave or die."""
        spec = self.spec.resized(num_attention_instances, num_ffn_instances)
        with self._cond:
            if spec == self.spec:
                return
            log.info(
                "resized from %d attention and %d FFN places to %d and %d",
                self.spec.num_attention_instances,
                self.spec.num_ffn_instances,
                spec.num_attention_instances,
                spec.num_ffn_instances,
            )
            self.spec = spec
            self._forget_removed()
            self._try_form()
            self._cond.notify_all()  # a waiter's missing places may have changed

    def state(self) -> ClusterState:
        """The current epoch (formed or forming), the newest formed membership (the previous
        one while an epoch forms; None before the first forms) and the size."""
        with self._cond:
            return ClusterState(
                self._epoch,
                self._membership or self._previous,
                self.spec.num_places(ATTENTION),
                self.spec.num_places(FFN),
                self.spec.config,
            )

    def last_seen(self, role: str, index: int) -> float | None:
        """When (role, index) last registered or sent a heartbeat, on this registry's clock."""
        with self._cond:
            return self._last_seen.get((role, index))

    @property
    def epoch(self) -> int:
        """The membership's epoch, or 0 while it is forming."""
        with self._cond:
            return 0 if self._membership is None else self._membership.epoch

    def count(self, role: str, state: str, silent_after_s: float) -> int:
        """Instances of `role` in `state`: "missing" (not registered), "alive" (heard from
        within `silent_after_s`) or "silent" (registered, not heard from since)."""
        now = self._clock()
        with self._cond:
            indices = range(self.spec.num_places(role))
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
        """Refuse a place outside the cluster. Called with the lock held: a place above the
        size is valid only while its member is known (scaled down, still draining)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        expected = self.spec.num_places(role)
        if not 0 <= index < expected and (role, index) not in self._last_seen:
            processes = f" of {self.spec.group_size} processes" if role == FFN else ""
            raise Refused(
                f"{role} index {index} is out of range: the cluster expects "
                f"{self.spec.num_instances(role)} {role} instance(s){processes}, indices "
                f"0..{expected - 1}"
            )

    def _silent(self, slot: Slot) -> bool:
        seen = self._last_seen.get(slot)
        return seen is None or self._clock() - seen > self.silent_after_s

    def _expected(self) -> set[Slot]:
        """The places the current epoch waits for. The first epoch: every place. Later ones:
        FFN places 0..n-1, where n covers the last epoch's FFN places within the size (a
        dead member's experts wait for its replacement) and every FFN place heard from up to
        the first never heard from (new places, members above the size still draining), in
        whole FFN instances; and the places of the attention members alive (a dead one's
        place stays empty; its replacement joins a later epoch)."""
        last = self._membership or self._previous
        if last is None:
            return set(self.spec.slots())
        known = set(self._last_seen)
        heard = 0
        while (FFN, heard) in known:
            heard += 1
        heard -= heard % self.spec.group_size  # an instance joins when all of it is heard
        num_ffn = max(min(len(last.ffn_ranks), self.spec.num_places(FFN)), heard)
        ffn = {(FFN, i) for i in range(num_ffn)}
        attention = {slot for slot in known if slot[0] == ATTENTION and not self._silent(slot)}
        return ffn | attention

    def _forget_removed(self) -> None:
        """Places above the size whose members went silent are gone for good (a pod of a
        scaled-down StatefulSet that did not leave); a formed epoch they were in ends."""
        removed = [
            (role, index)
            for role, index in self._last_seen
            if index >= self.spec.num_places(role) and self._silent((role, index))
        ]
        for slot in removed:
            del self._last_seen[slot]
            self._addresses.pop(slot, None)
            self._incarnations.pop(slot, None)
        formed = self._membership
        gone = [s for s in removed if formed is not None and formed.address_of(*s) is not None]
        if gone:
            names = ", ".join(self.spec.name(role, index) for role, index in gone)
            self._open_next(f"{names} removed by a resize and silent")

    def _open_next(self, why: str) -> None:
        """End the formed epoch; the next one forms as its members register again."""
        ended = self._membership
        assert ended is not None
        self._previous, self._membership = ended, None
        self._epoch += 1
        self._addresses = {}
        log.info("epoch %d ended (%s); epoch %d forms", ended.epoch, why, self._epoch)
        if self._on_change is not None:
            self._on_change(None)
        self._cond.notify_all()

    def _try_form(self) -> None:
        if self._membership is not None:
            return
        expected = self._expected()
        taken = set(self._addresses) & expected
        has_attention = any(role == ATTENTION for role, _ in taken)
        if not has_attention or not expected <= taken:
            return
        slots = sorted(taken, key=rank_order)
        members = tuple(
            Member(role, index, rank, self._addresses[(role, index)])
            for rank, (role, index) in enumerate(slots)
        )
        host, port = self._store
        self._membership = Membership(
            epoch=self._epoch,
            world_size=len(members),
            store_host=host,
            store_port=port,
            config=self.spec.config,
            members=members,
        )
        log.info(
            "epoch %d formed: %s",
            self._epoch,
            ", ".join(self.spec.name(m.role, m.index) for m in members),
        )
        if self._on_change is not None:
            self._on_change(self._membership)
        self._cond.notify_all()
