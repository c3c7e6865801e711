"""The acceptance rules on hand-built cases, and statistically against exact distributions."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from speculum import rejection
from speculum.rejection import NextTokenKind, verify_greedy, verify_sampling


def one_hot_logits(tokens: list[int], vocab: int = 6) -> torch.Tensor:
    logits = torch.zeros(len(tokens), vocab)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 5.0
    return logits


@pytest.mark.parametrize(
    "drafts, target, accepted, next_token",
    [
        ([1, 2, 3], [1, 2, 3, 4], 3, 4),  # perfect match: all accepted, bonus
        ([0, 2, 3], [1, 2, 3, 4], 0, 1),  # first rejected
        ([1, 5, 3], [1, 2, 3, 4], 1, 2),  # middle rejected
        ([1, 2, 5], [1, 2, 3, 4], 2, 3),  # last rejected
        ([], [4], 0, 4),  # empty block: plain decoding
    ],
)
def test_greedy_cases(drafts, target, accepted, next_token):
    verdict = verify_greedy(torch.tensor(drafts, dtype=torch.long), one_hot_logits(target))
    assert (verdict.num_accepted, verdict.next_token, verdict.next_kind) == (accepted, next_token, NextTokenKind.BONUS)


def test_sampling_accepts_everything_when_draft_equals_target():
    target_probs = torch.tensor([[0.5, 0.5, 0, 0], [0.1, 0.2, 0.3, 0.4], [0.25] * 4])
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        verdict = verify_sampling(torch.tensor([0, 3]), target_probs[:2].clone(), target_probs, generator)
        assert verdict.num_accepted == 2 and verdict.next_kind is NextTokenKind.BONUS


def test_sampling_never_accepts_a_token_the_target_rules_out():
    target_probs = torch.tensor([[0.0, 1.0, 0.0], [1 / 3] * 3])
    generator = torch.Generator().manual_seed(0)
    for draft_probs in (None, torch.tensor([[1.0, 0.0, 0.0]])):
        verdict = verify_sampling(torch.tensor([0]), draft_probs, target_probs, generator)
        assert (verdict.num_accepted, verdict.next_token, verdict.next_kind) == (0, 1, NextTokenKind.RECOVERED)


def test_sampling_is_reproducible_with_a_seed():
    target_probs = torch.softmax(torch.randn(5, 7, generator=torch.Generator().manual_seed(1)), -1)
    draft_probs = torch.softmax(torch.randn(4, 7, generator=torch.Generator().manual_seed(2)), -1)

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return [verify_sampling(torch.tensor([1, 2, 3, 4]), draft_probs, target_probs, generator) for _ in range(50)]

    assert run(5) == run(5)
    assert run(5) != run(6)


# --- statistics: the emitted tokens follow the target distribution ----------------------------------
VOCAB, DRAFTS, TRIALS = 5, 2, 20000
TARGET = torch.tensor([[0.40, 0.25, 0.15, 0.15, 0.05], [0.05, 0.10, 0.50, 0.05, 0.30], [0.2] * 5])
DRAFT = torch.tensor([[0.10, 0.20, 0.50, 0.10, 0.10], [0.30, 0.30, 0.10, 0.20, 0.10]])


def _emitted_statistics(verify, one_hot: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of the first emitted token, and of the second one when the first draft was accepted."""
    generator = torch.Generator().manual_seed(1234)
    first, second = torch.zeros(VOCAB), torch.zeros(VOCAB)
    for _ in range(TRIALS):
        drafts = torch.multinomial(DRAFT, 1, generator=generator).squeeze(1)  # [K]
        verdict = verify(drafts, None if one_hot else DRAFT, TARGET, generator)
        emitted = [*drafts[: verdict.num_accepted].tolist(), verdict.next_token]
        first[emitted[0]] += 1
        if verdict.num_accepted >= 1:
            second[emitted[1]] += 1
    return first, second


def _matches(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    expected = probs * counts.sum()
    return chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3


@pytest.mark.parametrize("one_hot", [False, True], ids=["with-draft-probs", "one-hot-drafts"])
def test_sampling_keeps_the_target_distribution(one_hot):
    first, second = _emitted_statistics(verify_sampling, one_hot)
    assert _matches(first, TARGET[0])
    assert _matches(second, TARGET[1])


def _recover_from_target(target_probs, draft_probs, draft_token):
    return target_probs  # the classic bug: resample from p instead of norm(max(0, p - q))


def test_the_statistical_test_has_power(monkeypatch):
    """A broken residual must be caught, or the test above proves nothing."""
    monkeypatch.setattr(rejection, "_residual", _recover_from_target)
    first, _ = _emitted_statistics(rejection.verify_sampling, one_hot=False)
    assert not _matches(first, TARGET[0])
