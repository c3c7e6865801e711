"""The logits transforms agree with HF's warpers (the reference users know)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from speculum.config import SamplingParams
from speculum.sampling import probs_from_logits


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
@pytest.mark.parametrize("top_k", [0, 1, 5])
@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.3])
def test_transforms_match_hf_warpers(temperature, top_k, top_p):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 2
    ours = probs_from_logits(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    torch.testing.assert_close(ours, scores.softmax(-1))


def test_top_p_keeps_at_least_the_most_likely_token():
    probs = probs_from_logits(torch.tensor([[3.0, 0.0, 0.0]]), SamplingParams(temperature=1.0, top_p=0.01))
    assert probs.tolist() == [[1.0, 0.0, 0.0]]
