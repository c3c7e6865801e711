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
from speculum.records import DraftBlock, PromptInputs, VerifyResult
from speculum.rejection import Verdict, verify_greedy, verify_sampling, verify_tree_greedy, verify_tree_sampling
from speculum.sampling import probs_from_logits
from speculum.vlm import VisionLanguageModel


class TargetSession:
    """The target's side of one request."""

    def __init__(self, model: VisionLanguageModel, sampling: SamplingParams):
        assert sampling.seed is not None, "resolve the seed first (SamplingParams.with_seed)"
        self.model = model
        self.sampling = sampling
        self.cache = model.new_cache()
        self._generator = torch.Generator().manual_seed(sampling.seed)
        self._pending: int | None = None

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
        embeds = self.model.embed(self.model.expand_image_tokens(prompt.token_ids), visual)
        step = self.model.forward(self.cache, inputs_embeds=embeds, logits_for_last=1)
        verdict = self._judge(DraftBlock(()), step.logits)
        self._pending = verdict.next_token
        return VerifyResult(0, (verdict.next_token,), verdict.next_kind, step.hidden)

    def verify(self, block: DraftBlock) -> VerifyResult:
        """Check `block` in one forward pass; the cache ends at the pending token's predecessor."""
        assert self._pending is not None, "prefill first"
        if not block.is_chain:
            return self._verify_tree(block)
        committed = self.cache_length
        step = self.model.forward(self.cache, [self._pending, *block.tokens])
        verdict = self._judge(block, step.logits)
        kv_cache.truncate(self.cache, committed + 1 + verdict.num_accepted)
        self._pending = verdict.next_token
        accepted = block.tokens[: verdict.num_accepted]
        return VerifyResult(
            verdict.num_accepted,
            (*accepted, verdict.next_token),
            verdict.next_kind,
            step.hidden[: verdict.num_accepted + 1],
        )

    def _verify_tree(self, block: DraftBlock) -> VerifyResult:
        """Check every branch of a candidate tree in one pass (tree attention), keep the accepted one."""
        tree.check_parents(block.parents)
        committed = self.cache_length
        step = self.model.forward(self.cache, [self._pending, *block.tokens], tree_parents=block.parents)
        if self.sampling.greedy:
            verdict = verify_tree_greedy(block.tokens, block.parents, step.logits)
        else:
            target_probs = probs_from_logits(step.logits, self.sampling).cpu()
            draft_probs = None if block.draft_probs is None else block.draft_probs.float().cpu()
            verdict = verify_tree_sampling(block.tokens, block.parents, draft_probs, target_probs, self._generator)
        kv_cache.keep_rows(self.cache, committed + 1, [committed + 1 + node for node in verdict.path])
        self._pending = verdict.next_token
        rows = [0, *(node + 1 for node in verdict.path)]
        accepted = tuple(block.tokens[node] for node in verdict.path)
        return VerifyResult(len(verdict.path), (*accepted, verdict.next_token), verdict.next_kind, step.hidden[rows])

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


class InProcessVerifier:
    """The Verifier protocol over a model in this process."""

    def __init__(self, model: VisionLanguageModel):
        self.model = model

    def open(self, sampling: SamplingParams, return_features: bool = False) -> TargetSession:
        return TargetSession(self.model, sampling)  # in-process, features cost nothing to pass
