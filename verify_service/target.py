"""The target adapter: one request's target state (KV cache + pending token) and its verification.

Invariant: the cache holds every committed token except the last one, the *pending* token, which
is fed first in the next pass. A verification feeds [pending, d_1..d_K] in ONE forward pass, keeps
the pending token and the accepted drafts, and rolls the cache back past the first rejection. A
candidate tree is fed the same way with tree attention; the accepted branch's rows are compacted.
"""

from __future__ import annotations

import torch

from speculum import kv_cache, tree
from speculum.config import SamplingParams
from speculum.errors import InvalidArgument
from speculum.prefix_cache import PrefixCache, image_prefix_length, prefix_key, restore
from speculum.records import DraftBlock, PromptInputs, VerifyResult
from speculum.rejection import Verdict, verify_greedy, verify_sampling, verify_tree_greedy, verify_tree_sampling
from speculum.sampling import probs_from_logits
from speculum.vlm import ModelStep, VisionLanguageModel


class TargetSession:
    """The target's side of one request. `prefixes`: rows of earlier prompts' image prefixes to reuse."""

    def __init__(self, model: VisionLanguageModel, sampling: SamplingParams, prefixes: PrefixCache | None = None):
        assert sampling.seed is not None, "resolve the seed first (SamplingParams.with_seed)"
        self.model = model
        self.sampling = sampling
        self.cache = model.new_cache()
        self._generator = torch.Generator().manual_seed(sampling.seed)
        self._pending: int | None = None
        self._prefixes = prefixes if prefixes is not None and prefixes.enabled else None
        self.reused_prefix = 0  # prompt rows the prefill took from the prefix cache

    @property
    def cache_length(self) -> int:
        return self.cache.get_seq_length()

    def prefill(self, prompt: PromptInputs) -> VerifyResult:
        """Run the prompt (text and images) and choose the first generated token."""
        assert self._pending is None, "prefill runs once per session"
        visual = prompt.visual_embeds
        if visual is None and prompt.pixel_values is not None:
            visual = self.model.encode_images(prompt.pixel_values)
        if visual is not None and not self.model.is_multimodal:
            raise InvalidArgument("images", "this target is text-only and takes no images")
        expanded = self.model.expand_image_tokens(prompt.token_ids)
        embeds = self.model.embed(expanded, visual)
        logits, hidden = self._prefill_rows(embeds, image_prefix_length(expanded, self.model.image_token_id))
        verdict = self._judge(DraftBlock(()), logits)
        self._pending = verdict.next_token
        return VerifyResult(0, (verdict.next_token,), verdict.next_kind, hidden)

    def _prefill_rows(self, embeds: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fill the cache with `embeds` [1, P, D], the first `prefix` rows from the prefix cache when
        they are there (else stored for the next request). -> (last row's logits [1, V], hidden [P, D])."""
        key = prefix_key(embeds[:, :prefix]) if self._prefixes is not None and prefix else None
        entry = None if key is None else self._prefixes.lookup(key)
        if entry is not None:
            restore(self.cache, entry)
            step = self.model.forward(self.cache, inputs_embeds=embeds[:, prefix:], logits_for_last=1)
            self.reused_prefix = prefix
            hidden = torch.cat([entry.hidden.to(step.hidden.device), step.hidden])
        else:
            step = self.model.forward(self.cache, inputs_embeds=embeds, logits_for_last=1)
            hidden = step.hidden
            if key is not None:
                self._prefixes.store(key, self.cache, hidden, prefix)
        return step.logits, hidden

    def verify(self, block: DraftBlock) -> VerifyResult:
        """Check `block` in one forward pass; the cache ends at the pending token's predecessor."""
        committed = self.cache_length
        tokens, parents = self.pass_inputs(block)
        step = self.model.forward(self.cache, tokens, tree_parents=None if block.is_chain else parents)
        return self.settle(block, committed, step)

    def pass_inputs(self, block: DraftBlock) -> tuple[list[int], tuple[int, ...]]:
        """The tokens a verification feeds ([pending, *block]) and the block's parents (a chain's too)."""
        assert self._pending is not None, "prefill first"
        if not block.is_chain:
            tree.check_parents(block.parents)
        return [self._pending, *block.tokens], block.tree_parents

    def settle(self, block: DraftBlock, committed: int, step: ModelStep) -> VerifyResult:
        """Judge `block` from the pass's `step` (logits and hidden of its 1 + K rows) and keep the
        accepted rows of the cache, which held `committed` positions before the pass."""
        if block.is_chain:
            verdict = self._judge(block, step.logits)
            path = tuple(range(verdict.num_accepted))
            kv_cache.truncate(self.cache, committed + 1 + verdict.num_accepted)
        else:
            if self.sampling.greedy:
                verdict = verify_tree_greedy(block.tokens, block.parents, step.logits)
            else:
                target_probs = probs_from_logits(step.logits, self.sampling).cpu()
                draft_probs = None if block.draft_probs is None else block.draft_probs.float().cpu()
                verdict = verify_tree_sampling(block.tokens, block.parents, draft_probs, target_probs, self._generator)
            path = verdict.path
            kv_cache.keep_rows(self.cache, committed + 1, [committed + 1 + node for node in path])
        self._pending = verdict.next_token
        accepted = tuple(block.tokens[node] for node in path)
        rows = [0, *(node + 1 for node in path)]
        return VerifyResult(len(path), (*accepted, verdict.next_token), verdict.next_kind, step.hidden[rows])

    def _judge(self, block: DraftBlock, target_logits: torch.Tensor) -> Verdict:
        """target_logits: [K + 1, V] for the block's positions and the one after it."""
        drafts = torch.tensor(block.tokens, dtype=torch.long, device=target_logits.device)
        if self.sampling.greedy:
            return verify_greedy(drafts, target_logits)
        target_probs = probs_from_logits(target_logits, self.sampling).cpu()
        draft_probs = None if block.draft_probs is None else block.draft_probs.float().cpu()
        return verify_sampling(drafts.cpu(), draft_probs, target_probs, self._generator)

    def close(self) -> None:
        self.cache = None


def verify_batch(sessions: list[TargetSession], blocks: list[DraftBlock]) -> list[VerifyResult]:
    """Verify several sessions' blocks in ONE batched target pass (same results as one by one)."""
    if len(sessions) == 1:
        return [sessions[0].verify(blocks[0])]
    model = sessions[0].model
    assert all(session.model is model for session in sessions), "a batch shares one model"
    committed = [session.cache_length for session in sessions]
    inputs = [session.pass_inputs(block) for session, block in zip(sessions, blocks)]
    steps = model.forward_batch([s.cache for s in sessions], [t for t, _ in inputs], [p for _, p in inputs])
    return [s.settle(b, c, step) for s, b, c, step in zip(sessions, blocks, committed, steps)]


class InProcessVerifier:
    """The Verifier protocol over a model in this process."""

    def __init__(self, model: VisionLanguageModel, prefixes: PrefixCache | None = None):
        self.model = model
        self.prefixes = PrefixCache() if prefixes is None else prefixes

    def open(self, sampling: SamplingParams, return_features: bool = False) -> TargetSession:
        return TargetSession(self.model, sampling, self.prefixes)  # in-process, features cost nothing to pass
