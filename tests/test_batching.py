"""Batched verification: one target pass for several sessions gives each exactly its own result.

verify_batch against one-by-one verification (chains and trees, greedy and sampling, prompts of
different lengths, so caches are padded), then concurrent requests through a real verify service
with a batch window: outputs equal the target alone's, and passes really held several sessions.
"""

from __future__ import annotations

import grpc
import pytest
import torch

from conftest import assert_concurrent_requests_lossless, build_prompt, hf_greedy, png_bytes
from draft_service.ngram import NgramDrafter
from orchestrator.clients import GrpcVerifier
from speculum import batched_pass
from speculum.config import SamplingParams
from speculum.records import DraftBlock
from speculum.rpc.settings import BatchSettings, ServerSettings, SessionSettings
from verify_service import server as verify_server
from verify_service.target import TargetSession, verify_batch

PROMPTS = [("Describe the image in detail.", True), ("Hi", False), ("Tell me a long story about lists and maps.", False)]


def sessions_and_blocks(engine, temperature: float):
    target = engine.target
    sessions, blocks = [], []
    for i, (text, with_image) in enumerate(PROMPTS):
        prompt = build_prompt(engine, text, [png_bytes(i)] if with_image else [])
        reference = hf_greedy(target, prompt, 8)
        session = TargetSession(target, SamplingParams(max_new_tokens=8, temperature=temperature, seed=i))
        session.prefill(prompt)
        wrong = (reference[3] + 1) % target.vocab_size
        if i == 1:  # a tree: the right branch second
            block = DraftBlock((wrong, reference[1], reference[2]), parents=(-1, -1, 1))
        elif i == 0:  # a chain rejected at its third token
            block = DraftBlock((reference[1], reference[2], wrong, reference[4]))
        else:  # a chain rejected at once
            block = DraftBlock(((reference[1] + 1) % target.vocab_size,))
        sessions.append(session)
        blocks.append(block)
    return sessions, blocks


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("pass_kind", ["per-session attention", "padded"])
def test_a_batched_pass_equals_one_by_one(llava_engine, temperature, pass_kind, monkeypatch):
    if pass_kind == "padded":  # the pass a decoder other than LLaMA's takes
        monkeypatch.setattr(batched_pass, "fits", lambda decoder: False)
    alone_sessions, blocks = sessions_and_blocks(llava_engine, temperature)
    batched_sessions, _ = sessions_and_blocks(llava_engine, temperature)
    alone = [s.verify(b) for s, b in zip(alone_sessions, blocks)]
    batched = verify_batch(batched_sessions, blocks)
    for one, many in zip(alone, batched):
        assert (one.tokens, one.num_accepted, one.next_kind) == (many.tokens, many.num_accepted, many.next_kind)
        torch.testing.assert_close(one.hidden, many.hidden, atol=1e-4, rtol=1e-4)
    if temperature == 0.0:
        assert [r.num_accepted for r in batched] == [2, 2, 0]
    for a, b in zip(alone_sessions, batched_sessions):  # the caches kept exactly the same rows
        assert a.cache_length == b.cache_length
        for la, lb in zip(a.cache.layers, b.cache.layers):
            torch.testing.assert_close(la.keys, lb.keys, atol=1e-4, rtol=1e-4)
    # and they keep decoding identically
    assert [s.verify(DraftBlock(())).tokens for s in alone_sessions] == \
        [r.tokens for r in verify_batch(batched_sessions, [DraftBlock(())] * 3)]


def test_concurrent_requests_share_passes_and_stay_lossless(llava_engine):
    running = verify_server.serve(llava_engine.target, ServerSettings(port=0, max_workers=16),
                                  SessionSettings(ttl_s=60, max_sessions=16), BatchSettings(window_s=0.01, max_batch=8))
    try:
        verifier = GrpcVerifier(grpc.insecure_channel(running.address))
        assert_concurrent_requests_lossless(llava_engine, verifier, NgramDrafter(), draft_length=3)
        stats = running.servicer.batcher.stats
        assert stats.largest > 1 and stats.items > stats.passes, stats
        assert len(running.servicer.sessions) == 0
    finally:
        running.stop()
