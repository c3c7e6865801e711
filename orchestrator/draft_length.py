"""Adaptive draft length: how many tokens a request drafts in its next round (issue 8).

Two signals, both settled before the round starts, so the output stays the target's (greedy and
sampling alike: K depends on the past only, like any fixed K):
- the request's recent acceptance: an estimate of the per-token acceptance rate α, from counts
  that fade by `memory` per round (one pooled rate, not one per depth: a 64–256-token answer has
  only 20–60 rounds, too few for per-depth estimates, and depths a short K never reaches would go
  stale and keep K short for good);
- the verifier's load: the queue depth it reports with each result (`VerifyResult.queue_depth`,
  the verify calls in flight ahead of this one), smoothed by `load_memory`, mapped to a saturation
  u in [0, 1] between `idle_depth` and `saturated_depth`.

The rule: K = argmax over K of expected tokens per round / cost of the round, where under a
geometric acceptance model a K-token chain yields 1 + α + ... + α^K tokens. The cost blends two
regimes by u. Idle, a round costs what it takes in time on this machine, in units of a round
without drafts: 1 without drafts, 1 + round_overhead + draft_token_cost * K with (constants
measured on the demo pair, see DraftLengthConfig). Saturated, the verifier is the bottleneck and
every row of a pass costs about as much as a decoded token: 1 + K, under which drafting never pays
(α < 1). So load makes K shorter smoothly, and a saturated verifier (u = 1) gets no drafts at all:
the service decodes with the target alone until the queue drains. Otherwise K stays in [1, K_max]:
K = 1 keeps measuring α, so K grows back when the drafter recovers.

Why this and not a threshold table (vLLM's num_speculative_tokens_per_batch_size) or an EMA with
hand-tuned rise/drop thresholds (SGLang's default): a table keyed on the instantaneous batch size
flips K between values step to step at its threshold, and vLLM issue #49548 reports aggregate
throughput collapsing there; thresholds need re-tuning per model and machine. Here K moves smoothly
with two smoothed signals; the machine-specific inputs are two measured costs and the queue depth
that counts as saturated (a setting, not measured: this machine cannot run a big enough load).

Pure: no clock, no I/O, no model; the loop feeds it what each round drafted, accepted and reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from speculum import tree
from speculum.config import SpeculationParams
from speculum.records import DraftBlock


@dataclass(frozen=True)
class DraftLengthConfig:
    """How the adaptive draft length reacts.

    draft_token_cost: one more draft token in a round (drafting it + one more verified row), in
        units of a round without drafts. round_overhead: the extra cost of a round that drafts at
        all (a draft call, the verifier's multi-token pass), same units. Both calibrated on this
        machine from whole rounds (demo pair, greedy image prompts, one torch thread, loaded by a
        training run): target alone 4.5 ms per round; K = 4 rounds 9.2 ms; K = 8 rounds 11.4 ms,
        so 1 + overhead + 4 * cost = 2.04 and 1 + overhead + 8 * cost = 2.53. Timing the calls
        agrees: a verify pass of the pending token alone 3.1 ms, with 1-8 drafts 5.5-6.6 ms;
        drafting 1.2 ms + ~0.2 ms per token.
    memory: per round, the weight the acceptance counts keep (0.7: the last ~3 rounds dominate).
    prior_acceptance: α assumed before the request's first round, worth `prior_trials` draft tokens.
    prior_trials: see prior_acceptance.
    load_memory: per round, the weight the smoothed queue depth keeps.
    idle_depth: smoothed queue depths up to this count as an idle verifier (a block or so in flight
        beside ours is normal with concurrent streams and costs little with batched verification).
    saturated_depth: from this smoothed depth on the verifier counts as saturated (u = 1): no drafts.
    """

    draft_token_cost: float = 0.12
    round_overhead: float = 0.55
    memory: float = 0.7
    prior_acceptance: float = 0.8
    prior_trials: float = 2.0
    load_memory: float = 0.5
    idle_depth: float = 1.0
    saturated_depth: float = 8.0

    def __post_init__(self) -> None:
        if self.draft_token_cost < 0 or self.round_overhead < 0:
            raise ValueError("draft costs must be >= 0")
        if not (0 <= self.memory < 1 and 0 <= self.load_memory < 1):
            raise ValueError("memories must be in [0, 1)")
        if not (0 < self.prior_acceptance < 1 and self.prior_trials > 0):
            raise ValueError("the prior acceptance must be in (0, 1), worth > 0 trials")
        if not 0 <= self.idle_depth < self.saturated_depth:
            raise ValueError("need 0 <= idle_depth < saturated_depth")


class DraftLength(Protocol):
    """The loop's view: how long to draft next, and what the last round showed."""

    def next_length(self) -> int:
        """Draft tokens (levels, for a tree) to propose in the next round."""

    def observe(self, drafted: int, accepted: int, queue_depth: int = 0) -> None:
        """A round drafted `drafted` levels, `accepted` of them were accepted, and the verifier
        reported `queue_depth` verify calls ahead of it."""


class FixedLength:
    """The request's num_draft_tokens every round (speculation.adaptive off)."""

    def __init__(self, length: int):
        self._length = length

    def next_length(self) -> int:
        return self._length

    def observe(self, drafted: int, accepted: int, queue_depth: int = 0) -> None:
        pass


class AdaptiveLength:
    """K from the request's recent acceptance and the verifier's load (see the module docstring)."""

    def __init__(self, max_length: int, config: DraftLengthConfig = DraftLengthConfig()):
        assert max_length >= 1, max_length
        self.max_length = max_length
        self.config = config
        self._accepted = config.prior_acceptance * config.prior_trials  # faded counts
        self._trials = config.prior_trials
        self._depth = 0.0  # smoothed queue depth

    @property
    def acceptance(self) -> float:
        """α: the estimated chance that a draft token is accepted, given its predecessor was."""
        return self._accepted / self._trials

    @property
    def saturation(self) -> float:
        """u in [0, 1]: 0 = the verifier is idle, 1 = saturated."""
        c = self.config
        return min(1.0, max(0.0, (self._depth - c.idle_depth) / (c.saturated_depth - c.idle_depth)))

    def next_length(self) -> int:
        alpha, u = self.acceptance, self.saturation
        best, best_rate = None, -1.0
        for k in range(0 if u >= 1 else 1, self.max_length + 1):
            rate = expected_tokens(alpha, k) / self._round_cost(k, u)
            if rate > best_rate + 1e-12:  # ties: the shorter draft
                best, best_rate = k, rate
        return best

    def observe(self, drafted: int, accepted: int, queue_depth: int = 0) -> None:
        assert 0 <= accepted <= drafted or drafted == 0, (drafted, accepted)
        c = self.config
        self._depth = c.load_memory * self._depth + (1 - c.load_memory) * queue_depth
        if drafted == 0:  # nothing was tried: no news about acceptance
            return
        # Each draft token reached is one trial: the accepted ones, and the first rejected one.
        trials = accepted + (1 if accepted < drafted else 0)
        self._accepted = c.memory * self._accepted + accepted
        self._trials = c.memory * self._trials + trials

    def _round_cost(self, k: int, u: float) -> float:
        c = self.config
        idle = 1.0 if k == 0 else 1.0 + c.round_overhead + c.draft_token_cost * k
        return (1 - u) * idle + u * (1.0 + k)


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a round of k draft tokens emits on average if each is accepted with chance alpha
    given its predecessor was: 1 + alpha + ... + alpha^k (the bonus or recovered token included)."""
    return sum(alpha**i for i in range(k + 1))


def for_request(speculation: SpeculationParams, config: DraftLengthConfig = DraftLengthConfig()) -> DraftLength:
    """The request's draft length: adaptive up to num_draft_tokens, or num_draft_tokens every round."""
    if speculation.adaptive:
        return AdaptiveLength(speculation.num_draft_tokens, config)
    return FixedLength(speculation.num_draft_tokens)


def levels(block: DraftBlock) -> int:
    """The draft length a block stands for: its tokens (a chain) or its depth (a tree)."""
    if not block.tokens or block.is_chain:
        return len(block.tokens)
    return max(tree.depths(block.parents))
