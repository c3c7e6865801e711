"""The speculative loop: propose -> verify -> accept -> advance, over the Drafter/Verifier protocols.

The same loop runs in-process and over gRPC; only the protocol implementations differ. With no
drafter (or speculation disabled) every round verifies an empty block, i.e. plain target decoding.

Faults never lose a request that can still be finished:
- a failing or stalled drafter (the gRPC client gives each round a deadline) only costs speed: the
  round decodes with the target alone, and the request re-prefills a new draft session later
  (backing off) so it speculates again once the drafter is healthy;
- a verifier that loses the session (restarted replica, UNAVAILABLE or NOT_FOUND mid-request) gets
  a new session re-prefilled with everything committed so far, retried for a bounded time; greedy
  output is unchanged. Beyond that time the request fails with the verifier's error.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from orchestrator import draft_length
from orchestrator.draft_length import DraftLengthConfig
from orchestrator.lookahead import Lookahead
from orchestrator.protocols import DraftSession, Drafter, Verifier, VerifySession
from orchestrator.stopping import FinishReason, StopChecker
from speculum.config import SamplingParams, SpeculationParams
from speculum.errors import SessionNotFound, Unavailable
from speculum.records import DraftBlock, PromptInputs, VerifyResult, join_pieces
from speculum.stats import SpecStats

log = logging.getLogger("speculum.loop")

RESUME_WITHIN_S = 30.0  # how long a request waits for a restarted verifier before failing
MAX_DRAFT_RETRY_GAP = 32  # rounds between attempts to reopen a failed draft session, at most
# Feature rows a request keeps to rebuild a feature drafter's session (a 4096-wide fp16 target:
# 8 k positions); beyond it, a lost draft session leaves that request to the target alone.
MAX_KEPT_FEATURE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Chunk:
    """Tokens emitted by one round; `stats`: the request's counts so far (a snapshot). The last chunk
    of a request carries `finish`, and its `stats` are final (timing included)."""

    token_ids: tuple[int, ...]
    finish: FinishReason | None = None
    stats: SpecStats | None = None


class ChunkStream:
    """A request's chunks (an iterator). `cancel`, callable from any thread, stops a loop that runs
    elsewhere even while a chunk is awaited; a loop stepped here stops when its consumer closes it."""

    def __init__(self, chunks: Iterator[Chunk], cancel: Callable[[], None] = lambda: None):
        self._chunks = chunks
        self.cancel = cancel

    def __iter__(self) -> ChunkStream:
        return self

    def __next__(self) -> Chunk:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()


class Transcript:
    """What a request has committed: enough to rebuild a session on a fresh verifier or drafter.

    tokens: every token the target settled, the last one pending (not yet fed to the target).
    keep_hidden: also keep the target's feature rows (prompt + tokens[:-1]) for a feature drafter.
    """

    def __init__(self, prompt: PromptInputs, keep_hidden: bool):
        self.prompt = prompt
        self.keep_hidden = keep_hidden
        self.tokens: list[int] = []
        self._hidden: list[torch.Tensor] = []  # [rows, D] each
        self._hidden_complete = True
        self._hidden_bytes = 0
        self._last: VerifyResult | None = None

    def commit(self, result: VerifyResult) -> None:
        self.tokens.extend(result.tokens)
        self._last = result
        if self.keep_hidden and self._hidden_complete:
            if result.hidden is None or self._hidden_bytes + _nbytes(result.hidden) > MAX_KEPT_FEATURE_BYTES:
                self._hidden_complete = False  # a lost draft session can no longer be rebuilt
                self._hidden.clear()
            else:
                self._hidden.append(result.hidden)
                self._hidden_bytes += _nbytes(result.hidden)

    def prompt_through(self, include_pending: bool) -> PromptInputs:
        """The prompt followed by the committed tokens (with or without the pending one)."""
        tokens = self.tokens if include_pending else self.tokens[:-1]
        return dataclasses.replace(self.prompt, token_ids=self.prompt.token_ids + tuple(tokens))

    def as_prefill(self) -> VerifyResult | None:
        """The target result a drafter prefilled on `prompt_through(False)` would have been given,
        or None when it cannot be rebuilt (feature rows missing)."""
        assert self._last is not None, "nothing committed yet"
        hidden = None
        if self.keep_hidden:
            if not self._hidden_complete:
                return None
            hidden = torch.cat(self._hidden)  # [P + len(tokens) - 1, D]
        return VerifyResult(0, (self.tokens[-1],), self._last.next_kind, hidden)


class ResumableTarget:
    """The request's verify session; re-prefilled on a fresh session when the verifier loses it."""

    def __init__(self, verifier: Verifier, sampling: SamplingParams, return_features: bool, transcript: Transcript,
                 resume_within_s: float):
        self._verifier = verifier
        self._sampling = sampling
        self._return_features = return_features
        self._transcript = transcript
        self._resume_within_s = resume_within_s
        self._session: VerifySession = verifier.open(sampling, return_features=return_features)
        self.resumed = 0  # sessions rebuilt (a stats field would be the edge's business)

    def prefill(self, prompt: PromptInputs) -> VerifyResult:
        return self._session.prefill(prompt)

    def verify(self, block: DraftBlock) -> VerifyResult:
        try:
            return self._session.verify(block)
        except (Unavailable, SessionNotFound) as exc:
            log.warning("verifier lost the session (%s); re-prefilling on a fresh one", exc)
            return self._resume(exc)

    def _resume(self, cause: Exception) -> VerifyResult:
        """Prefill prompt + every committed token (pending one included) on a new session: the
        next token is what verifying an empty block would have given. The dropped draft block is
        reported as nothing accepted, so the drafter rolls it back."""
        _close_in_background(self._session)
        deadline = time.monotonic() + self._resume_within_s
        pause = 0.1
        sampling = fresh_seed(self._sampling, self.resumed + 1)
        while True:
            self._session = self._verifier.open(sampling, return_features=self._return_features)
            try:
                first = self._session.prefill(self._transcript.prompt_through(include_pending=True))
                break
            except (Unavailable, SessionNotFound) as exc:
                _close_in_background(self._session)
                if time.monotonic() + pause > deadline:
                    raise Unavailable(f"verifier: not back within {self._resume_within_s:.0f} s: {exc}") from cause
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
        self.resumed += 1
        hidden = None if first.hidden is None else first.hidden[-1:]  # the pending token's row
        return VerifyResult(0, first.tokens, first.next_kind, hidden)

    def close(self) -> None:
        self._session.close()


