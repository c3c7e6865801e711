"""Bad requests get a clear InvalidArgument naming the offending field; nothing is half-done."""

from __future__ import annotations

import pytest

from conftest import png_bytes
from orchestrator.engine import GenerateRequest
from speculum.config import SamplingParams, SpeculationParams
from speculum.errors import InvalidArgument


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_new_tokens": 0}, "sampling.max_new_tokens"),
        ({"max_new_tokens": 10**9}, "sampling.max_new_tokens"),
        ({"temperature": -0.1}, "sampling.temperature"),
        ({"temperature": float("nan")}, "sampling.temperature"),
        ({"top_p": 0.0}, "sampling.top_p"),
        ({"top_p": 1.5}, "sampling.top_p"),
        ({"top_k": -1}, "sampling.top_k"),
        ({"seed": -3}, "sampling.seed"),
        ({"stop": ("",)}, "sampling.stop"),
    ],
)
def test_sampling_values_are_validated(kwargs, field):
    with pytest.raises(InvalidArgument) as caught:
        SamplingParams(**kwargs)
    assert caught.value.field == field and field in str(caught.value)


@pytest.mark.parametrize("num_draft_tokens", [0, 33])
def test_draft_length_is_validated(num_draft_tokens):
    with pytest.raises(InvalidArgument, match="speculation.num_draft_tokens"):
        SpeculationParams(num_draft_tokens=num_draft_tokens)


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt(llava_engine, prompt):
    with pytest.raises(InvalidArgument, match="^prompt: must not be empty"):
        llava_engine.generate(GenerateRequest(prompt))


def test_image_for_a_text_only_target(llama_engine):
    with pytest.raises(InvalidArgument, match="^images: .*text-only"):
        llama_engine.generate(GenerateRequest("What is this?", [png_bytes(0)]))


@pytest.mark.parametrize("payload", [b"", b"not an image", png_bytes(0)[:40]])
def test_undecodable_image(llava_engine, payload):
    with pytest.raises(InvalidArgument, match=r"^images\[1\]: "):
        llava_engine.generate(GenerateRequest("What is this?", [png_bytes(0), payload]))


def test_prompt_plus_max_new_tokens_beyond_the_context(llava_engine):
    context = llava_engine.target.max_positions
    with pytest.raises(InvalidArgument, match="sampling.max_new_tokens.*context"):
        llava_engine.generate(GenerateRequest("Hello", sampling=SamplingParams(max_new_tokens=context)))


def test_prompt_cannot_smuggle_image_placeholders(llava_engine):
    with pytest.raises(InvalidArgument, match="^prompt: "):
        llava_engine.generate(GenerateRequest("look: <image>", [png_bytes(0)]))


def test_engine_still_serves_after_bad_requests(llava_engine):
    result = llava_engine.generate(GenerateRequest("Hello", sampling=SamplingParams(max_new_tokens=5)))
    assert len(result.token_ids) == 5
