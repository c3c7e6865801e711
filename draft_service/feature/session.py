"""One request's feature-drafter state: its KV cache, its committed rows and its drafting (chain or tree).

Invariant (like the target's): the cache holds the rows of every committed position except the
pending token's, computed from the target's real features; rows fed from the drafter's own
predicted features are speculative and are cut off at the next `advance`. New real rows are fused
at `advance` and run lazily by the next `propose`, in the same forward as the first draft.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass

import torch

from draft_service.feature.branches import Carried, branching_lookahead
from draft_service.feature.context import sequence_context
from draft_service.feature.model import FeatureDraftModel
from draft_service.feature.tree_drafting import TreeFeatures
from draft_service.vlm_drafter import DRAFTER_SEED_OFFSET
from draft_service.tree_growth import grow_tree
from speculum.config import SamplingParams
from speculum.errors import InvalidArgument
from speculum.model_facts import ModelFacts
from speculum.records import DraftBlock, PromptInputs, VerifyResult
from speculum.sampling import probs_from_logits
from speculum.tree import TreeShape


@dataclass(frozen=True)
class Rows:
    """A step of a plan: these rows [T, D] go after the session's cached ones; the driver sends back
    the features [k, D] predicted after the last of them."""

    rows: torch.Tensor


Plan = Generator["Rows | DraftBlock", "torch.Tensor | None", None]


def run_plan(plan: Plan, model: FeatureDraftModel, cache) -> Iterator[DraftBlock]:
    """Drive one session's plan alone: each `Rows` is one forward on its own cache."""
    reply = None
    while True:
        try:
            step = plan.send(reply)
        except StopIteration:
            return
        if isinstance(step, Rows):
            reply = model(step.rows[None], cache, last_only=True)[0]
        else:
            reply = None
            yield step


