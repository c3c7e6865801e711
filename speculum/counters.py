"""Thread-safe event counters read as a frozen stats dataclass (caches count hits, misses, ...)."""

from __future__ import annotations

import threading
from dataclasses import fields
from typing import Generic, TypeVar

Stats = TypeVar("Stats")


class Counters(Generic[Stats]):
    """One counter per field of `stats_type` (a dataclass of ints); servers add from many threads."""

    def __init__(self, stats_type: type[Stats]) -> None:
        self._type = stats_type
        self._lock = threading.Lock()
        self._values = {f.name: 0 for f in fields(stats_type)}

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._values[name] += delta

    def snapshot(self) -> Stats:
        with self._lock:
            return self._type(**self._values)
