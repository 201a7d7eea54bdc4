"""Which steps have been opened: the doorbell that wakes an idle cluster.

While the cluster is busy, every member knows the next step comes: the sizes travel with the
data, and a step with tokens anywhere is always followed by another (remote_ffn.py). Only a
step that follows an idle one (no attention instance had tokens) is announced: the attention
instance that has work again opens it here, and every member waiting for it (FFN instances,
idle attention instances) is woken. So the controller is never on a busy step's path.

A book belongs to one membership epoch; `StepDesk` holds the current one and closes it when
the epoch ends, waking its waiters with `StaleEpoch`. Plain Python; knows nothing of gRPC.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from services.common.cluster import Membership
from services.controller.errors import Refused, ShuttingDown, StaleEpoch


class StepBook:
    def __init__(self, epoch: int, attention_indices: tuple[int, ...]) -> None:
        self.epoch = epoch
        self.attention_indices = attention_indices
        self._cond = threading.Condition()
        self._opened = -1  # the newest opened step
        self._shutting_down = False
        self._closed = False  # the epoch ended

    def open(self, epoch: int, step: int, attention_index: int) -> bool:
        """Attention instance `attention_index` starts `step`; whether it was news."""
        with self._cond:
            self._check(epoch, step)
            if attention_index not in self.attention_indices:
                raise Refused(
                    f"attention instance {attention_index} is not a member of epoch {epoch} "
                    f"(its members: {list(self.attention_indices)}): register again"
                )
            if step <= self._opened:
                return False
            self._opened = step
            self._cond.notify_all()
            return True

    def wait(self, epoch: int, step: int, timeout_s: float) -> bool:
        """Whether `step` is open, waiting at most `timeout_s` for it."""
        with self._cond:
            self._check(epoch, step)
            self._cond.wait_for(
                lambda: self._shutting_down or self._closed or self._opened >= step, timeout_s
            )
            if self._shutting_down:
                raise ShuttingDown("the cluster is shutting down")
            self._check(epoch, step)
            return self._opened >= step

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


class StepDesk:
    """The step book of the current membership epoch, if one is formed."""

    def __init__(self, on_open: Callable[[], None] | None = None) -> None:
        """`on_open`: called for every step opened after an idle one (metrics)."""
        self.on_open = on_open
        self._lock = threading.Lock()
        self._book: StepBook | None = None
        self._ended = 0  # the newest epoch that ended
        self._shutting_down = False

    def change(self, membership: Membership | None) -> None:
        """The registry's listener: an epoch ended (None) or one formed."""
        book = None
        if membership is not None:
            book = StepBook(membership.epoch, tuple(membership.attention_indices))
        with self._lock:
            old, self._book = self._book, book
            if old is not None:
                self._ended = old.epoch
        if old is not None:
            old.close()

    def open(self, epoch: int, step: int, attention_index: int) -> None:
        if self.book(epoch).open(epoch, step, attention_index) and self.on_open is not None:
            self.on_open()

    def book(self, epoch: int) -> StepBook:
        """The book of `epoch`; StaleEpoch if that is not the current, formed epoch."""
        with self._lock:
            if self._shutting_down:
                raise ShuttingDown("the cluster is shutting down")
            book, ended = self._book, self._ended
        if book is None and epoch > ended:
            raise Refused(
                f"epoch {epoch} has not formed yet: open or await steps once registration "
                "returned the membership"
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