class FeatureDraftSession:
    """The DraftSession protocol for a feature drafter: chains, k tokens per forward (semi-AR), or trees."""

    def __init__(self, model: FeatureDraftModel, facts: ModelFacts, sampling: SamplingParams,
                 tree_shape: TreeShape | None = None):
        self.model = model
        self.facts = facts
        self.sampling = sampling
        self.tree_shape = tree_shape if tree_shape is not None and not tree_shape.is_chain else None
        self.cache = model.new_cache()
        self._generator = torch.Generator().manual_seed((sampling.seed + DRAFTER_SEED_OFFSET) % 2**63)
        self._real_length = 0  # cache rows computed from the target's own features
        self._unfed: torch.Tensor | None = None  # [P, D] real rows not yet in the cache
        self._features: torch.Tensor | None = None  # [k, D] predictions after the last real row
        # The last block drafted, with the features its tokens came from: the chain just proposed, or
        # the look-ahead's chain that the last verification kept. A look-ahead over it reuses them.
        self._carried: Carried | None = None
        self._outcomes: dict[tuple[int, int], Carried] = {}  # the last look-ahead's chains by outcome

    @property
    def real_length(self) -> int:
        return self._real_length

    @torch.inference_mode()
    def prefill(self, prompt: PromptInputs, first: VerifyResult) -> None:
        if first.hidden is None:
            raise InvalidArgument("drafter", "the feature drafter needs the target's hidden states")
        expanded = self.facts.expand_image_tokens(prompt.token_ids)
        tokens = torch.tensor([*expanded, *first.tokens])
        visual = None if prompt.visual_embeds is None else prompt.visual_embeds.float()
        latents = None if prompt.drafter_latents is None else prompt.drafter_latents.float()
        context = sequence_context(self.model, tokens, first.hidden.float().cpu(), self.facts, len(expanded), visual,
                                   latents)
        self._unfed = context.inputs

    @torch.inference_mode()
    def propose(self, max_tokens: int, assume: Sequence[int] = ()) -> Iterator[DraftBlock]:
        if assume and self.tree_shape is None and max_tokens > 1:  # a look-ahead: cover the likely outcomes
            yield self._lookahead(max_tokens, assume)
            return
        yield from run_plan(self.plan(max_tokens, assume), self.model, self.cache)

    def plan(self, max_tokens: int, assume: Sequence[int] = ()) -> Plan:
        """`propose` as steps: yields `Rows` (send back the features [k, D] after their last row, with
        the rows appended to this session's cache) and the blocks themselves (send back None). One
        plan serves both drivers: `run_plan` here, and the draft service's batcher, which runs many
        sessions' `Rows` in one forward."""
        # Drafting ahead (pipelined) drafts the full length too: it runs while the verifier works.
        features = yield from self._sync_steps()
        for start in range(0, len(assume), len(features)):  # tokens taken as accepted, k per forward
            tokens = torch.tensor(list(assume[start : start + len(features)]))
            features = yield Rows(self.model.fuse(self.model.embed(tokens), features[: len(tokens)]))
        if self.tree_shape is not None and max_tokens > 0:
            yield self._propose_tree(features, max_tokens)
            return
        produced = 0
        self._carried = None
        while produced < max_tokens:
            width = min(len(features), max_tokens - produced)
            block = self._choose(self.model.logits(features[:width]))
            if not assume:
                self._carry(block.tokens, features[:width])
            yield block
            produced += width
            if produced >= max_tokens:
                return
            # The drafted tokens with the features they were predicted from are the next rows.
            features = yield Rows(self.model.fuse(self.model.embed(torch.tensor(block.tokens)), features[:width]))

    @torch.inference_mode()
    def advance(self, result: VerifyResult) -> None:
        if result.hidden is None:
            raise InvalidArgument("drafter", "the feature drafter needs the target's hidden states")
        assert result.hidden.shape[0] == len(result.tokens), (result.hidden.shape, result.tokens)
        self.sync()  # rows committed earlier but never drafted from (a propose of 0 tokens)
        self.cache.truncate(self._real_length)
        # The verifier's outcome picks the chain of the last look-ahead that holds, if it drafted one.
        self._carried = self._outcomes.get((result.num_accepted, result.tokens[-1]))
        self._outcomes = {}
        # Row j pairs h_j with x_{j+1}: the pending token's row with the first accepted token, and so on.
        self._unfed = self.model.fuse(self.model.embed(torch.tensor(result.tokens)), result.hidden.float().cpu())

    @torch.inference_mode()
    def sync(self) -> torch.Tensor:
        """Run the unfed real rows; the cache then ends at the last real row. -> features [k, D]."""
        steps = self._sync_steps()
        reply = None
        while True:
            try:
                rows = steps.send(reply)
            except StopIteration as done:
                return done.value
            reply = self.model(rows.rows[None], self.cache, last_only=True)[0]

    def _lookahead(self, max_tokens: int, assume: Sequence[int]) -> DraftBlock:
        carried, self._carried = self._carried, None
        if carried is not None and carried.covers(assume):  # b's rows from its own features, one forward
            self.cache.truncate(self._real_length)
            unfed, self._unfed = self._unfed, None
            ahead = branching_lookahead(self.model, self.cache, None, assume, max_tokens, self._choose, unfed,
                                        carried.features[: len(assume)])
            if ahead.after_real is not None:
                self._features = ahead.after_real
                self._real_length += len(unfed)
        else:
            ahead = branching_lookahead(self.model, self.cache, self.sync(), assume, max_tokens, self._choose)
        self._outcomes = ahead.chains
        return ahead.block

    def _carry(self, tokens: Sequence[int], features: torch.Tensor) -> None:
        """Extend the carried chain by the block just drafted (a chain of k-token pieces)."""
        if self._carried is None:
            self._carried = Carried(tuple(tokens), features)
        else:
            self._carried = Carried((*self._carried.tokens, *tokens), torch.cat([self._carried.features, features]))

    def _sync_steps(self) -> Generator[Rows, torch.Tensor, torch.Tensor]:
        self.cache.truncate(self._real_length)
        if self._unfed is not None and len(self._unfed):
            unfed, self._unfed = self._unfed, None
            self._features = yield Rows(unfed)
            self._real_length += len(unfed)
        assert self._features is not None, "prefill first"
        return self._features

    def close(self) -> None:
        self.cache = None

    def _propose_tree(self, after: torch.Tensor, depth: int) -> DraftBlock:
        """A dynamic tree of `depth` levels after the features `after` [k, D] (see tree_drafting)."""
        features = TreeFeatures(self.model, self.cache, after)
        return grow_tree(features.root_logits(), features.children_logits, self.tree_shape, depth, self.sampling,
                         self._generator)

    def _choose(self, logits: torch.Tensor) -> DraftBlock:
        """logits: [n, V] -> n draft tokens (argmax, or sampled with their transformed probabilities)."""
        if self.sampling.greedy:
            return DraftBlock(tuple(logits.argmax(dim=-1).tolist()))
        probs = probs_from_logits(logits, self.sampling)  # [n, V]
        tokens = torch.multinomial(probs, 1, generator=self._generator).flatten()
        return DraftBlock(tuple(tokens.tolist()), probs)
