"""Timing the AFD pipeline's stages on sampled steps, for the metrics.

A step that is sampled (`metrics.StepSampler`) times each layer's compute per micro-batch and
what it waits for, by kind; any other step runs the same calls untimed, at the cost of a
function call. On a GPU the work is queued, not done, when the host returns from it, so a
sampled step synchronises the device at each boundary: its times are the device's, and that
one step runs slower than the rest (hence the sampling).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


class PipelineTimer:
    def __init__(self, device: torch.device, active: bool) -> None:
        self.active = active
        self._sync = active and device.type == "cuda"
        self.waits: dict[str, float] = {}
        self.computes: list[float] = []  # one per (layer, micro-batch)
        self.start = self.now() if active else 0.0

    def now(self) -> float:
        if self._sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def waited(self, kind: str, fn: Callable[..., T], *args) -> T:
        """fn(*args), its time added to the `kind` waits."""
        if not self.active:
            return fn(*args)
        start = self.now()
        result = fn(*args)
        self.waits[kind] = self.waits.get(kind, 0.0) + self.now() - start
        return result

    def computed(self, fn: Callable[..., T], *args) -> T:
        """fn(*args), its time one compute sample."""
        if not self.active:
            return fn(*args)
        start = self.now()
        result = fn(*args)
        self.computes.append(self.now() - start)
        return result

    def elapsed(self) -> float:
        return self.now() - self.start
