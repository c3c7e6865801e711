"""The in-process engine: a target, an optional drafter and a prompt builder, serving requests.

Validates each request against the target (context length, images), runs the speculative loop
and packs the public result fields. The CLI, the demo and the benchmarks use it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoImageProcessor, AutoTokenizer

from orchestrator.loop import Chunk, speculate
from orchestrator.prompting import PromptBuilder
from orchestrator.protocols import Drafter
from orchestrator.stopping import FinishReason, StopChecker
from speculum.config import SamplingParams, SpeculationParams
from speculum.errors import InvalidArgument
from speculum.records import PromptInputs
from speculum.stats import SpecStats
from speculum.vlm import VisionLanguageModel
from verify_service.target import InProcessVerifier


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    images: Sequence[bytes] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    speculation: SpeculationParams = field(default_factory=SpeculationParams)


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    prompt_tokens: int
    stats: SpecStats

    def as_json(self) -> dict:
        """The CLI's --json object (DESIGN.md's public contract)."""
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason.value,
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.token_ids)},
            "speculation": self.stats.speculation_fields(),
            "timing": {"ttft_s": round(self.stats.ttft_s, 6), "decode_s": round(self.stats.decode_s, 6)},
        }


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request: its tokenized prompt and its stop conditions."""

    request: GenerateRequest
    prompt: PromptInputs
    prompt_tokens: int
    stop: StopChecker


class Engine:
    """Serves requests in this process."""

    def __init__(self, target: VisionLanguageModel, prompts: PromptBuilder, drafter: Drafter | None = None):
        self.target = target
        self.prompts = prompts
        self.drafter = drafter
        self.verifier = InProcessVerifier(target)

    @classmethod
    def from_pretrained(cls, target_dir: str | Path, drafter: Drafter | None = None) -> Engine:
        target = VisionLanguageModel.from_pretrained(target_dir)
        tokenizer = AutoTokenizer.from_pretrained(target_dir, local_files_only=True)
        image_processor = None
        if target.is_multimodal:
            image_processor = AutoImageProcessor.from_pretrained(target_dir, local_files_only=True)
        return cls(target, PromptBuilder(tokenizer, image_processor, target.image_token_id), drafter)

    def prepare(self, request: GenerateRequest) -> PreparedRequest:
        """Tokenize and validate a request against this target."""
        prompt = self.prompts.build(request.prompt, request.images)
        prompt_tokens = len(self.target.expand_image_tokens(prompt.token_ids))
        if prompt_tokens + request.sampling.max_new_tokens > self.target.max_positions:
            raise InvalidArgument(
                "sampling.max_new_tokens",
                f"prompt ({prompt_tokens} tokens) + max_new_tokens ({request.sampling.max_new_tokens}) exceeds "
                f"the target's context of {self.target.max_positions} tokens",
            )
        stop = StopChecker(
            request.sampling.max_new_tokens, self.target.eos_token_ids, request.sampling.stop, self.prompts.decode
        )
        return PreparedRequest(request, prompt, prompt_tokens, stop)

    def stream(self, prepared: PreparedRequest) -> Iterator[Chunk]:
        """Yield the request's chunks as the loop settles them."""
        request = prepared.request
        return speculate(prepared.prompt, request.sampling, request.speculation, self.verifier, self.drafter, prepared.stop)

    def generate(self, request: GenerateRequest) -> GenerationResult:
        prepared = self.prepare(request)
        token_ids: list[int] = []
        for chunk in self.stream(prepared):
            token_ids.extend(chunk.token_ids)
        text = prepared.stop.visible_text(self.prompts.decode(token_ids), chunk.finish)
        return GenerationResult(text, tuple(token_ids), chunk.finish, prepared.prompt_tokens, chunk.stats)
