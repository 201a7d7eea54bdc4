"""How many requests one attention instance may run at once, steered by the TPOT SLA.

AIMD, as TCP steers its window: every `interval_s`, if the median time per output token of
the recent streams exceeds the SLA the limit shrinks by `decrease` (multiplicative), else,
when the instance was using all of its limit, it grows by one (additive). Plain Python and
time passed in, so it is tested without a cluster. Knows nothing of routing or HTTP.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class LimitConfig:
    tpot_sla_s: float = 0.05
    initial: int = 32
    minimum: int = 1
    maximum: int = 256
    decrease: float = 0.75
    interval_s: float = 1.0
    window: int = 256  # TPOT samples the median is taken over
    min_samples: int = 8

    def __post_init__(self) -> None:
        if not self.tpot_sla_s > 0:
            raise ValueError(f"tpot_sla_s must be positive, got {self.tpot_sla_s}")
        if not 1 <= self.minimum <= self.initial <= self.maximum:
            raise ValueError(
                f"limits must satisfy 1 <= minimum <= initial <= maximum, got "
                f"{self.minimum}, {self.initial}, {self.maximum}"
            )
        if not 0 < self.decrease < 1:
            raise ValueError(f"decrease must be in (0, 1), got {self.decrease}")


class ConcurrencyLimit:
    """The current cap on one instance's running requests."""

    def __init__(self, config: LimitConfig, now: float = 0.0) -> None:
        self.config = config
        self.limit = config.initial
        self._samples: deque[float] = deque(maxlen=config.window)
        self._saturated = False
        self._last_adjust = now

    def record(self, tpot_s: float, num_running: int, now: float) -> None:
        """One stream's time per output token, seen while `num_running` ran on the instance."""
        self._samples.append(tpot_s)
        self._saturated |= num_running >= self.limit
        if now - self._last_adjust >= self.config.interval_s:
            self._adjust(now)

    def median_tpot_s(self) -> float | None:
        return statistics.median(self._samples) if self._samples else None

    def _adjust(self, now: float) -> None:
        if len(self._samples) < self.config.min_samples:
            return
        self._last_adjust = now
        if statistics.median(self._samples) > self.config.tpot_sla_s:
            self.limit = max(self.config.minimum, int(self.limit * self.config.decrease))
            self._samples.clear()  # judge the new limit by its own samples
        elif self._saturated:
            self.limit = min(self.config.maximum, self.limit + 1)
        self._saturated = False
