"""Batched verification: concurrent sessions' blocks gathered for a short window, verified in one pass.

The first caller to arrive while no batch is forming leads it: it waits up to `window_s` (less once
every live session has queued a block, so a lone session never waits), takes every block queued
meanwhile, runs them through the target together and hands each caller its own result. Followers
just wait. There is no extra thread. One pass runs at a time (the device is the bottleneck);
callers arriving during a pass queue for the next batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from speculum.records import DraftBlock, VerifyResult
from speculum.rpc.settings import BatchSettings
from verify_service.target import TargetSession, verify_batch


@dataclass
class _Waiting:
    session: TargetSession
    block: DraftBlock
    result: Future


class VerifyBatcher:
    """Verifies blocks for many threads, batching the ones that arrive together."""

    def __init__(self, settings: BatchSettings, device: threading.Lock, live_sessions: Callable[[], int] | None = None):
        self.settings = settings
        self._device = device  # shared with prefills: one model pass at a time
        # No point waiting for more blocks than there are sessions that could send one.
        self._live_sessions = live_sessions or (lambda: settings.max_batch)
        self._lock = threading.Condition()
        self._queue: list[_Waiting] = []
        self._leading = False
        self.batch_sizes: list[int] = []  # of every pass run, for tests and metrics

    def verify(self, session: TargetSession, block: DraftBlock) -> VerifyResult:
        waiting = _Waiting(session, block, Future())
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
        deadline = time.monotonic() + self.settings.window_s
        with self._lock:
            while len(self._queue) < self._enough() and (left := deadline - time.monotonic()) > 0:
                self._lock.wait(left)
        with self._device:
            with self._lock:
                batch, self._queue = self._queue[: self.settings.max_batch], self._queue[self.settings.max_batch :]
                # Whoever queued meanwhile leads the next batch once this pass is done.
                self._leading = False
                successor = self._queue[0] if self._queue else None
            self._run(batch)
        if successor is not None:
            self._hand_over()

    def _enough(self) -> int:
        return max(1, min(self.settings.max_batch, self._live_sessions()))

    def _hand_over(self) -> None:
        """The queue filled during our pass: lead again on behalf of those callers."""
        with self._lock:
            if self._leading or not self._queue:
                return
            self._leading = True
        self._lead()

    def _run(self, batch: list[_Waiting]) -> None:
        self.batch_sizes.append(len(batch))
        try:
            results = verify_batch([w.session for w in batch], [w.block for w in batch])
        except Exception:
            # One bad block must not fail its neighbours: verify each alone, each with its own error.
            for waiting in batch:
                self._run_alone(waiting)
            return
        for waiting, result in zip(batch, results):
            waiting.result.set_result(result)

    @staticmethod
    def _run_alone(waiting: _Waiting) -> None:
        try:
            waiting.result.set_result(waiting.session.verify(waiting.block))
        except Exception as exc:  # handed to the caller's thread, which raises it
            waiting.result.set_exception(exc)
