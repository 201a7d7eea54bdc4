"""Step plans: how many tokens each attention instance puts in each micro-batch of a step.

Every decode step, each attention instance submits its micro-batch token counts; the step's
plan is complete when all have. FFN instances and the attention instances themselves wait for
it, so that every rank sizes its torch.distributed buffers the same way. Only the newest
`keep_steps` steps are kept: a plan is consumed within a step or two of being submitted.
A book belongs to one membership epoch (its rows are that epoch's attention members, in rank
order); `PlanDesk` holds the current one and closes it when the epoch ends, waking its
waiters with `StaleEpoch`.

This runs every decode step, so it stays lean: one Condition, notified only when a step
completes (or is dropped incomplete, or the cluster shuts down). Plain Python; knows nothing
of gRPC or tensors.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.common.cluster import Membership
from services.controller.errors import Conflict, Refused, ShuttingDown, StaleEpoch

DEFAULT_KEEP_STEPS = 64

Plan = tuple[tuple[int, ...], ...]  # counts[attention member, in rank order][micro_batch]


@dataclass(frozen=True)
class PlanPending:
    """The wait ran out before every attention instance submitted the step."""

    missing_attention_indices: tuple[int, ...]


class PlanBook:
    def __init__(
        self,
        epoch: int,
        attention_indices: Sequence[int],
        num_micro_batches: int,
        keep_steps: int = DEFAULT_KEEP_STEPS,
        on_plan: Callable[[float], None] | None = None,
    ) -> None:
        """`attention_indices`: the epoch's attention members, in rank order (a plan's rows);
        `on_plan`: called with each step's seconds from its first submission to its complete
        plan (metrics)."""
        if not attention_indices or num_micro_batches < 1 or keep_steps < 1:
            raise ValueError(
                "attention_indices must not be empty, num_micro_batches and keep_steps must "
                f"be >= 1, got {list(attention_indices)}, {num_micro_batches}, {keep_steps}"
            )
        self.epoch = epoch
        self._row_of = {index: row for row, index in enumerate(attention_indices)}
        self.num_attention_instances = len(self._row_of)
        self.num_micro_batches = num_micro_batches
        self.keep_steps = keep_steps
        self._cond = threading.Condition()
        self._rows: dict[int, list[tuple[int, ...] | None]] = {}  # incomplete steps
        self._plans: dict[int, Plan] = {}  # complete steps
        self._newest = -1
        self._oldest_kept = 0
        self._shutting_down = False
        self._closed = False  # the epoch ended
        self._on_plan = on_plan
        self._opened: dict[int, float] = {}  # when each incomplete step was first submitted

    def submit(self, epoch: int, step: int, attention_index: int, counts: Sequence[int]) -> None:
        """Attention instance `attention_index`'s token counts per micro-batch for `step`."""
        counts = tuple(counts)
        if len(counts) != self.num_micro_batches:
            raise Refused(
                f"attention instance {attention_index} submitted {len(counts)} micro-batch "
                f"counts for step {step}; the cluster runs {self.num_micro_batches} micro-batches"
            )
        if any(count < 0 for count in counts):
            raise ValueError(f"token counts must be >= 0, got {list(counts)}")
        with self._cond:
            self._check(epoch, step)
            position = self._row_of.get(attention_index)
            if position is None:
                raise Refused(
                    f"attention instance {attention_index} is not a member of epoch {epoch} "
                    f"(its members: {list(self._row_of)}): register again"
                )
            plan = self._plans.get(step)
            if plan is not None:
                if plan[position] != counts:
                    raise Conflict(
                        f"attention instance {attention_index} submitted step {step} again with "
                        f"counts {list(counts)} after its plan completed with "
                        f"{list(plan[position])}: a complete step's plan cannot change"
                    )
                return  # a retry
            row = self._rows.get(step)
            if row is None:
                row = self._open(step)
            row[position] = counts  # may replace an earlier submission: nobody saw it
            submitted = tuple(counts for counts in row if counts is not None)
            if len(submitted) == self.num_attention_instances:
                self._plans[step] = submitted
                del self._rows[step]
                opened = self._opened.pop(step, None)
                if self._on_plan is not None and opened is not None:
                    self._on_plan(time.monotonic() - opened)
                self._cond.notify_all()

    def wait(self, epoch: int, step: int, timeout_s: float) -> Plan | PlanPending:
        """The complete plan of `step`, once every attention instance has submitted it."""
        with self._cond:
            self._check(epoch, step)
            self._cond.wait_for(
                lambda: (
                    self._shutting_down
                    or self._closed
                    or step in self._plans
                    or step < self._oldest_kept
                ),
                timeout_s,
            )
            if self._shutting_down:
                raise ShuttingDown("the cluster is shutting down")
            self._check(epoch, step)
            plan = self._plans.get(step)
            if plan is not None:
                return plan
            row = self._rows.get(step, [None] * self.num_attention_instances)
            indices = list(self._row_of)
            return PlanPending(tuple(indices[i] for i, counts in enumerate(row) if counts is None))

    def shut_down(self) -> None:
        with self._cond:
            self._shutting_down = True
            self._cond.notify_all()

    def close(self) -> None:
        """The epoch ended: every call from now on, waiting or not, raises StaleEpoch."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _check(self, epoch: int, step: int) -> None:
        if epoch != self.epoch or self._closed:
            raise stale(epoch, None if self._closed else self.epoch)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self._oldest_kept:
            raise Refused(
                f"step {step} is more than {self.keep_steps} steps behind the newest step "
                f"{self._newest}; its plan is no longer kept"
            )

    def _open(self, step: int) -> list[tuple[int, ...] | None]:
        """A row for a new step; a new newest step drops the steps that fell out of the window."""
        row: list[tuple[int, ...] | None] = [None] * self.num_attention_instances
        self._rows[step] = row
        self._opened[step] = time.monotonic()
        if step > self._newest:
            self._newest = step
            self._oldest_kept = max(self._oldest_kept, step - self.keep_steps)
            for old in [old for old in self._plans if old < self._oldest_kept]:
                del self._plans[old]
            incomplete = [old for old in self._rows if old < self._oldest_kept]
            for old in incomplete:
                del self._rows[old]
                self._opened.pop(old, None)
            if incomplete:
                self._cond.notify_all()  # their waiters must not sleep until their timeout
        return row


def stale(epoch: int, current: int | None) -> StaleEpoch:
    """The refusal of a call for `epoch` while the cluster is at `current` (None: forming)."""
    if current is None:
        return StaleEpoch(
            f"epoch {epoch} is over: the cluster is re-forming (a member died, left or "
            "joined); register again to join the next epoch"
        )
    return StaleEpoch(
        f"the call is for epoch {epoch} but the cluster is at epoch {current}: register "
        "again to join it"
    )


class PlanDesk:
    """The plan book of the current membership epoch, if one is formed."""

    def __init__(
        self,
        num_micro_batches: int,
        keep_steps: int = DEFAULT_KEEP_STEPS,
        on_plan: Callable[[float], None] | None = None,
    ) -> None:
        self.num_micro_batches = num_micro_batches
        self.keep_steps = keep_steps
        self.on_plan = on_plan
        self._lock = threading.Lock()
        self._book: PlanBook | None = None
        self._ended = 0  # the newest epoch that ended
        self._shutting_down = False

    def change(self, membership: Membership | None) -> None:
        """The registry's listener: an epoch ended (None) or one formed."""
        book = None
        if membership is not None:
            book = PlanBook(
                membership.epoch,
                membership.attention_indices,
                self.num_micro_batches,
                self.keep_steps,
                self.on_plan,
            )
        with self._lock:
            old, self._book = self._book, book
            if old is not None:
                self._ended = old.epoch
        if old is not None:
            old.close()

    def book(self, epoch: int) -> PlanBook:
        """The book of `epoch`; StaleEpoch if that is not the current, formed epoch."""
        with self._lock:
            if self._shutting_down:
                raise ShuttingDown("the cluster is shutting down")
            book, ended = self._book, self._ended
        if book is None and epoch > ended:
            raise Refused(
                f"epoch {epoch} has not formed yet: ask for plans once registration returned "
                "the membership"
            )
        if book is None or book.epoch != epoch:
            raise stale(epoch, None if book is None else book.epoch)
        return book

    def shut_down(self) -> None:
        with self._lock:
            self._shutting_down = True
            book = self._book
        if book is not None:
            book.shut_down()
