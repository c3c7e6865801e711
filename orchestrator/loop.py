"""The speculative loop: propose -> verify -> accept -> advance, over the Drafter/Verifier protocols.

The same loop runs in-process and over gRPC; only the protocol implementations differ. With no
drafter (or speculation disabled) every round verifies an empty block, i.e. plain target decoding.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from orchestrator.protocols import DraftSession, Drafter, Verifier
from orchestrator.stopping import FinishReason, StopChecker
from speculum.config import SamplingParams, SpeculationParams
from speculum.records import DraftBlock, PromptInputs
from speculum.stats import SpecStats


@dataclass(frozen=True)
class Chunk:
    """Tokens emitted by one round. The last chunk of a request carries `finish` and `stats`."""

    token_ids: tuple[int, ...]
    finish: FinishReason | None = None
    stats: SpecStats | None = None


def speculate(
    prompt: PromptInputs,
    sampling: SamplingParams,
    speculation: SpeculationParams,
    verifier: Verifier,
    drafter: Drafter | None,
    stop: StopChecker,
) -> Iterator[Chunk]:
    """Generate for one request, yielding the tokens of each round as soon as they are settled.

    Both sessions are closed on every exit path, including the consumer abandoning the stream.
    """
    started = time.perf_counter()
    sampling = sampling.with_seed()
    stats = SpecStats()
    generated: list[int] = []
    target = verifier.open(sampling)
    draft: DraftSession | None = None
    try:
        first = target.prefill(prompt)
        decision = stop.offer(generated, first.tokens)
        generated.extend(first.tokens[: decision.keep])
        first_token_at = time.perf_counter()
        stats.ttft_s = first_token_at - started
        if decision.finish is None and drafter is not None and speculation.enabled:
            draft = drafter.open(sampling)
            draft.prefill(prompt, first)
        finish = decision.finish
        pending = tuple(generated)
        while finish is None:
            yield Chunk(pending)
            # propose: never draft past what may still be emitted (the bonus token is always emitted)
            room = sampling.max_new_tokens - len(generated) - 1
            block = draft.propose(min(speculation.num_draft_tokens, room)) if draft else DraftBlock(())
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
            if finish is None and draft:
                draft.advance(result)
        stats.decode_s = time.perf_counter() - first_token_at
        yield Chunk(pending, finish, stats)
    finally:
        target.close()
        if draft:
            draft.close()