class GuardedDraft:
    """A draft session whose faults cost speed only: the round goes without drafts, and a new
    session is re-prefilled from the transcript after a backoff (1, 2, 4 ... rounds)."""

    def __init__(self, drafter: Drafter | None, sampling: SamplingParams, transcript: Transcript):
        self._drafter = drafter
        self._sampling = sampling
        self._transcript = transcript
        self._session: DraftSession | None = None
        self._round = 0
        self._retry_round = 0
        self._retry_gap = 1
        self.reopened = 0

    @property
    def active(self) -> bool:
        return self._session is not None

    def prefill(self, prompt: PromptInputs, first: VerifyResult) -> None:
        if self._drafter is not None:
            self._open(prompt, first, self._sampling, "prefill")

    def propose(self, max_tokens: int) -> DraftBlock:
        self._round += 1
        if self._session is None and self._drafter is not None and self._round >= self._retry_round:
            self._reopen()
        if self._session is None or max_tokens <= 0:
            return DraftBlock(())
        try:
            return join_pieces(list(self._session.propose(max_tokens)))
        except Exception as exc:
            self._give_up("propose", exc)
            return DraftBlock(())

    def propose_ahead(self, max_tokens: int, assume: tuple[int, ...]) -> DraftBlock:
        """Draft after `assume` (tokens being verified) while the session is healthy (pipelined mode)."""
        if self._session is None:
            return DraftBlock(())
        try:
            return join_pieces(list(self._session.propose(max_tokens, assume)))
        except Exception as exc:
            self._give_up("propose ahead", exc)
            return DraftBlock(())

    def advance(self, result: VerifyResult) -> None:
        if self._session is None:
            return
        try:
            self._session.advance(result)
        except Exception as exc:
            self._give_up("advance", exc)

    def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            try:
                session.close()
            except Exception:
                log.warning("closing the draft session failed", exc_info=True)

    def _open(self, prompt: PromptInputs, first: VerifyResult, sampling: SamplingParams, phase: str) -> bool:
        try:
            self._session = self._drafter.open(sampling)
            self._session.prefill(prompt, first)
        except Exception as exc:  # a drafter fault must never fail the request
            self._give_up(phase, exc)
            return False
        self._retry_gap = 1
        return True

    def _reopen(self) -> None:
        first = self._transcript.as_prefill()
        if first is None:  # a feature drafter without the target's features: no way back
            self._retry_round = 2**62
            return
        sampling = fresh_seed(self._sampling, self.reopened + 1)
        if self._open(self._transcript.prompt_through(include_pending=False), first, sampling, "re-prefill"):
            self.reopened += 1
            log.info("drafter back: re-prefilled a draft session at %d tokens", len(self._transcript.tokens))

    def _give_up(self, phase: str, exc: Exception) -> None:
        log.warning("drafter failed in %s (%s: %s); rounds go without drafts for now", phase, type(exc).__name__, exc)
        log.debug("drafter fault", exc_info=exc)
        session, self._session = self._session, None
        if session is not None:
            _close_in_background(session)  # a stalled drafter may hold the session: never wait for it
        self._retry_round = self._round + self._retry_gap
        self._retry_gap = min(self._retry_gap * 2, MAX_DRAFT_RETRY_GAP)


