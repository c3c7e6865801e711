"""Sampling through the whole loop keeps the target's distribution (small vocabulary, exact reference).

The exact marginal distributions of generated tokens 2 and 3 are computed from the target by
enumerating every prefix; speculative runs with two kinds of drafters must match them (chi-square),
and a deliberately broken acceptance rule must not.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from draft_service.ngram import NgramDrafter
from draft_service.vlm_drafter import VlmDrafter
from orchestrator.loop import speculate
from orchestrator.stopping import StopChecker
from speculum import rejection
from speculum.config import SamplingParams, SpeculationParams
from speculum.records import PromptInputs
from speculum.rejection import NextTokenKind, Verdict
from speculum.sampling import probs_from_logits
from speculum.tiny import TinySpec, build_tiny_model
from speculum.vlm import VisionLanguageModel
from verify_service.target import InProcessVerifier

VOCAB, NEW_TOKENS, SAMPLES = 8, 3, 1500
PROMPT = PromptInputs((1, 4, 5, 6, 4, 5, 6, 4, 5))
SAMPLING = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.9, top_k=6)


def tiny_lm(seed: int) -> VisionLanguageModel:
    spec = TinySpec(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                    multimodal=False, init_std=0.15, seed=seed)
    return VisionLanguageModel(build_tiny_model(spec))


@pytest.fixture(scope="module")
def target():
    return tiny_lm(seed=11)


@pytest.fixture(scope="module")
def exact_marginals(target):
    """P(token j = v) for j = 1, 2, 3 under the transformed target distribution, by enumeration."""
    def next_probs(prefix):
        logits = target.forward(target.new_cache(), [*PROMPT.token_ids, *prefix]).logits[-1]
        return probs_from_logits(logits, SAMPLING)

    marginals = torch.zeros(NEW_TOKENS, VOCAB, dtype=torch.float64)
    prefixes = {(): 1.0}
    for position in range(NEW_TOKENS):
        grown = {}
        for prefix, mass in prefixes.items():
            probs = next_probs(prefix).double()
            marginals[position] += mass * probs
            for token in (probs > 0).nonzero().flatten().tolist():
                grown[(*prefix, token)] = mass * float(probs[token])
        prefixes = grown
    return marginals


def sample_counts(target, drafter, seed_base: int, speculation: SpeculationParams | None = None) -> torch.Tensor:
    counts = torch.zeros(NEW_TOKENS, VOCAB)
    verifier = InProcessVerifier(target)
    for i in range(SAMPLES):
        sampling = SamplingParams(**{**SAMPLING.__dict__, "seed": seed_base + i})
        stop = StopChecker(NEW_TOKENS, frozenset())
        chunks = speculate(PROMPT, sampling, speculation or SpeculationParams(num_draft_tokens=2), verifier, drafter, stop)
        tokens = [t for chunk in chunks for t in chunk.token_ids]
        for position, token in enumerate(tokens):
            counts[position, token] += 1
    return counts


def matches(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token the target rules out was generated"
    expected = probs[keep].double() / probs[keep].double().sum() * counts.sum()  # sums must agree exactly
    return chisquare(counts[keep].double().numpy(), expected.numpy()).pvalue > 1e-3


@pytest.mark.parametrize("drafter_kind", ["small-lm", "ngram"])
def test_speculative_sampling_matches_the_target(target, exact_marginals, drafter_kind):
    drafter = VlmDrafter(tiny_lm(seed=12)) if drafter_kind == "small-lm" else NgramDrafter()
    counts = sample_counts(target, drafter, seed_base=10_000)
    for position in range(NEW_TOKENS):
        assert matches(counts[position], exact_marginals[position]), position


def test_target_alone_matches_the_target(target, exact_marginals):
    counts = sample_counts(target, None, seed_base=20_000)
    for position in range(NEW_TOKENS):
        assert matches(counts[position], exact_marginals[position]), position


def _accept_everything(draft_tokens, draft_probs, target_probs, generator):
    return Verdict(len(draft_tokens), int(torch.multinomial(target_probs[-1], 1, generator=generator)), NextTokenKind.BONUS)


def test_a_broken_acceptance_rule_is_detected(target, exact_marginals, monkeypatch):
    import verify_service.target as target_module

    monkeypatch.setattr(target_module, "verify_sampling", _accept_everything)
    counts = sample_counts(target, VlmDrafter(tiny_lm(seed=12)), seed_base=30_000)
    assert not all(matches(counts[p], exact_marginals[p]) for p in range(1, NEW_TOKENS))


def test_seeded_requests_are_reproducible(target):
    drafter = VlmDrafter(tiny_lm(seed=12))
    verifier = InProcessVerifier(target)

    def run(seed):
        sampling = SamplingParams(max_new_tokens=20, temperature=1.0, seed=seed)
        chunks = speculate(PROMPT, sampling, SpeculationParams(num_draft_tokens=3), verifier, drafter,
                           StopChecker(20, frozenset()))
        return [t for chunk in chunks for t in chunk.token_ids]

    assert run(7) == run(7)
    assert any(run(7) != run(s) for s in (8, 9, 10))

