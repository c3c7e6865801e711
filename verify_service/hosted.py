"""The Verifier protocol over this service's own sessions, for the loops it hosts (`Verifier.Generate`,
orchestrator.hosting): the target is a local call, using the service's limits, batcher and device
lock; the drafter is one message each way over its DraftRounds stream, and the target's features
go to it directly.
"""

from __future__ import annotations

import uuid

from speculum.config import SamplingParams
from speculum.records import DraftBlock, PromptInputs, VerifyResult


class LocalVerifySession:
    """One session of this service's store, driven from this process (no RPC)."""

    def __init__(self, servicer, sampling: SamplingParams, return_features: bool):
        self._servicer = servicer
        self._sampling = sampling
        self._return_features = return_features
        self.session_id = f"h-{uuid.uuid4().hex}"
        self._open = False

    def prefill(self, prompt: PromptInputs) -> VerifyResult:
        self._open = True
        return self._servicer.prefill(self.session_id, self._sampling, self._return_features, prompt)

    def verify(self, block: DraftBlock) -> VerifyResult:
        return self._servicer.verify(self.session_id, block)[0]

    def close(self) -> None:
        if self._open:
            self._open = False
            self._servicer.sessions.release(self.session_id)


class LocalVerifier:
    """The Verifier protocol over the verify servicer's sessions (limits, TTL, batching, metrics)."""

    def __init__(self, servicer):
        self._servicer = servicer

    def open(self, sampling: SamplingParams, return_features: bool = False) -> LocalVerifySession:
        return LocalVerifySession(self._servicer, sampling, return_features)
