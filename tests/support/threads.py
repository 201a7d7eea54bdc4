"""Running a call in several threads at once, for tests of code that wakes waiters."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def run_in_threads(
    fn: Callable[[int], Any], n: int
) -> tuple[list[threading.Thread], list[Any], list[Exception]]:
    """Start fn(0) .. fn(n - 1), each in its own thread. Returns the threads (join them), the
    results by i and the exceptions raised, filled in as the threads end."""
    results: list[Any] = [None] * n
    errors: list[Exception] = []

    def target(i):
        try:
            results[i] = fn(i)
        except Exception as err:  # reported to the test
            errors.append(err)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    return threads, results, errors
