"""`afd serve`'s supervision: a process of the local cluster that dies is started again, as
Kubernetes restarts a pod's container, so the local stack heals the way a cluster does.

Restarts back off (1, 2, 4 ... 30 s after a process that died again soon after its start) and
give up when one process dies `MAX_QUICK_DEATHS` times in a row within `QUICK_S` of starting,
which is a process that cannot start (a bad flag, a broken checkpoint), not a crash.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from services.cli.local_cluster import Child, LocalCluster

QUICK_S = 30.0  # a process that dies sooner than this after its start died "quickly"
MAX_QUICK_DEATHS = 5
MAX_BACKOFF_S = 30.0


class GiveUp(RuntimeError):
    """A process keeps dying as soon as it starts."""


@dataclass
class _Record:
    quick_deaths: int = 0
    restart_at: float | None = None  # when the pending restart is due


class Supervisor:
    def __init__(
        self, cluster: LocalCluster, clock=time.monotonic, restart_clean_exits: bool = True
    ) -> None:
        """`restart_clean_exits`: start again a process that exited with 0 too (`afd serve`:
        every process is meant to run until the cluster is stopped)."""
        self.cluster = cluster
        self.clock = clock
        self.restart_clean_exits = restart_clean_exits
        self.restarts = 0
        self._records: dict[int, _Record] = {}

    def check(self) -> None:
        """Restart every child that exited and whose back-off is over; call it often."""
        for child in self.cluster.children:
            code = child.process.poll()
            if code is None or (code == 0 and not self.restart_clean_exits):
                continue
            record = self._records.setdefault(id(child), _Record())
            now = self.clock()
            if record.restart_at is None:
                record.restart_at = now + self._backoff(child, record, now)
            if now >= record.restart_at:
                record.restart_at = None
                self.restarts += 1
                self.cluster.say(
                    f"{child.name} exited with code {child.process.returncode}; "
                    f"restarting it (restart {self.restarts})"
                )
                self.cluster.restart(child)

    def _backoff(self, child: Child, record: _Record, now: float) -> float:
        if now - child.started > QUICK_S:
            record.quick_deaths = 0
            return 0.0
        record.quick_deaths += 1
        if record.quick_deaths >= MAX_QUICK_DEATHS:
            raise GiveUp(
                f"{child.name} exited with code {child.process.returncode}, "
                f"{record.quick_deaths} times in a row within {QUICK_S:g} s of starting; "
                "stopping the cluster"
            )
        return min(2.0 ** (record.quick_deaths - 1), MAX_BACKOFF_S)
