"""Image-prefix KV reuse: a second prompt about the same image skips the image's prefill rows and
decodes exactly what a full prefill decodes; other images, prompt starts and budgets behave."""

from __future__ import annotations

import pytest
import torch

from conftest import build_prompt, hf_greedy, png_bytes
from orchestrator.engine import GenerateRequest
from speculum.config import SamplingParams, SpeculationParams
from speculum.prefix_cache import PrefixCache, image_prefix_length, prefix_key
from speculum.records import DraftBlock
from verify_service.target import InProcessVerifier, TargetSession

SAMPLING = SamplingParams(max_new_tokens=10, seed=0)


def test_image_prefix_ends_after_the_last_image_token():
    assert image_prefix_length([5, 9, 9, 9, 6, 7], image_token_id=9) == 4
    assert image_prefix_length([9, 9, 5, 9, 9, 6], image_token_id=9) == 5
    assert image_prefix_length([5, 6, 7], image_token_id=9) == 0  # no image: nothing to reuse
    assert image_prefix_length([5, 9, 9], image_token_id=9) == 0  # nothing after it to prefill
    assert image_prefix_length([5, 9, 6], image_token_id=None) == 0  # text-only target


def test_second_prefill_reuses_the_image_rows_and_matches_a_full_prefill(llava_engine):
    target = llava_engine.target
    prompt = build_prompt(llava_engine, "What is in the picture?", [png_bytes(3)])
    prefixes = PrefixCache()
    full = TargetSession(target, SAMPLING)  # no cache: the reference
    first = TargetSession(target, SAMPLING, prefixes)
    second = TargetSession(target, SAMPLING, prefixes)

    reference, cold, warm = (session.prefill(prompt) for session in (full, first, second))
    expected_rows = image_prefix_length(target.expand_image_tokens(prompt.token_ids), target.image_token_id)
    assert expected_rows > 0
    assert (first.reused_prefix, second.reused_prefix) == (0, expected_rows)
    assert prefixes.stats.hits == 1 and prefixes.stats.misses == 1 and len(prefixes) == 1
    assert cold.tokens == warm.tokens == reference.tokens
    # the drafter's features and the KV rows are the full prefill's
    torch.testing.assert_close(warm.hidden, reference.hidden, atol=1e-5, rtol=1e-4)
    for a, b in zip(full.cache.layers, second.cache.layers, strict=True):
        torch.testing.assert_close(b.keys, a.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b.values, a.values, atol=1e-5, rtol=1e-4)
    # and decoding goes on exactly as the target alone
    oracle = hf_greedy(target, prompt, 6)
    assert second.verify(DraftBlock(tuple(oracle[1:5]))).tokens == tuple(oracle[1:6])


def test_a_session_writing_its_cache_does_not_change_the_stored_rows(llava_engine):
    target = llava_engine.target
    prompt = build_prompt(llava_engine, "Describe it.", [png_bytes(4)])
    prefixes = PrefixCache()
    TargetSession(target, SAMPLING, prefixes).prefill(prompt)
    stored = next(iter(prefixes._entries.values()))
    before = [t.clone() for t in (*stored.keys, *stored.values)]
    user = TargetSession(target, SAMPLING, prefixes)
    user.prefill(prompt)
    user.verify(DraftBlock((3, 4, 5)))  # appends, rolls back and writes rows in place
    for old, now in zip(before, (*stored.keys, *stored.values), strict=True):
        assert torch.equal(old, now)


def test_other_images_and_prompt_starts_do_not_match(llava_engine):
    target = llava_engine.target
    prefixes = PrefixCache()
    for image in (png_bytes(5), png_bytes(6)):
        session = TargetSession(target, SAMPLING, prefixes)
        session.prefill(build_prompt(llava_engine, "What is in the picture?", [image]))
        assert session.reused_prefix == 0
    # same image, different text after it: the image rows are reused
    session = TargetSession(target, SAMPLING, prefixes)
    session.prefill(build_prompt(llava_engine, "Count the shapes.", [png_bytes(5)]))
    assert session.reused_prefix > 0
    # text-only prompts never touch the cache
    TargetSession(target, SAMPLING, prefixes).prefill(build_prompt(llava_engine, "Hello there."))
    assert prefixes.stats.hits == 1 and prefixes.stats.misses == 2


def test_key_covers_every_bit_of_the_prefix():
    embeds = torch.randn(1, 5, 8)
    nudged = embeds.clone()
    nudged[0, 2, 3] = torch.nextafter(nudged[0, 2, 3], torch.tensor(1e9))
    assert prefix_key(embeds) == prefix_key(embeds.clone())
    assert prefix_key(embeds) != prefix_key(nudged)
    assert prefix_key(embeds) != prefix_key(embeds.half())


def test_budget_evicts_least_recently_used_and_zero_turns_reuse_off(llava_engine):
    target = llava_engine.target
    prompts = [build_prompt(llava_engine, "What is in the picture?", [png_bytes(10 + i)]) for i in range(3)]
    sizing = PrefixCache()
    TargetSession(target, SAMPLING, sizing).prefill(prompts[0])
    entry_bytes = next(iter(sizing._entries.values())).nbytes

    prefixes = PrefixCache(max_bytes=2 * entry_bytes)
    for prompt in (prompts[0], prompts[1], prompts[0], prompts[2]):  # prompts[1] is then the oldest
        TargetSession(target, SAMPLING, prefixes).prefill(prompt)
    assert len(prefixes) == 2 and prefixes.stats.evictions == 1
    TargetSession(target, SAMPLING, prefixes).prefill(prompts[0])
    assert prefixes.stats.hits == 2
    session = TargetSession(target, SAMPLING, prefixes)
    session.prefill(prompts[1])
    assert session.reused_prefix == 0

    off = PrefixCache(max_bytes=0)
    for _ in range(2):
        session = TargetSession(target, SAMPLING, off)
        session.prefill(prompts[0])
        assert session.reused_prefix == 0
    assert len(off) == 0
    with pytest.raises(ValueError):
        PrefixCache(max_bytes=-1)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_engine_output_is_the_same_with_and_without_reuse(llava_engine, temperature):
    """Greedy and seeded sampling: a request repeated on a warm prefix cache gives the same tokens
    as on a cold one and as with reuse off."""
    image = png_bytes(21)
    request = GenerateRequest("What is in the picture?", [image],
                              SamplingParams(max_new_tokens=12, temperature=temperature, seed=5),
                              SpeculationParams(enabled=False))
    verifier = llava_engine.verifier
    assert isinstance(verifier, InProcessVerifier)
    saved = verifier.prefixes
    try:
        verifier.prefixes = PrefixCache(max_bytes=0)
        plain = llava_engine.generate(request).token_ids
        verifier.prefixes = PrefixCache()
        cold = llava_engine.generate(request).token_ids
        warm = llava_engine.generate(request).token_ids
        assert verifier.prefixes.stats.hits == 1
    finally:
        verifier.prefixes = saved
    assert plain == cold == warm and plain
