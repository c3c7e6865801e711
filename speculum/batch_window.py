"""Work from many threads gathered for a short window and run as one batch (no extra thread).

The first caller to arrive while no batch is forming leads it: it waits up to `window_s` (less once
`enough()` items are queued, so a lone caller never waits), takes everything queued meanwhile, runs
it through `run_batch` and hands each caller its own result. Followers just wait. One batch runs at
a time (the device is the bottleneck); callers arriving during a batch queue for the next one.
Used by the verify service (blocks of many sessions, one target pass) and the draft service (rounds
of many sessions, one drafter pass per step).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class BatchStats:
    """Counters since start: passes run, items they held, the largest pass."""

    passes: int = 0
    items: int = 0
    largest: int = 0


@dataclass
class _Waiting(Generic[Item, Result]):
    item: Item
    result: Future


class BatchWindow(Generic[Item, Result]):
    """`submit(item)` from any thread -> its result (or its exception), batched with its neighbours.

    run_batch(items) -> one result per item, or raises; then each item runs alone through
    `run_one`, so that one bad item fails only its own caller."""

    def __init__(self, window_s: float, max_batch: int, device: threading.Lock,
                 run_batch: Callable[[list[Item]], list[Result]], run_one: Callable[[Item], Result],
                 enough: Callable[[], int] | None = None):
        self.window_s, self.max_batch = window_s, max_batch
        self._device = device  # shared with other passes on the same model (prefills)
        self._run_batch, self._run_one = run_batch, run_one
        # No point waiting for more items than there are callers that could send one.
        self._enough = enough or (lambda: max_batch)
        self._lock = threading.Condition()
        self._queue: list[_Waiting] = []
        self._leading = False
        self.stats = BatchStats()

    def submit(self, item: Item) -> Result:
        waiting = _Waiting(item, Future())
        with self._lock:
            self._queue.append(waiting)
            lead = not self._leading
            if lead:
                self._leading = True
            else:
                self._lock.notify_all()  # a leader waiting for a full batch may go now
        if lead:
            self._lead()
        return waiting.result.result()

    def _lead(self) -> None:
        deadline = time.monotonic() + self.window_s
        with self._lock:
            while len(self._queue) < self._target() and (left := deadline - time.monotonic()) > 0:
                self._lock.wait(left)
        with self._device:
            with self._lock:
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                # Whoever queued meanwhile leads the next batch once this one is done.
                self._leading = False
                successor = self._queue[0] if self._queue else None
            self._run(batch)
        if successor is not None:
            self._hand_over()

    def _target(self) -> int:
        return max(1, min(self.max_batch, self._enough()))

    def _hand_over(self) -> None:
        """The queue filled during our batch: lead again on behalf of those callers."""
        with self._lock:
            if self._leading or not self._queue:
                return
            self._leading = True
        self._lead()

    def _run(self, batch: list[_Waiting]) -> None:
        self.stats.passes += 1
        self.stats.items += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        try:
            results = self._run_batch([w.item for w in batch])
        except Exception:
            for waiting in batch:
                self._run_alone(waiting)
            return
        for waiting, result in zip(batch, results):
            waiting.result.set_result(result)

    def _run_alone(self, waiting: _Waiting) -> None:
        try:
            waiting.result.set_result(self._run_one(waiting.item))
        except Exception as exc:  # handed to the caller's thread, which raises it
            waiting.result.set_exception(exc)
