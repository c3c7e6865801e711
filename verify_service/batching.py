"""Batched verification: concurrent sessions' blocks gathered for a short window (speculum.batch_window)
and verified in one target pass; a batch that fails is verified block by block, so one bad block
fails only its own caller."""

from __future__ import annotations

import threading
from collections.abc import Callable

from speculum.batch_window import BatchStats, BatchWindow
from speculum.records import DraftBlock, VerifyResult
from speculum.rpc.settings import BatchSettings
from verify_service.target import TargetSession, verify_batch


class VerifyBatcher:
    """Verifies blocks for many threads, batching the ones that arrive together."""

    def __init__(self, settings: BatchSettings, device: threading.Lock, live_sessions: Callable[[], int] | None = None):
        self._window: BatchWindow[tuple[TargetSession, DraftBlock], VerifyResult] = BatchWindow(
            settings.window_s, settings.max_batch, device,
            run_batch=lambda items: verify_batch([s for s, _ in items], [b for _, b in items]),
            run_one=lambda item: item[0].verify(item[1]),
            enough=live_sessions,
        )

    @property
    def stats(self) -> BatchStats:
        return self._window.stats

    def verify(self, session: TargetSession, block: DraftBlock) -> VerifyResult:
        return self._window.submit((session, block))
