"""After any rejection the target's KV cache equals a fresh prefill of the accepted sequence."""

from __future__ import annotations

import pytest
import torch

from conftest import build_prompt, hf_greedy, png_bytes
from speculum.config import SamplingParams
from speculum.records import DraftBlock, PromptInputs
from verify_service.target import TargetSession


def cache_tensors(session: TargetSession) -> list[torch.Tensor]:
    return [t for layer in session.cache.layers for t in (layer.keys, layer.values)]


@pytest.mark.parametrize("wrong_at", [0, 2, 4, None])
@pytest.mark.parametrize("with_image", [True, False])
def test_cache_after_rejection_equals_fresh_prefill(llava_engine, wrong_at, with_image):
    target = llava_engine.target
    prompt = build_prompt(llava_engine, "What is in the picture?", [png_bytes(3)] if with_image else [])
    reference = hf_greedy(target, prompt, 12)
    sampling = SamplingParams(max_new_tokens=12, seed=0)

    session = TargetSession(target, sampling)
    first = session.prefill(prompt)
    drafts = list(reference[1:6])
    if wrong_at is not None:
        drafts[wrong_at] = (drafts[wrong_at] + 1) % target.vocab_size
    result = session.verify(DraftBlock(tuple(drafts)))
    accepted = 5 if wrong_at is None else wrong_at
    assert result.num_accepted == accepted
    assert result.tokens == tuple(reference[1 : 1 + accepted + 1])
    assert result.hidden.shape == (accepted + 1, target.hidden_size)

    # A fresh session prefilled with prompt + every committed token but the pending one.
    committed = [*first.tokens, *result.tokens[:-1]]
    fresh = TargetSession(target, sampling)
    fresh.prefill(PromptInputs((*prompt.token_ids, *committed), prompt.pixel_values))
    assert session.cache_length == fresh.cache_length
    for rolled_back, rebuilt in zip(cache_tensors(session), cache_tensors(fresh), strict=True):
        torch.testing.assert_close(rolled_back, rebuilt, atol=1e-5, rtol=1e-4)

    # and decoding continues exactly as the target alone
    after = session.verify(DraftBlock(()))
    assert after.tokens == (reference[accepted + 2],)
