"""Verifier and Drafter wrappers that time each round and count accepted tokens for Prometheus.

They sit between the loop and its Verifier / Drafter wherever it runs as a service (the Serve
replica, or the verifier hosting the loop), so the loop stays free of metrics (observability at
the edge) and the same loop runs unmetered in-process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from orchestrator.protocols import DraftSession, Drafter, Verifier, VerifySession
from speculum.config import SamplingParams
from speculum.metrics import RoundMetrics
from speculum.records import DraftBlock, PromptInputs, VerifyResult


class MeteredVerifySession:
    def __init__(self, inner: VerifySession, metrics: RoundMetrics):
        self._inner = inner
        self._metrics = metrics

    def prefill(self, prompt: PromptInputs) -> VerifyResult:
        return self._inner.prefill(prompt)

    def verify(self, block: DraftBlock) -> VerifyResult:
        started = time.perf_counter()
        result = self._inner.verify(block)
        self._metrics.verify_round.observe(time.perf_counter() - started)
        if block.tokens:  # a round without a draft is plain decoding: nothing could be accepted
            self._metrics.accepted_per_round.observe(result.num_accepted)
        return result

    def close(self) -> None:
        self._inner.close()


class MeteredVerifier:
    def __init__(self, inner: Verifier, metrics: RoundMetrics):
        self._inner = inner
        self._metrics = metrics

    def open(self, sampling: SamplingParams, return_features: bool = False) -> MeteredVerifySession:
        return MeteredVerifySession(self._inner.open(sampling, return_features), self._metrics)


class MeteredDraftSession:
    def __init__(self, inner: DraftSession, metrics: RoundMetrics):
        self._inner = inner
        self._metrics = metrics

    def prefill(self, prompt: PromptInputs, first: VerifyResult) -> None:
        self._inner.prefill(prompt, first)

    def propose(self, max_tokens: int, assume: Sequence[int] = ()) -> Iterator[DraftBlock]:
        """The round lasts from the call until its last piece (failed rounds count too)."""
        started = time.perf_counter()
        try:
            yield from self._inner.propose(max_tokens, assume)
        finally:
            self._metrics.draft_round.observe(time.perf_counter() - started)

    def advance(self, result: VerifyResult) -> None:
        self._inner.advance(result)

    def close(self) -> None:
        self._inner.close()


class MeteredDrafter:
    def __init__(self, inner: Drafter, metrics: RoundMetrics):
        self._inner = inner
        self._metrics = metrics

    @property
    def needs_target_features(self) -> bool:
        return self._inner.needs_target_features

    def open(self, sampling: SamplingParams) -> MeteredDraftSession:
        return MeteredDraftSession(self._inner.open(sampling), self._metrics)
