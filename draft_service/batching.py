"""Batched drafting: concurrent sessions' rounds gathered for a short window (speculum.batch_window)
and drafted in lockstep, one drafter forward per step for all of them (feature/many.py).

Only chain rounds of feature-draft sessions batch; other drafters (n-gram, HF) and trees answer
alone, streaming as before. A batched round's blocks reach the caller together when its batch ends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from draft_service.feature.many import Round, draft_many
from draft_service.feature.session import FeatureDraftSession
from speculum.batch_window import BatchStats, BatchWindow
from speculum.records import DraftBlock
from speculum.rpc.settings import BatchSettings


def batchable(session: object) -> bool:
    return isinstance(session, FeatureDraftSession) and session.tree_shape is None


class DraftBatcher:
    """Drafts rounds for many threads, batching the ones that arrive together."""

    def __init__(self, settings: BatchSettings, device: threading.Lock, live_sessions: Callable[[], int] | None = None):
        self._window: BatchWindow[Round, list[DraftBlock] | Exception] = BatchWindow(
            settings.window_s, settings.max_batch, device,
            run_batch=self._run_batch, run_one=lambda r: self._run_batch([r])[0], enough=live_sessions,
        )

    @property
    def stats(self) -> BatchStats:
        return self._window.stats

    def draft(self, session: FeatureDraftSession, max_tokens: int, assume: tuple[int, ...] = ()) -> list[DraftBlock]:
        """The round's blocks, as `session.propose` would yield them; raises what its plan raised."""
        result = self._window.submit(Round(session, max_tokens, assume))
        if isinstance(result, Exception):
            raise result
        return result

    @staticmethod
    def _run_batch(rounds: list[Round]) -> list[list[DraftBlock] | Exception]:
        return draft_many(rounds[0].session.model, rounds)
