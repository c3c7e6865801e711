"""A circuit breaker for an optional helper (the drafter): after a fault, stop calling it for a while.

Requests never wait for the breaker; they skip the helper while it is open. The pause doubles
with each consecutive fault up to a ceiling, and one caller at a time probes when it ends, so a
stalled drafter costs one deadline per pause instead of one per round of every request.
Pure logic: no grpc, no clocks other than the one given.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class BreakerSettings:
    """first_pause_s: skip the helper this long after a first fault. max_pause_s: the doubling stops here."""

    first_pause_s: float = 1.0
    max_pause_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.first_pause_s <= self.max_pause_s:
            raise ValueError(f"need 0 < first_pause_s <= max_pause_s, got {self.first_pause_s}, {self.max_pause_s}")


class CircuitBreaker:
    """Thread-safe; shared by every request that uses the same helper."""

    def __init__(self, settings: BreakerSettings = BreakerSettings(), clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self._faults = 0
        self._closed_at = 0.0  # calls are allowed from this time on
        self.opened = 0  # faults recorded (for tests and logs)

    def allow(self) -> bool:
        """Whether to call the helper now. Once a pause ends, the first caller probes and the
        next ones wait another pause (the probe's outcome then closes or reopens the breaker)."""
        with self._lock:
            now = self._clock()
            if now < self._closed_at:
                return False
            if self._faults:
                self._closed_at = now + self._pause()
            return True

    def succeeded(self) -> None:
        with self._lock:
            self._faults = 0
            self._closed_at = 0.0

    def failed(self) -> None:
        with self._lock:
            self._faults += 1
            self.opened += 1
            self._closed_at = self._clock() + self._pause()

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._clock() < self._closed_at

    def _pause(self) -> float:
        doubled = self.settings.first_pause_s * 2 ** min(max(self._faults - 1, 0), 30)
        return min(doubled, self.settings.max_pause_s)
