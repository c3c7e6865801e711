"""Stop conditions: max new tokens, EOS, stop strings. Decides how much of a new block to keep."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_new_tokens reached
    EOS = "eos"  # the target emitted an end-of-sequence token (it is kept in token_ids)
    STOP = "stop"  # a stop string appeared (it is cut from the text)


@dataclass(frozen=True)
class StopDecision:
    """keep: how many of the offered tokens to append. finish: why generation ends, if it does."""

    keep: int
    finish: FinishReason | None


class StopChecker:
    """Applies one request's stop conditions to the tokens it is offered, in order."""

    def __init__(
        self,
        max_new_tokens: int,
        eos_token_ids: frozenset[int],
        stop_strings: Sequence[str] = (),
        decode: Callable[[Sequence[int]], str] | None = None,
        preceding: Sequence[int] = (),
    ):
        """`preceding`: tokens emitted before these (a resumed request's), which stop strings may span."""
        assert decode is not None or not stop_strings, "stop strings need a decoder"
        self.max_new_tokens = max_new_tokens
        self.eos_token_ids = eos_token_ids
        self.stop_strings = tuple(stop_strings)
        self._decode = decode
        self._longest_stop = max((len(s) for s in stop_strings), default=0)
        self._preceding = tuple(preceding)

    def offer(self, generated: Sequence[int], new_tokens: Sequence[int]) -> StopDecision:
        """`generated` holds the tokens kept so far; `new_tokens` the candidates to append."""
        room = self.max_new_tokens - len(generated)
        for i, token in enumerate(new_tokens[:room]):
            if token in self.eos_token_ids:
                return StopDecision(i + 1, FinishReason.EOS)
            if self.stop_strings and self._completes_stop([*self._preceding, *generated, *new_tokens[: i + 1]]):
                return StopDecision(i + 1, FinishReason.STOP)
        if len(new_tokens) >= room:
            return StopDecision(room, FinishReason.LENGTH)
        return StopDecision(len(new_tokens), None)

    def _completes_stop(self, tokens: Sequence[int]) -> bool:
        # Only the tail can hold a stop string that the last token completed.
        tail = self._decode(tokens[-(4 * self._longest_stop + 8) :])  # a char is <= 4 byte-tokens
        return any(s in tail for s in self.stop_strings)

    def visible_text(self, text: str, finish: FinishReason | None) -> str:
        """The text returned to the client: cut before the first stop string."""
        if finish is not FinishReason.STOP:
            return text
        cut = min((i for s in self.stop_strings if (i := text.find(s)) >= 0), default=len(text))
        return text[:cut]
