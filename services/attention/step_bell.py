"""How an attention instance wakes idle peers, and is woken by them, through the controller.

Busy steps never touch the control plane (remote_ffn.py). After an idle step (no tokens on
any attention instance) every member stops until one has work again: that one opens the next
step here (asynchronously: it sends its header on and never waits for the answer), and the
members waiting for that step wake, FFN instances to receive it and idle attention instances
to take part in it with no tokens of their own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from services.common.control_client import ClusterShutdown, ControlClient, ControlError

log = logging.getLogger(__name__)
POLL_S = 1.0  # one long-poll round: a stale epoch or a stop is noticed within it


class StepBell:
    def __init__(
        self,
        control: ControlClient,
        attention_index: int,
        on_ring: Callable[[], None] = lambda: None,
    ) -> None:
        """`on_ring`: called (on the bell's thread) when a peer opened the watched step; it
        may be set later (the engine driver is built after the executor)."""
        self.control = control
        self.attention_index = attention_index
        self.on_ring = on_ring
        self._opens = ThreadPoolExecutor(1, thread_name_prefix="step-open")
        self._cond = threading.Condition()
        self._epoch = 0
        self._watched: int | None = None  # the step waited for
        self._rung = -1  # the newest step known to be open
        self._closed = False
        self._thread = threading.Thread(target=self._watch, name="step-bell", daemon=True)
        self._thread.start()

    def rebind(self, epoch: int) -> None:
        """A new membership epoch: its steps count from 0."""
        with self._cond:
            self._epoch, self._watched, self._rung = epoch, None, -1
            self._cond.notify_all()

    def open(self, step: int) -> None:
        """This instance starts `step` after an idle one: wake whoever waits for it."""
        self._opens.submit(self._open, self._epoch, step)

    def watch(self, step: int) -> None:
        """Wait, in the background, for a peer to open `step`; then `on_ring`."""
        with self._cond:
            self._watched = step
            self._cond.notify_all()

    def rang(self, step: int) -> bool:
        """Whether some attention instance has opened `step`."""
        with self._cond:
            return self._rung >= step

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._opens.shutdown(wait=False)

    def _open(self, epoch: int, step: int) -> None:
        try:
            self.control.open_step(epoch, step, self.attention_index)
        except (ControlError, ConnectionError, TimeoutError, ClusterShutdown) as err:
            # Peers then wake late or not at all: the data plane's step timeout names them.
            log.warning("opening step %d of epoch %d failed: %s", step, epoch, err)

    def _watch(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._watched is not None)
                if self._closed:
                    return
                epoch, step = self._epoch, self._watched
            try:
                opened = self.control.await_step(epoch, step, POLL_S)
            except ClusterShutdown:
                return
            except (ControlError, ConnectionError, TimeoutError) as err:
                # The epoch is over (recovery rebinds the bell) or the controller restarts.
                log.info("waiting for step %d of epoch %d: %s", step, epoch, err)
                with self._cond:
                    self._cond.wait(POLL_S)
                continue
            if opened:
                with self._cond:
                    if (self._epoch, self._watched) != (epoch, step):
                        continue  # rebound or re-aimed meanwhile
                    self._rung, self._watched = max(self._rung, step), None
                try:
                    self.on_ring()
                except Exception:  # the bell must outlive a failing listener
                    log.exception("waking the engine failed")
