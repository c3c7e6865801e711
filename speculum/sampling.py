"""Logits -> probabilities under temperature / top-k / top-p, identical for drafter and target.

Speculative sampling is lossless only if both sides apply exactly the same transforms, so there is
one implementation and both import it. Greedy decoding never comes here.
"""

from __future__ import annotations

import torch

from speculum.config import SamplingParams


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Transformed next-token distribution. logits: [..., V] -> probs: [..., V] (float32)."""
    assert not params.greedy, "greedy decoding uses argmax, not probabilities"
    scores = logits.float() / params.temperature
    if params.top_k and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        sorted_probs = sorted_scores.softmax(dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p; the top token always stays.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores.softmax(dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token id drawn from probs: [V]."""
    return int(torch.multinomial(probs, 1, generator=generator))
