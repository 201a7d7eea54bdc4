"""A test's child processes: found by their command line, or read line by line."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path


def pid_of(*words: str) -> int:
    """The pid of a live process whose command line contains every one of `words`."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = (proc / "stat").read_text().split()[2]
            except OSError:
                continue
            if state != "Z" and all(word in cmdline for word in words):
                return int(proc.name)
    raise LookupError(f"no process with {words}")


class Child:
    """A child process whose output lines are collected; `wait_for` a line."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.lines: list[str] = []
        self._grew = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._grew:
                self.lines.append(line)
                self._grew.notify_all()
        with self._grew:
            self._grew.notify_all()

    def wait_for(self, pattern: str, timeout_s: float = 120.0) -> re.Match:
        """The first output line matching `pattern` (a regex), once printed."""
        deadline = time.monotonic() + timeout_s
        with self._grew:
            while True:
                for line in self.lines:
                    if match := re.search(pattern, line):
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    raise AssertionError(
                        f"no line matching {pattern!r}:\n" + "".join(self.lines[-40:])
                    )
                self._grew.wait(min(left, 0.5))

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
