"""The decoding methods the drafting benchmark compares: ours through the engine, HF's through generate().

Every method answers the same prepared request (the engine's own prompt ids and pixel values, so
HF sees exactly the tokens our target sees) and reports its tokens, wall time and τ. Methods
that cannot run a request raise MethodFailed with the library's own message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from orchestrator.engine import Engine, GenerateRequest
from speculum.config import SpeculationParams


class MethodFailed(Exception):
    """The method does not work on this request (reported in the table instead of a number)."""


@dataclass(frozen=True)
class Outcome:
    token_ids: tuple[int, ...]  # without a trailing end-of-sequence token
    seconds: float  # wall time of the whole request (prompt, images, decoding)
    tau: float | None  # tokens per target forward, when the method exposes it


class EngineMethod:
    """Speculum's in-process engine with a given drafter (None: the target alone); `adaptive`: K per
    round up to num_draft_tokens (speculation.adaptive), else num_draft_tokens every round."""

    def __init__(self, name: str, engine: Engine, drafter, num_draft_tokens: int, adaptive: bool = False):
        self.name = name
        self.engine = engine
        self.drafter = drafter
        self.num_draft_tokens = num_draft_tokens
        self.adaptive = adaptive

    def run(self, request: GenerateRequest) -> Outcome:
        self.engine.drafter = self.drafter
        speculation = SpeculationParams(enabled=self.drafter is not None, num_draft_tokens=self.num_draft_tokens,
                                        adaptive=self.adaptive)
        request = GenerateRequest(request.prompt, request.images, request.sampling, speculation)
        started = time.perf_counter()
        result = self.engine.generate(request)
        seconds = time.perf_counter() - started
        tokens = _strip_eos(result.token_ids, self.engine.target.eos_token_ids)
        return Outcome(tokens, seconds, result.stats.mean_accepted_length if self.drafter is not None else 1.0)


class HfMethod:
    """transformers' generate() on the same LLaVA weights: plain, assisted, or prompt lookup."""

    def __init__(self, name: str, engine: Engine, model, **generate_kwargs):
        self.name = name
        self.engine = engine
        self.model = model.eval()
        self.generate_kwargs = generate_kwargs

    @torch.inference_mode()
    def run(self, request: GenerateRequest) -> Outcome:
        started = time.perf_counter()
        prompt = self.engine.prepare(request).prompt
        ids = torch.tensor([self.engine.target.expand_image_tokens(prompt.token_ids)])
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if prompt.pixel_values is not None:
            inputs["pixel_values"] = prompt.pixel_values
        sampling = request.sampling
        options = {"do_sample": False} if sampling.greedy else {
            "do_sample": True, "temperature": sampling.temperature, "top_k": sampling.top_k or None,
            "top_p": sampling.top_p}
        try:
            out = self.model.generate(**inputs, max_new_tokens=sampling.max_new_tokens, **options,
                                      **self.generate_kwargs)
        except (ValueError, RuntimeError) as exc:
            raise MethodFailed(f"{type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - started
        tokens = _strip_eos(tuple(out[0, ids.shape[1]:].tolist()), self.engine.target.eos_token_ids)
        return Outcome(tokens, seconds, None)


def _strip_eos(tokens: tuple[int, ...], eos: frozenset[int]) -> tuple[int, ...]:
    return tokens[:-1] if tokens and tokens[-1] in eos else tokens
