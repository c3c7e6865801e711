"""The Drafter protocol over this service's own sessions, for the loops it hosts (`Drafter.Generate`,
orchestrator.hosting): drafts are local calls, using the service's session store, batcher and
device lock; the target is one Verify call per round to the verify service. A pipelined look-ahead
then drafts here while the verify service runs the target, with no message in between.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence

from speculum.config import SamplingParams
from speculum.records import DraftBlock, PromptInputs, VerifyResult


class LocalDraftSession:
    """One session of this service's store, driven from this process (no RPC)."""

    def __init__(self, servicer, sampling: SamplingParams):
        self._servicer = servicer
        self._sampling = sampling
        self.session_id = f"hd-{uuid.uuid4().hex}"
        self._open = False

    def prefill(self, prompt: PromptInputs, first: VerifyResult) -> None:
        self._servicer.prefill(self.session_id, self._sampling, prompt, first)
        self._open = True

    def propose(self, max_tokens: int, assume: Sequence[int] = ()) -> Iterator[DraftBlock]:
        return self._servicer.propose(self.session_id, None, max_tokens, tuple(assume))

    def advance(self, result: VerifyResult) -> None:
        with self._servicer.sessions.use(self.session_id) as session:
            session.advance(result)

    def close(self) -> None:
        if self._open:
            self._open = False
            self._servicer.sessions.release(self.session_id)


class LocalDrafter:
    """The Drafter protocol over the draft servicer's sessions (LRU eviction, TTL, batching)."""

    def __init__(self, servicer):
        self._servicer = servicer

    @property
    def needs_target_features(self) -> bool:
        return self._servicer.drafter.needs_target_features

    def open(self, sampling: SamplingParams) -> LocalDraftSession:
        return LocalDraftSession(self._servicer, sampling)
