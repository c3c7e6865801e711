"""Held-out acceptance: the drafter's τ at draft length k under greedy verification, by simulation.

The target's greedy answer and its features were recorded once; the real draft session is then
driven with the VerifyResults the verifier would return (the longest matching prefix, the target's
next token, the features of the committed positions). τ counts as SpecStats does: tokens emitted
per verification pass, bonus included, the prefill's first token excluded. `simulated_pipelined_tau`
drives the session as the pipelined loop does (orchestrator.loop with orchestrator.lookahead): each
round's block comes from the look-ahead drafted while the previous one was verified, when it holds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from draft_service.feature.drafter import FeatureDrafter
from draft_service.training.features import FeatureSample
from orchestrator.lookahead import kept_block
from speculum.config import SamplingParams
from speculum.records import DraftBlock, PromptInputs, VerifyResult, join_pieces
from speculum.rejection import NextTokenKind


@dataclass(frozen=True)
class AcceptanceReport:
    """tau: emitted tokens per verification · rounds / emitted: their totals · acceptance: the
    accepted share of drafted tokens · k: the draft length · drafted_ahead: rounds whose block was
    a look-ahead · lookahead_ms: the median wall time of a look-ahead's drafting, on this process's
    torch threads (both pipelined simulation only)."""

    k: int
    tau: float
    rounds: int
    emitted: int
    acceptance: float
    drafted_ahead: int = 0
    lookahead_ms: float = 0.0


def simulated_tau(drafter: FeatureDrafter, samples: Sequence[FeatureSample], k: int) -> AcceptanceReport:
    """Drive draft sessions over recorded greedy answers, as the loop would at temperature 0."""
    return _simulate(drafter, samples, k, pipelined=False)


def simulated_pipelined_tau(drafter: FeatureDrafter, samples: Sequence[FeatureSample], k: int) -> AcceptanceReport:
    """As `simulated_tau`, with the pipelined loop's look-aheads: while block b is verified the
    session drafts after it (`propose(..., assume=b)`), and the next round takes the part that holds
    (`kept_block`), else drafts as usual."""
    return _simulate(drafter, samples, k, pipelined=True)


def _simulate(drafter: FeatureDrafter, samples: Sequence[FeatureSample], k: int, pipelined: bool) -> AcceptanceReport:
    rounds = emitted = drafted = accepted = ahead_rounds = 0
    lookahead_seconds = []
    for sample in samples:
        answer = sample.answer_ids
        if len(answer) < 2:
            continue
        prompt_length = len(drafter.facts.expand_image_tokens(sample.prompt_ids))
        session = drafter.open(SamplingParams(max_new_tokens=len(answer), seed=0))
        prompt = PromptInputs(sample.prompt_ids, visual_embeds=sample.visual_embeds)
        session.prefill(prompt, VerifyResult(0, (answer[0],), NextTokenKind.BONUS, sample.hidden[:prompt_length]))
        done, ready = 1, None  # answer tokens emitted so far; answer[done - 1] is the pending token
        while done < len(answer):
            room = len(answer) - done - 1  # as the loop: the last token is always the verifier's
            if ready is not None and ready.tokens:
                block = DraftBlock(ready.tokens[: min(k, room)])
                ahead_rounds += 1
            else:
                block = join_pieces(list(session.propose(min(k, room)))) if room > 0 else DraftBlock(())
            further = min(k, room - len(block.tokens) - 1)
            ahead = None
            if pipelined and further > 0 and block.tokens:
                began = time.perf_counter()
                ahead = join_pieces(list(session.propose(further + 1, block.tokens)))
                lookahead_seconds.append(time.perf_counter() - began)
            drafts = block.tokens
            matched = 0
            while matched < len(drafts) and drafts[matched] == answer[done + matched]:
                matched += 1
            tokens = tuple(answer[done : done + matched + 1])
            rounds, emitted = rounds + 1, emitted + len(tokens)
            drafted, accepted = drafted + len(drafts), accepted + matched
            hidden = sample.hidden[prompt_length + done - 1 : prompt_length + done + matched]
            result = VerifyResult(matched, tokens, NextTokenKind.BONUS, hidden)
            ready = None if ahead is None else kept_block(ahead, block, result)
            done += len(tokens)
            if done < len(answer):
                session.advance(result)
        session.close()
    lookahead_ms = 1000 * statistics.median(lookahead_seconds) if lookahead_seconds else 0.0
    return AcceptanceReport(k, emitted / max(1, rounds), rounds, emitted, accepted / max(1, drafted), ahead_rounds,
                            round(lookahead_ms, 2))
