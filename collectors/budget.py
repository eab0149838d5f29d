"""A CPU budget: the sidecar runs in someone else's task and must never eat its CPU.

Sources ask ``allow()`` before optional work (reading new processes). Over
budget within the current window, they skip it and count what they skipped;
the next window starts afresh. Under a fork storm this turns "100% of a core
spent reading processes that are already gone" into a bounded cost plus an
honest count of what was missed.
"""

from __future__ import annotations

import time


class CpuBudget:
    def __init__(self, fraction: float, window: float = 0.5) -> None:
        self.fraction = fraction
        self.window = window
        self.exhausted_windows = 0
        self._start = time.monotonic()
        self._cpu0 = time.process_time()
        self._over = False

    def allow(self) -> bool:
        if self.fraction >= 1.0:
            return True
        now = time.monotonic()
        if now - self._start >= self.window:
            self._start = now
            self._cpu0 = time.process_time()
            self._over = False
            return True
        if self._over:
            return False
        if time.process_time() - self._cpu0 > self.fraction * self.window:
            self._over = True
            self.exhausted_windows += 1
            return False
        return True

    @property
    def over(self) -> bool:
        return self._over
