"""An independent small VLM as drafter: any causal (vision-)LM sharing the target's tokenizer.

It sees the images through its own vision tower and drafts K tokens autoregressively (greedy, or
sampled with the request's transforms, returning its distributions for speculative sampling).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from speculum import kv_cache
from speculum.config import SamplingParams
from speculum.errors import InvalidArgument
from speculum.records import DraftBlock, PromptInputs, VerifyResult
from speculum.sampling import probs_from_logits, sample
from speculum.vlm import VisionLanguageModel

DRAFTER_SEED_OFFSET = 1  # the drafter's generator must not replay the verifier's random stream


class VlmDraftSession:
    """One request's drafter state: KV cache over `cached` and the committed token sequence."""

    def __init__(self, model: VisionLanguageModel, sampling: SamplingParams):
        self.model = model
        self.sampling = sampling
        self.cache = model.new_cache()
        self._generator = torch.Generator().manual_seed((sampling.seed + DRAFTER_SEED_OFFSET) % 2**63)
        self.cached: list[int] = []  # the (expanded) token ids whose keys/values are in the cache
        self.committed: list[int] = []  # the (expanded) prompt plus every emitted token
        self._settled = 0  # cached[:_settled] == committed[:_settled]

    def prefill(self, prompt: PromptInputs, first: VerifyResult) -> None:
        visual = None
        if prompt.num_images:
            if not self.model.is_multimodal or prompt.pixel_values is None:
                raise InvalidArgument("drafter", "this drafter needs pixel values to see the images")
            visual = self.model.encode_images(prompt.pixel_values)
        prompt_ids = self.model.expand_image_tokens(prompt.token_ids)
        self.model.forward(self.cache, inputs_embeds=self.model.embed(prompt_ids, visual), logits_for_last=1)
        self.cached = list(prompt_ids)
        self.committed = [*prompt_ids, *first.tokens]
        self._settled = len(prompt_ids)

    def propose(self, max_tokens: int, assume: Sequence[int] = ()) -> Iterator[DraftBlock]:
        self._drop_unsettled()  # a round drafted but never settled (no advance since) is redone
        feed = [*self.committed[len(self.cached) :], *assume]
        for _ in range(max_tokens):
            logits = self.model.forward(self.cache, feed, logits_for_last=1).logits[-1]  # [V]
            self.cached.extend(feed)
            if self.sampling.greedy:
                token, probs = int(logits.argmax()), None
            else:
                probs = probs_from_logits(logits, self.sampling).cpu()
                token = sample(probs, self._generator)
            yield DraftBlock((token,), None if probs is None else probs.unsqueeze(0))
            feed = [token]

    def advance(self, result: VerifyResult) -> None:
        self.committed.extend(result.tokens)
        self._drop_unsettled()

    def _drop_unsettled(self) -> None:
        """Keep the cache's rows only as far as they match `committed` (drafted rows the verifier
        accepted stay), never the last committed token: the next round feeds it. `cached` always
        extends the first `_settled` tokens of `committed`."""
        valid = self._settled
        limit = min(len(self.cached), len(self.committed) - 1)
        while valid < limit and self.cached[valid] == self.committed[valid]:
            valid += 1
        kv_cache.truncate(self.cache, valid)
        del self.cached[valid:]
        self._settled = valid

    def close(self) -> None:
        self.cache = None


class VlmDrafter:
    """The Drafter protocol over a small (vision-)language model in this process."""

    needs_target_features = False

    def __init__(self, model: VisionLanguageModel):
        self.model = model

    def open(self, sampling: SamplingParams) -> VlmDraftSession:
        return VlmDraftSession(self.model, sampling)