def fresh_seed(sampling: SamplingParams, generation: int) -> SamplingParams:
    """The request's sampling with a seed derived for its `generation`-th rebuilt session: a new
    session must not replay random numbers the request already used (its samples stay exact)."""
    return dataclasses.replace(sampling, seed=(sampling.seed * 1_000_003 + generation) % 2**63)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _close_in_background(session: DraftSession | VerifySession) -> None:
    def close() -> None:
        try:
            session.close()
        except Exception:
            log.info("releasing a failed session failed", exc_info=True)

    threading.Thread(target=close, name="release", daemon=True).start()


def speculate(
    prompt: PromptInputs,
    sampling: SamplingParams,
    speculation: SpeculationParams,
    verifier: Verifier,
    drafter: Drafter | None,
    stop: StopChecker,
    started: float | None = None,
    resume_within_s: float = RESUME_WITHIN_S,
    draft_lengths: DraftLengthConfig = DraftLengthConfig(),
) -> Iterator[Chunk]:
    """Generate for one request, yielding the tokens of each round as soon as they are settled.

    `started` (perf_counter) is when the request arrived, for TTFT; defaults to now. Both
    sessions are closed on every exit path, including the consumer abandoning the stream.
    `resume_within_s`: how long to keep re-prefilling on a verifier that lost the session.
    `draft_lengths`: how an adaptive request (speculation.adaptive) chooses each round's K.
    """
    started = time.perf_counter() if started is None else started
    sampling = sampling.with_seed()
    stats = SpecStats()
    generated: list[int] = []
    drafter = drafter if speculation.enabled else None
    features = drafter is not None and drafter.needs_target_features
    transcript = Transcript(prompt, keep_hidden=features)
    target = ResumableTarget(verifier, sampling, features, transcript, resume_within_s)
    draft = GuardedDraft(drafter, sampling, transcript)
    lookahead = Lookahead(draft, enabled=bool(speculation.pipelined))  # unset: sequential (one device)
    lengths = draft_length.for_request(speculation, draft_lengths)
    try:
        first = target.prefill(prompt)
        transcript.commit(first)
        decision = stop.offer(generated, first.tokens)
        generated.extend(first.tokens[: decision.keep])
        first_token_at = time.perf_counter()
        stats.ttft_s = first_token_at - started
        finish = decision.finish
        if finish is None:
            draft.prefill(prompt, first)
        pending = tuple(generated)
        while finish is None:
            yield Chunk(pending, stats=dataclasses.replace(stats))
            # propose: K from recent acceptance and load (adaptive) or fixed; never draft past what
            # may still be emitted (the bonus token always is)
            k = lengths.next_length()
            room = sampling.max_new_tokens - len(generated) - 1
            block = lookahead.take(min(k, room)) or draft.propose(min(k, room))
            # verify (pipelined: the drafter drafts the next block meanwhile)
            lookahead.start(block, min(k, room - len(block.tokens) - 1))
            result = target.verify(block)
            lookahead.settle(block, result)
            lengths.observe(draft_length.levels(block), result.num_accepted, result.queue_depth)
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
                transcript.commit(result)
                draft.advance(result)
        stats.drafted_ahead = lookahead.hits
        stats.decode_s = time.perf_counter() - first_token_at
        yield Chunk(pending, finish, stats)
    finally:
        lookahead.close()
        target.close()
        draft.close()
