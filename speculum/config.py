"""Per-request parameters: sampling and speculation. Frozen and validated on construction.

Validation names the offending field the way the public API spells it, so the gRPC edge can
pass the message through unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from dataclasses import dataclass

from speculum.errors import InvalidArgument

MAX_NEW_TOKENS_LIMIT = 8192  # hard ceiling; the target's context length usually binds first
MAX_DRAFT_TOKENS = 32


@dataclass(frozen=True)
class SamplingParams:
    """How the target's next-token distribution is turned into tokens.

    max_new_tokens: tokens to generate at most (>= 1).
    temperature: 0 means greedy (argmax); > 0 samples from softmax(logits / temperature).
    top_p: nucleus mass in (0, 1]; 1 disables it.
    top_k: keep the k most likely tokens; 0 disables it.
    seed: seeds the per-request generators; None draws a fresh seed per request.
    stop: strings that end generation; the stop string itself is not part of the returned text.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise InvalidArgument(
                "sampling.max_new_tokens", f"must be in [1, {MAX_NEW_TOKENS_LIMIT}], got {self.max_new_tokens}"
            )
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument("sampling.temperature", f"must be a finite number >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidArgument("sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument("sampling.top_k", f"must be >= 0 (0 disables it), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidArgument("sampling.seed", f"must be in [0, 2**63), got {self.seed}")
        if any(not s for s in self.stop):
            raise InvalidArgument("sampling.stop", "stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_seed(self) -> SamplingParams:
        """This request with a concrete seed, so that every part it reaches draws from one seed."""
        if self.seed is not None:
            return self
        return dataclasses.replace(self, seed=secrets.randbits(63))


@dataclass(frozen=True)
class SpeculationParams:
    """Whether and how far to speculate.

    enabled: False decodes with the target alone (one target forward per token).
    num_draft_tokens: draft block length K per round (the verifier checks K + 1 positions). 8 by
        default: on the demo pair it beats K = 4 in process on image and text prompts, and through
        the services (README, "Defaults").
    pipelined: draft the next block while the current one is verified (orchestrator.lookahead);
        the output is the same either way. None (the default) is the faster mode where the loop
        runs: sequential in process (one device for both) and, at the default K, behind the
        public API too (`public_api.PIPELINED_BEHIND_API`; README, "Defaults").
    adaptive: num_draft_tokens is the most K may be; each round's K follows the request's recent
        acceptance (1..num_draft_tokens) and the verifier's load (down to 0 when it is saturated),
        see orchestrator.draft_length. False (the default: measured faster on the demo pair, see
        README): K = num_draft_tokens every round. The output is the same either way.
    """

    enabled: bool = True
    num_draft_tokens: int = 8
    pipelined: bool | None = None
    adaptive: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.num_draft_tokens <= MAX_DRAFT_TOKENS:
            raise InvalidArgument(
                "speculation.num_draft_tokens",
                f"must be in [1, {MAX_DRAFT_TOKENS}], got {self.num_draft_tokens}",
            )
        if self.pipelined is not None and not isinstance(self.pipelined, bool):
            raise InvalidArgument("speculation.pipelined", f"must be true, false or unset, got {self.pipelined!r}")
        if not isinstance(self.adaptive, bool):
            raise InvalidArgument("speculation.adaptive", f"must be true or false, got {self.adaptive!r}")
