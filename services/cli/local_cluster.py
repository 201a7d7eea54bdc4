"""A whole AFD cluster as local processes: the controller, M attention and N FFN instances.

Each child's command line names its role and index (`... afd attention --index 1 ...`), so
`ps` and `top` tell them apart; each line it prints is echoed with that name. A child that
died can be started again with the same command line (`restart`, see supervisor.py); on
`stop()` every child is stopped in stages (those that drain requests first, the processes
they need last): SIGTERM, a grace period, then SIGKILL.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

STOP_GRACE_S = 10.0  # beyond a stage's drain time
READY = re.compile(r"serving on (\S+)|controller listening on (\S+)")  # printed when up
METRICS = re.compile(r"metrics on (\S+)")  # printed before READY, when metrics are served


@dataclass
class Child:
    name: str  # "attention instance 0"
    process: subprocess.Popen
    args: list[str]  # `afd` arguments it was started with
    stage: int = 0  # stopped after every child of a lower stage has exited
    address: str | None = None
    metrics: str | None = None  # HOST:PORT of its /metrics, if it serves them
    ready: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)


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

    def start(self, name: str, args: list[str], stage: int = 0) -> Child:
        child = Child(name, self._spawn(args), args, stage)
        self.children.append(child)
        threading.Thread(target=self._read, args=(child, child.process), daemon=True).start()
        return child

    def restart(self, child: Child) -> None:
        """Start a child that exited again, with the same arguments but the ports it had, so
        whoever knew its address (or scrapes its metrics) still reaches it."""
        assert child.process.poll() is not None, f"{child.name} is still running"
        if child.address is not None:
            child.args = pin_port(child.args, child.address)
        if child.metrics is not None:
            child.args = pin_port(child.args, child.metrics, "--metrics-port")
        child.process = self._spawn(child.args)
        child.ready = threading.Event()
        child.started = time.monotonic()
        threading.Thread(target=self._read, args=(child, child.process), daemon=True).start()

    def _spawn(self, args: list[str]) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "services.cli", *args],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=self.env,
            text=True,
            bufsize=1,
        )

    def _read(self, child: Child, process: subprocess.Popen) -> None:
        for line in process.stdout:
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

    def stop(self, drain_s: float = 0.0) -> None:
        """Stop every child, stage by stage: SIGTERM, `drain_s` + a grace period, SIGKILL."""
        for stage in sorted({child.stage for child in self.children}):
            children = [c for c in self.children if c.stage == stage]
            for child in children:
                if child.process.poll() is None:
                    child.process.terminate()
            deadline = time.monotonic() + drain_s + STOP_GRACE_S
            for child in children:
                try:
                    child.process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()


def pin_port(args: list[str], address: str, flag: str = "--port") -> list[str]:
    """`args` with `FLAG 0` (any free port) replaced by the port of `address`."""
    port = address.rstrip("/").rsplit(":", 1)[1]
    pinned = list(args)
    for i, arg in enumerate(pinned[:-1]):
        if arg == flag and pinned[i + 1] == "0":
            pinned[i + 1] = port
    return pinned
