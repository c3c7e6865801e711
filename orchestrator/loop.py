"""The speculative loop: propose -> verify -> accept -> advance, over the Drafter/Verifier protocols.

The same loop runs in-process and over gRPC; only the protocol implementations differ. With no
drafter (or speculation disabled) every round verifies an empty block, i.e. plain target decoding.
A failing drafter only costs speed: the request continues as plain target decoding.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from orchestrator.protocols import DraftSession, Drafter, Verifier
from orchestrator.stopping import FinishReason, StopChecker
from speculum.config import SamplingParams, SpeculationParams
from speculum.records import DraftBlock, PromptInputs, VerifyResult, join_pieces
from speculum.stats import SpecStats

log = logging.getLogger("speculum.loop")


@dataclass(frozen=True)
class Chunk:
    """Tokens emitted by one round. The last chunk of a request carries `finish` and `stats`."""

    token_ids: tuple[int, ...]
    finish: FinishReason | None = None
    stats: SpecStats | None = None


class GuardedDraft:
    """A draft session whose failures switch the request to plain target decoding."""

    def __init__(self, drafter: Drafter | None, sampling: SamplingParams):
        self._drafter = drafter
        self._sampling = sampling
        self._session: DraftSession | None = None

    @property
    def active(self) -> bool:
        return self._session is not None

    def prefill(self, prompt: PromptInputs, first: VerifyResult) -> None:
        if self._drafter is None:
            return
        try:
            self._session = self._drafter.open(self._sampling)
            self._session.prefill(prompt, first)
        except Exception:  # a drafter fault must never fail the request
            self._give_up("prefill")

    def propose(self, max_tokens: int) -> DraftBlock:
        if self._session is None or max_tokens <= 0:
            return DraftBlock(())
        try:
            return join_pieces(list(self._session.propose(max_tokens)))
        except Exception:
            self._give_up("propose")
            return DraftBlock(())

    def advance(self, result: VerifyResult) -> None:
        if self._session is None:
            return
        try:
            self._session.advance(result)
        except Exception:
            self._give_up("advance")

    def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            try:
                session.close()
            except Exception:
                log.warning("closing the draft session failed", exc_info=True)

    def _give_up(self, phase: str) -> None:
        log.warning("drafter failed in %s; continuing without speculation", phase, exc_info=True)
        self.close()


def speculate(
    prompt: PromptInputs,
    sampling: SamplingParams,
    speculation: SpeculationParams,
    verifier: Verifier,
    drafter: Drafter | None,
    stop: StopChecker,
    started: float | None = None,
) -> Iterator[Chunk]:
    """Generate for one request, yielding the tokens of each round as soon as they are settled.

    `started` (perf_counter) is when the request arrived, for TTFT; defaults to now. Both
    sessions are closed on every exit path, including the consumer abandoning the stream.
    """
    started = time.perf_counter() if started is None else started
    sampling = sampling.with_seed()
    stats = SpecStats()
    generated: list[int] = []
    drafter = drafter if speculation.enabled else None
    target = verifier.open(sampling, return_features=drafter is not None and drafter.needs_target_features)
    draft = GuardedDraft(drafter, sampling)
    try:
        first = target.prefill(prompt)
        decision = stop.offer(generated, first.tokens)
        generated.extend(first.tokens[: decision.keep])
        first_token_at = time.perf_counter()
        stats.ttft_s = first_token_at - started
        finish = decision.finish
        if finish is None:
            draft.prefill(prompt, first)
        pending = tuple(generated)
        while finish is None:
            yield Chunk(pending)
            # propose: never draft past what may still be emitted (the bonus token always is)
            room = sampling.max_new_tokens - len(generated) - 1
            block = draft.propose(min(speculation.num_draft_tokens, room))
            # verify
            result = target.verify(block)
            # accept
            decision = stop.offer(generated, result.tokens)
            pending = result.tokens[: decision.keep]
            generated.extend(pending)
            stats.target_forwards += 1
            stats.draft_tokens += len(block.tokens)
            stats.accepted_tokens += min(result.num_accepted, decision.keep)
            stats.emitted_tokens += decision.keep
            finish = decision.finish
            # advance
            if finish is None:
                draft.advance(result)
        stats.decode_s = time.perf_counter() - first_token_at
        yield Chunk(pending, finish, stats)
    finally:
        target.close()
        draft.close()
