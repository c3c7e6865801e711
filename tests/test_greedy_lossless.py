"""Greedy losslessness: token ids equal the target's own generate(do_sample=False), always.

Grid: multimodal target with and without an image, text-only target; draft lengths 1..8; the
n-gram drafter, an independent small VLM drafter, the target as its own drafter (everything is
accepted) and scripted drafters that get the first, a middle or the last draft token wrong.
"""

from __future__ import annotations

import pytest

from conftest import ScriptedDrafter, build_prompt, hf_greedy, png_bytes
from draft_service.ngram import NgramDrafter
from draft_service.vlm_drafter import VlmDrafter
from orchestrator.loop import speculate
from orchestrator.stopping import FinishReason, StopChecker
from speculum.config import SamplingParams, SpeculationParams

MAX_NEW = 28
CASES = {
    "llava-image": ("llava_engine", "Describe the image in detail.", [png_bytes(1)]),
    "llava-text": ("llava_engine", "Tell me a story about lists.", []),
    "llama-text": ("llama_engine", "Explain how dict works.", []),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    engine_name, text, images = CASES[request.param]
    engine = request.getfixturevalue(engine_name)
    prompt = build_prompt(engine, text, images)
    reference = hf_greedy(engine.target, prompt, MAX_NEW)
    drafter_model = request.getfixturevalue(
        "small_llava_drafter_model" if engine.target.is_multimodal else "small_llama_drafter_model"
    )
    return engine, prompt, reference, drafter_model


def run(engine, prompt, drafter, k, max_new=MAX_NEW, eos=None):
    stop = StopChecker(max_new, engine.target.eos_token_ids if eos is None else frozenset({eos}))
    sampling = SamplingParams(max_new_tokens=max_new)
    chunks = list(speculate(prompt, sampling, SpeculationParams(num_draft_tokens=k), engine.verifier, drafter, stop))
    tokens = [t for chunk in chunks for t in chunk.token_ids]
    return tokens, chunks[-1]


@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("drafter_kind", ["ngram", "small-vlm", "self"])
def test_greedy_equals_target_alone(case, drafter_kind, k):
    engine, prompt, reference, drafter_model = case
    drafter = {
        "ngram": lambda: NgramDrafter(),
        "small-vlm": lambda: VlmDrafter(drafter_model),
        "self": lambda: VlmDrafter(engine.target),
    }[drafter_kind]()
    tokens, last = run(engine, prompt, drafter, k)
    assert tokens == reference
    stats = last.stats
    assert stats.emitted_tokens == len(tokens) - 1
    if drafter_kind == "self":  # the target drafting for itself: every draft accepted
        assert stats.accepted_tokens == stats.draft_tokens
        assert stats.target_forwards == -(-(len(tokens) - 1) // (k + 1))


@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("wrong_at", [0, "middle", "last"])
def test_rejection_at_each_block_position(case, k, wrong_at):
    engine, prompt, reference, _ = case
    index = {0: 0, "middle": k // 2, "last": k - 1}[wrong_at]
    drafter = ScriptedDrafter(reference, index, engine.target.vocab_size)
    tokens, last = run(engine, prompt, drafter, k)
    assert tokens == reference
    # every full block is rejected exactly at `index`
    assert last.stats.accepted_tokens <= index * last.stats.target_forwards


def test_speculation_disabled_and_no_drafter_are_plain_decoding(case):
    engine, prompt, reference, _ = case
    tokens, last = run(engine, prompt, None, 4)
    assert tokens == reference
    assert last.stats.target_forwards == len(tokens) - 1 and last.stats.mean_accepted_length == 1.0


def test_eos_inside_an_accepted_block(case):
    engine, prompt, reference, _ = case
    eos = reference[10]
    expected = hf_greedy(engine.target, prompt, MAX_NEW, eos=eos)
    assert expected == reference[: reference.index(eos) + 1]
    tokens, last = run(engine, prompt, ScriptedDrafter(reference, None, engine.target.vocab_size), 8, eos=eos)
    assert tokens == expected and last.finish is FinishReason.EOS


@pytest.mark.parametrize("max_new", [1, 2, 5, 11])
def test_max_new_tokens_reached_inside_a_block(case, max_new):
    engine, prompt, reference, _ = case
    drafter = ScriptedDrafter(reference, None, engine.target.vocab_size)
    tokens, last = run(engine, prompt, drafter, 8, max_new=max_new)
    assert tokens == reference[:max_new] and last.finish is FinishReason.LENGTH
