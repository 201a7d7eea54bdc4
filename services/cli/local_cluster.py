"""A whole AFD cluster as local processes: the controller, M attention and N FFN instances.

Each child's command line names its role and index (`... afd attention --index 1 ...`), so
`ps` and `top` tell them apart; each line it prints is echoed with that name. If any child
dies, or on `stop()`, every child is stopped: SIGTERM, a grace period, then SIGKILL.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

STOP_GRACE_S = 10.0
READY = re.compile(r"serving on (\S+)|controller listening on (\S+)")  # printed when up
METRICS = re.compile(r"metrics on (\S+)")  # printed before READY, when metrics are served


@dataclass
class Child:
    name: str  # "attention instance 0"
    process: subprocess.Popen
    address: str | None = None
    metrics: str | None = None  # HOST:PORT of its /metrics, if it serves them
    ready: threading.Event = field(default_factory=threading.Event)


class LocalCluster:
    def __init__(self, num_processes: int, echo: bool = True) -> None:
        self.children: list[Child] = []
        # The instances share this machine's cores: without a cap each would start a thread
        # per core, and oversubscribed CPU math runs many times slower. A user's setting wins.
        threads = str(max(1, (os.cpu_count() or 1) // num_processes))
        self.env = {"OMP_NUM_THREADS": threads, **os.environ}
        self.echo = echo
        self._output = threading.Lock()  # whole lines, never interleaved

    def say(self, line: str) -> None:
        with self._output:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def start(self, name: str, args: list[str]) -> Child:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *args],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=self.env,
            text=True,
            bufsize=1,
        )
        child = Child(name, process)
        self.children.append(child)
        threading.Thread(target=self._read, args=(child,), daemon=True).start()
        return child

    def _read(self, child: Child) -> None:
        for line in child.process.stdout:
            metrics = METRICS.search(line)
            if metrics:
                child.metrics = metrics.group(1)
            match = READY.search(line)
            if match and not child.ready.is_set():
                child.address = match.group(1) or match.group(2)
                child.ready.set()
            if self.echo:
                self.say(f"[{child.name}] {line.rstrip()}")

    def wait_ready(self, child: Child, timeout_s: float) -> str:
        """The child's address, once it prints it; raises if it dies or takes too long."""
        deadline = time.monotonic() + timeout_s
        while not child.ready.wait(0.1):
            if child.process.poll() is not None:
                raise RuntimeError(f"{child.name} exited with code {child.process.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{child.name} was not ready within {timeout_s:g} s")
        return child.address

    def first_exit(self) -> Child | None:
        return next((c for c in self.children if c.process.poll() is not None), None)

    def stop(self) -> None:
        for child in reversed(self.children):  # instances first, the controller last
            if child.process.poll() is None:
                child.process.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for child in self.children:
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
