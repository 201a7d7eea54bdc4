"""Finding a test's child processes by their command line."""

from __future__ import annotations

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
