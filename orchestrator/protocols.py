"""The two roles the speculative loop talks to. In-process objects and gRPC clients implement them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from speculum.config import SamplingParams, SpeculationParams
from speculum.records import DraftBlock, PromptInputs, VerifyResult
from vision_encoder.encoder import EncodedImage


class VerifySession(Protocol):
    def prefill(self, prompt: PromptInputs) -> VerifyResult:
        """Run the prompt through the target; the result carries the first generated token."""

    def verify(self, block: DraftBlock) -> VerifyResult:
        """Check a draft block in one target forward pass."""

    def close(self) -> None:
        """Release the session's state (idempotent)."""


class Verifier(Protocol):
    def open(self, sampling: SamplingParams, return_features: bool = False) -> VerifySession:
        """A new session; `sampling.seed` is already resolved. `return_features`: results carry the
        target's hidden states (a feature-level drafter needs them; otherwise they stay home)."""


class DraftSession(Protocol):
    def prefill(self, prompt: PromptInputs, first: VerifyResult) -> None:
        """Take in the prompt and the target's prefill result (first token, prompt features)."""

    def propose(self, max_tokens: int, assume: Sequence[int] = ()) -> Iterator[DraftBlock]:
        """At most `max_tokens` candidates continuing after the last committed token, in pieces
        as they are produced (an autoregressive drafter yields one token at a time). `assume`:
        tokens still under verification, taken as accepted; the candidates continue after them."""

    def advance(self, result: VerifyResult) -> None:
        """Commit the verifier's result: keep what was accepted, drop the rest."""

    def close(self) -> None:
        """Release the session's state (idempotent)."""


class ImageEncoder(Protocol):
    def encode(self, images: Sequence[bytes]) -> list[EncodedImage]:
        """One result per image, in order; InvalidArgument names a bad `images[i]`."""


class Drafter(Protocol):
    needs_target_features: bool  # whether its sessions read VerifyResult.hidden

    def open(self, sampling: SamplingParams) -> DraftSession:
        """A new session; `sampling.seed` is already resolved."""


class LoopHost(Protocol):
    def stream(self, prompt: PromptInputs, sampling: SamplingParams, speculation: SpeculationParams,
               started: float, each_round: bool = True) -> Iterator:
        """Run one request's loop elsewhere: an `orchestrator.loop.ChunkStream` of its chunks as they
        settle (`started`: the request's arrival, perf_counter, for TTFT); without `each_round`, one
        chunk with the whole answer."""
