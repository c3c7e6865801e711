"""Prompt-lookup (n-gram) drafting: no model; continue the latest earlier occurrence of the suffix.

Proposes tokens without probabilities, so verification treats them as one-hot drafts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from speculum.config import SamplingParams
from speculum.records import DraftBlock, PromptInputs, VerifyResult


@dataclass(frozen=True)
class NgramConfig:
    """max_ngram / min_ngram: suffix lengths tried, longest first."""

    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")


class NgramSession:
    """One request's token history."""

    def __init__(self, config: NgramConfig):
        self.config = config
        self.history: list[int] = []

    def prefill(self, prompt: PromptInputs, first: VerifyResult) -> None:
        self.history = [*prompt.token_ids, *first.tokens]

    def propose(self, max_tokens: int, assume: Sequence[int] = ()) -> Iterator[DraftBlock]:
        yield DraftBlock(tuple(lookup([*self.history, *assume], max_tokens, self.config)))

    def advance(self, result: VerifyResult) -> None:
        self.history.extend(result.tokens)

    def close(self) -> None:
        self.history = []


def lookup(history: list[int], max_tokens: int, config: NgramConfig) -> list[int]:
    """Up to `max_tokens` tokens that followed the latest earlier match of history's suffix."""
    if max_tokens <= 0:
        return []
    for n in range(min(config.max_ngram, len(history) - 1), config.min_ngram - 1, -1):
        suffix = history[-n:]
        # Scan right to left: recent context predicts the continuation best.
        for start in range(len(history) - n - 1, -1, -1):
            if history[start : start + n] == suffix:
                return history[start + n : start + n + max_tokens]
    return []


class NgramDrafter:
    """The Drafter protocol for prompt lookup."""

    needs_target_features = False

    def __init__(self, config: NgramConfig = NgramConfig()):
        self.config = config

    def open(self, sampling: SamplingParams) -> NgramSession:
        return NgramSession(self.config)
