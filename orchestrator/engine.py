"""The in-process engine: a target, an optional drafter and a prompt builder, serving requests.

Validates each request against the target (context length, images), runs the speculative loop
and packs the public result fields. The CLI, the demo and the benchmarks use it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoImageProcessor

from orchestrator.loop import ChunkStream, speculate
from orchestrator.prompting import PromptBuilder, prompt_inputs
from orchestrator.protocols import Drafter, ImageEncoder, LoopHost, Verifier
from orchestrator.stopping import FinishReason, StopChecker
from speculum.config import SamplingParams, SpeculationParams
from speculum.errors import InvalidArgument, Unavailable
from speculum.model_facts import ModelFacts
from speculum.records import PromptInputs
from speculum.stats import SpecStats
from speculum.vlm import VisionLanguageModel
from verify_service.target import InProcessVerifier
from vision_encoder.cache import CacheSettings, LocalLRUCache
from vision_encoder.encoder import ImageEncoder as LocalImageEncoder


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
    """A validated request: its prompt (images encoded), its stop conditions, when it started."""

    request: GenerateRequest
    prompt: PromptInputs
    prompt_tokens: int
    stop: StopChecker
    image_cache_hits: int
    started: float


class Engine:
    """Serves requests over any Verifier / Drafter / ImageEncoder: in-process objects or gRPC clients."""

    def __init__(self, facts: ModelFacts, prompts: PromptBuilder, verifier: Verifier | None,
                 drafter: Drafter | None = None, encoder: ImageEncoder | None = None,
                 loop_host: LoopHost | None = None):
        """`loop_host`: runs each request's loop elsewhere (the verify service); else it runs here
        over `verifier` and `drafter`."""
        self.facts = facts
        self.prompts = prompts
        self.verifier = verifier
        self.drafter = drafter
        self.encoder = encoder
        self.loop_host = loop_host
        self.target: VisionLanguageModel | None = None  # set when the target runs in this process

    @classmethod
    def from_pretrained(cls, target_dir: str | Path, drafter: Drafter | None = None) -> Engine:
        """Everything in this process: the target is the verifier; images go through a local LRU cache."""
        target = VisionLanguageModel.from_pretrained(target_dir)
        encoder = None
        if target.is_multimodal:
            processor = AutoImageProcessor.from_pretrained(target_dir, local_files_only=True)
            encoder = LocalImageEncoder(target, processor, LocalLRUCache(CacheSettings()))
        prompts = PromptBuilder.from_pretrained(target_dir, target.facts)
        engine = cls(target.facts, prompts, InProcessVerifier(target), drafter, encoder)
        engine.target = target
        return engine

    def prepare(self, request: GenerateRequest) -> PreparedRequest:
        """Tokenize, validate and encode the images (through the cache) of a request."""
        started = time.perf_counter()
        token_ids = self.prompts.tokenize(request.prompt, len(request.images))
        prompt_tokens = len(self.facts.expand_image_tokens(token_ids))
        if prompt_tokens + request.sampling.max_new_tokens > self.facts.max_positions:
            raise InvalidArgument(
                "sampling.max_new_tokens",
                f"prompt ({prompt_tokens} tokens) + max_new_tokens ({request.sampling.max_new_tokens}) exceeds "
                f"the target's context of {self.facts.max_positions} tokens",
            )
        if request.images and self.encoder is None:
            raise Unavailable("images: no vision encoder is configured")
        encoded = self.encoder.encode(request.images) if request.images else []
        stop = StopChecker(
            request.sampling.max_new_tokens, self.facts.eos_token_ids, request.sampling.stop, self.prompts.decode
        )
        hits = sum(image.cache_hit for image in encoded)
        return PreparedRequest(request, prompt_inputs(token_ids, encoded), prompt_tokens, stop, hits, started)

    def stream(self, prepared: PreparedRequest, each_round: bool = True) -> ChunkStream:
        """Yield the request's chunks as the loop settles them (without `each_round` a loop run
        elsewhere may send them all at the end: a unary call reads none before)."""
        request = prepared.request
        if self.loop_host is not None:
            return self.loop_host.stream(prepared.prompt, request.sampling, request.speculation, prepared.started,
                                         each_round)
        return ChunkStream(speculate(prepared.prompt, request.sampling, request.speculation, self.verifier,
                                     self.drafter, prepared.stop, prepared.started))

    def generate(self, request: GenerateRequest) -> GenerationResult:
        prepared = self.prepare(request)
        token_ids: list[int] = []
        for chunk in self.stream(prepared, each_round=False):
            token_ids.extend(chunk.token_ids)
        text = prepared.stop.visible_text(self.prompts.decode(token_ids), chunk.finish)
        return GenerationResult(text, tuple(token_ids), chunk.finish, prepared.prompt_tokens, chunk.stats)
