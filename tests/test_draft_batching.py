"""Batched drafting: many feature-draft sessions' rounds in one drafter pass per step.

The batched layer against one session at a time (caches of different lengths), whole rounds through
`draft_many` against `propose` (greedy and sampled, with advances, rejections and assumed tokens),
and concurrent requests through a real draft service with a batch window: outputs equal the
target's, and passes really held several sessions.
"""

from __future__ import annotations

import copy

import grpc
import pytest
import torch

from conftest import assert_concurrent_requests_lossless, build_prompt, png_bytes
from draft_service import server as draft_server
from draft_service.feature.checkpoint import new_model
from draft_service.feature.drafter import FeatureDrafter
from draft_service.feature.many import Round, draft_many
from draft_service.feature.session import run_plan
from draft_service.feature.target_parts import load_target_parts, target_ref
from orchestrator.clients import GrpcDrafter
from speculum.config import SamplingParams
from speculum.metrics import batch_collector
from speculum.records import join_pieces
from speculum.rpc.settings import BatchSettings, ServerSettings, SessionSettings
from verify_service.target import TargetSession

SMALL = dict(num_heads=4, num_kv_heads=2, intermediate_size=128, num_latents=4, semi_ar_hidden=64)
PROMPTS = [("Describe the image in detail.", 1), ("Hi", None), ("Tell me a long story about lists and maps.", None),
           ("What is in this picture?", 2)]


@pytest.fixture(scope="module")
def drafter(llava_dir, llava_engine) -> FeatureDrafter:
    model = new_model(target_ref(llava_dir), load_target_parts(llava_dir), seed=5, decouple_visual=True,
                      compress_visual=True, semi_ar_k=3, **SMALL)
    return FeatureDrafter(model, llava_engine.target.facts)


def test_forward_many_equals_one_session_at_a_time(drafter):
    model = drafter.model
    generator = torch.Generator().manual_seed(0)
    caches, rows = [], []
    with torch.inference_mode():
        for cached, new in [(30, 3), (5, 1), (70, 5), (0, 2)]:
            cache = model.new_cache()
            if cached:
                model(torch.randn(1, cached, model.config.hidden_size, generator=generator), cache)
            caches.append(cache)
            rows.append(torch.randn(new, model.config.hidden_size, generator=generator))
        twins = [copy.deepcopy(c) for c in caches]
        alone = [model(x[None], c, last_only=True)[0] for x, c in zip(rows, twins)]
        together = model.forward_many(rows, caches)
    assert together.shape == (4, model.config.semi_ar_k, model.config.hidden_size)
    for i, (one, twin, cache) in enumerate(zip(alone, twins, caches)):
        torch.testing.assert_close(together[i], one, atol=1e-5, rtol=1e-5)
        assert cache.length == twin.length, i
        torch.testing.assert_close(cache.keys, twin.keys, atol=1e-5, rtol=1e-5)


def open_pair(engine, drafter, temperature: float):
    """For each prompt: a target session and two drafter sessions (one driven alone, one batched)."""
    targets, alone, batched = [], [], []
    for i, (text, image) in enumerate(PROMPTS):
        prompt = build_prompt(engine, text, [png_bytes(image)] if image else [])
        sampling = SamplingParams(max_new_tokens=64, temperature=temperature, seed=i)
        target = TargetSession(engine.target, sampling)
        first = target.prefill(prompt)
        for group in (alone, batched):
            session = drafter.open(sampling)
            session.prefill(prompt, first)
            group.append(session)
        targets.append(target)
    return targets, alone, batched


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batched_rounds_equal_rounds_alone(llava_engine, drafter, temperature):
    targets, alone, batched = open_pair(llava_engine, drafter, temperature)
    for round_number in range(6):
        # Varied lengths, and one round drafting ahead of assumed tokens (the pipelined look-ahead).
        lengths = [3, 5, 1, 4][round_number % 4:] + [3, 5, 1, 4][: round_number % 4]
        assume = [(), (), (), ()]
        if round_number == 2:
            assume[0] = (7, 8)
        # (driven alone as plans: `propose` itself drafts a look-ahead as branches, never batched)
        with torch.inference_mode():
            expected = [list(run_plan(s.plan(n, a), s.model, s.cache)) for s, n, a in zip(alone, lengths, assume)]
        got = draft_many(drafter.model, [Round(s, n, a) for s, n, a in zip(batched, lengths, assume)])
        for one, many in zip(expected, got):
            assert not isinstance(many, Exception), many
            assert [b.tokens for b in one] == [b.tokens for b in many]
            if temperature > 0:
                for b1, b2 in zip(one, many):
                    torch.testing.assert_close(b1.draft_probs, b2.draft_probs, atol=1e-5, rtol=1e-5)
        if round_number == 2:
            continue  # a look-ahead is not verified: the next round redrafts, as the orchestrator does
        for target, one, two, blocks in zip(targets, alone, batched, expected):
            result = target.verify(join_pieces(blocks))
            one.advance(result)
            two.advance(result)


def test_a_failing_round_fails_alone(llava_engine, drafter):
    _, _, batched = open_pair(llava_engine, drafter, 0.0)
    batched[1].close()  # its plan raises; the others still get their blocks
    got = draft_many(drafter.model, [Round(s, 4) for s in batched])
    assert isinstance(got[1], Exception)
    assert all(isinstance(g, list) and sum(len(b.tokens) for b in g) == 4 for i, g in enumerate(got) if i != 1)


def test_concurrent_requests_share_drafter_passes_and_stay_lossless(llava_engine, drafter):
    running = draft_server.serve(drafter, ServerSettings(port=0, max_workers=16),
                                 SessionSettings(ttl_s=60, max_sessions=16), BatchSettings(window_s=0.01, max_batch=8))
    try:
        remote = GrpcDrafter(grpc.insecure_channel(running.address), round_deadline_s=30.0)
        assert_concurrent_requests_lossless(llava_engine, llava_engine.verifier, remote, draft_length=4)
        stats = running.servicer.batcher.stats
        assert stats.largest > 1 and stats.items > stats.passes, stats
        exported = {m.name: m.samples[0].value for m in batch_collector(lambda: stats, "draft").collect()}
        assert exported == {"speculum_draft_batch_passes": stats.passes, "speculum_draft_batch_items": stats.items}
        assert len(running.servicer.sessions) == 0
    finally:
        running.stop()
