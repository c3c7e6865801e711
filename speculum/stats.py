"""Per-request speculation statistics, filled by the loop and turned into fields/metrics at the edge."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class SpecStats:
    """Counts for one request.

    target_forwards: target verification forward passes (the prefill is not counted).
    draft_tokens: tokens the drafter proposed.
    accepted_tokens: proposed tokens the target accepted and that were emitted.
    emitted_tokens: tokens emitted by verification passes (accepted + bonus/recovered), after
        stop conditions trimmed the last block. The prefill's first token is not among them.
    ttft_s: request start -> first token. decode_s: first token -> last token.
    drafted_ahead: rounds whose block was drafted while the previous one was verified (pipelined).
    """

    target_forwards: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    emitted_tokens: int = 0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    drafted_ahead: int = 0

    @property
    def mean_accepted_length(self) -> float:
        """τ: tokens emitted per target verification forward pass, bonus included (0 if none ran)."""
        return self.emitted_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted share of proposed draft tokens (0 if nothing was proposed)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    def speculation_fields(self) -> dict[str, float | int]:
        """The `speculation{...}` object of the public contract."""
        return {
            "target_forwards": self.target_forwards,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "mean_accepted_length": round(self.mean_accepted_length, 4),
            "drafted_ahead": self.drafted_ahead,
        }

    def as_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "mean_accepted_length": self.mean_accepted_length}
