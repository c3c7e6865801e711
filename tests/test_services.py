"""The verify and draft services over real gRPC (port 0): the loop through them is lossless.

Also: sessions are released on every exit path, a dead drafter only costs speed, health and
reflection answer, and session limits give RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import build_prompt, hf_greedy, png_bytes
from draft_service import server as draft_server
from draft_service.ngram import NgramDrafter
from draft_service.vlm_drafter import VlmDrafter
from orchestrator.clients import GrpcDrafter, GrpcVerifier
from orchestrator.loop import speculate
from orchestrator.stopping import StopChecker
from speculum.config import SamplingParams, SpeculationParams
from speculum.errors import ResourceExhausted
from speculum.records import VerifyResult
from speculum.rejection import NextTokenKind
from speculum.rpc import convert
from speculum.rpc.settings import ServerSettings, SessionSettings
from speculum.v1 import drafter_pb2, drafter_pb2_grpc, session_pb2
from verify_service import server as verify_server

SETTINGS = ServerSettings(port=0, max_workers=4)


@pytest.fixture(scope="module")
def verifier_server(llava_engine):
    running = verify_server.serve(llava_engine.target, SETTINGS, SessionSettings(ttl_s=60, max_sessions=4))
    yield running
    running.stop()


@pytest.fixture(scope="module", params=["ngram", "small-vlm"])
def drafter_server(request, small_llava_drafter_model):
    drafter = NgramDrafter() if request.param == "ngram" else VlmDrafter(small_llava_drafter_model)
    running = draft_server.serve(drafter, SETTINGS, SessionSettings(ttl_s=60, max_sessions=4))
    yield running
    running.stop()


def channel(running) -> grpc.Channel:
    return grpc.insecure_channel(running.address, options=SETTINGS.channel_options())


def run(prompt, verifier, drafter, max_new=32, k=4, temperature=0.0, seed=None):
    sampling = SamplingParams(max_new_tokens=max_new, temperature=temperature, seed=seed)
    chunks = list(speculate(prompt, sampling, SpeculationParams(num_draft_tokens=k), verifier, drafter,
                            StopChecker(max_new, frozenset())))
    return [t for c in chunks for t in c.token_ids], chunks[-1].stats


@pytest.mark.parametrize("with_image", [True, False])
def test_greedy_through_the_services_equals_the_target(llava_engine, verifier_server, drafter_server, with_image):
    prompt = build_prompt(llava_engine, "Describe the image in detail.", [png_bytes(2)] if with_image else [])
    tokens, stats = run(prompt, GrpcVerifier(channel(verifier_server)), GrpcDrafter(channel(drafter_server)))
    assert tokens == hf_greedy(llava_engine.target, prompt, 32)
    assert stats.draft_tokens > 0
    assert len(verifier_server.servicer.sessions) == 0 and len(drafter_server.servicer.sessions) == 0


def test_repeated_image_reuses_the_verifiers_prefix_rows(llava_engine, verifier_server, drafter_server):
    """The second prompt about an image prefills only the text after it; output is unchanged."""
    image = png_bytes(31)
    before = verifier_server.servicer.prefixes.stats
    outputs = []
    for text in ("Describe the image in detail.", "What is in the picture?"):
        prompt = build_prompt(llava_engine, text, [image])
        tokens, _ = run(prompt, GrpcVerifier(channel(verifier_server)), GrpcDrafter(channel(drafter_server)))
        assert tokens == hf_greedy(llava_engine.target, prompt, 32)
        outputs.append(tokens)
    after = verifier_server.servicer.prefixes.stats
    assert after.hits - before.hits >= 1  # the first run may already hit (the module's other drafter)
    assert after.reused_tokens > before.reused_tokens


def test_a_draft_round_is_one_message_holding_what_draft_streams_in_pieces(llava_engine, drafter_server):
    """DraftRounds sends a round's block whole, with end_of_round (the loop verifies it whole; each
    message costs a wake-up); `Draft` streams the same block in pieces."""
    prompt = build_prompt(llava_engine, "Describe the image in detail.", [png_bytes(2)])
    stub = drafter_pb2_grpc.DrafterStub(channel(drafter_server))
    first = VerifyResult(0, (hf_greedy(llava_engine.target, prompt, 1)[0],), NextTokenKind.BONUS)
    for k in (4, 2):
        blocks = {}
        for rpc in ("rounds", "draft"):
            session = f"{rpc}-{k}"
            stub.Prefill(drafter_pb2.DrafterPrefillRequest(
                session_id=session, prompt=convert.prompt_to_proto(prompt),
                sampling=convert.session_sampling_to_proto(SamplingParams(max_new_tokens=32, seed=0)),
                first=convert.result_to_proto(first, with_hidden=False)))
            request = drafter_pb2.DraftRequest(session_id=session, max_tokens=k)
            try:
                if rpc == "rounds":
                    pieces = list(stub.DraftRounds(iter([request]), timeout=30))
                    assert len(pieces) == 1 and pieces[0].end_of_round
                    blocks[rpc] = tuple(pieces[0].block.tokens)
                    # a bare marker only when the drafter drafted nothing
                    assert pieces[0].HasField("block") == bool(blocks[rpc])
                else:
                    blocks[rpc] = tuple(t for piece in stub.Draft(request, timeout=30) for t in piece.tokens)
            finally:
                stub.Release(session_pb2.ReleaseRequest(session_id=session))
        assert blocks["rounds"] == blocks["draft"] and len(blocks["rounds"]) <= k


def test_a_round_redrafted_without_advance_is_the_same_round(llava_engine, small_llava_drafter_model):
    """Proposing again before any advance (a client that dropped a round) redoes that round instead of
    failing on an empty feed; advancing afterwards still keeps the cache consistent."""
    prompt = build_prompt(llava_engine, "Describe the image in detail.", [png_bytes(2)])
    oracle = hf_greedy(small_llava_drafter_model, prompt, 9)
    session = VlmDrafter(small_llava_drafter_model).open(SamplingParams(max_new_tokens=16, seed=0))
    session.prefill(prompt, VerifyResult(0, (oracle[0],), NextTokenKind.BONUS))
    first = [t for block in session.propose(4) for t in block.tokens]
    again = [t for block in session.propose(4) for t in block.tokens]
    assert first == again == oracle[1:5]
    session.advance(VerifyResult(4, (*oracle[1:5], oracle[5]), NextTokenKind.BONUS))
    assert [t for block in session.propose(3) for t in block.tokens] == oracle[6:9]


def test_sampling_through_the_services_equals_in_process(llava_engine, verifier_server, drafter_server):
    prompt = build_prompt(llava_engine, "Say something.", [])
    remote, _ = run(prompt, GrpcVerifier(channel(verifier_server)), GrpcDrafter(channel(drafter_server)),
                    temperature=0.8, seed=5)
    local, _ = run(prompt, llava_engine.verifier, drafter_server.servicer.drafter, temperature=0.8, seed=5)
    assert remote == local


def test_abandoned_stream_releases_both_sessions(llava_engine, verifier_server, drafter_server):
    prompt = build_prompt(llava_engine, "Count to ten.", [])
    sampling = SamplingParams(max_new_tokens=30)
    stream = speculate(prompt, sampling, SpeculationParams(), GrpcVerifier(channel(verifier_server)),
                       GrpcDrafter(channel(drafter_server)), StopChecker(30, frozenset()))
    next(stream), next(stream)
    assert len(verifier_server.servicer.sessions) == 1 and len(drafter_server.servicer.sessions) == 1
    stream.close()  # the client went away
    assert len(verifier_server.servicer.sessions) == 0 and len(drafter_server.servicer.sessions) == 0


def test_unreachable_drafter_only_costs_speed(llava_engine, verifier_server):
    dead = grpc.insecure_channel("127.0.0.1:1")
    prompt = build_prompt(llava_engine, "Describe the image.", [png_bytes(5)])
    tokens, stats = run(prompt, GrpcVerifier(channel(verifier_server)), GrpcDrafter(dead, timeout_s=0.5))
    assert tokens == hf_greedy(llava_engine.target, prompt, 32)
    assert stats.draft_tokens == 0 and stats.target_forwards == 31


def test_drafter_stopped_mid_request(llava_engine, verifier_server, small_llava_drafter_model):
    running = draft_server.serve(VlmDrafter(small_llava_drafter_model), SETTINGS, SessionSettings())
    prompt = build_prompt(llava_engine, "Describe the image.", [png_bytes(6)])
    stream = speculate(prompt, SamplingParams(max_new_tokens=32), SpeculationParams(),
                       GrpcVerifier(channel(verifier_server)), GrpcDrafter(channel(running), timeout_s=2),
                       StopChecker(32, frozenset()))
    tokens = list(next(stream).token_ids) + list(next(stream).token_ids)
    running.stop()
    tokens += [t for chunk in stream for t in chunk.token_ids]
    assert tokens == hf_greedy(llava_engine.target, prompt, 32)


def test_verifier_session_limit_is_resource_exhausted(llava_engine, verifier_server):
    verifier = GrpcVerifier(channel(verifier_server))
    prompt = build_prompt(llava_engine, "Hi", [])
    sessions = [verifier.open(SamplingParams(seed=1)) for _ in range(5)]
    try:
        for session in sessions[:4]:
            session.prefill(prompt)
        with pytest.raises(ResourceExhausted):
            sessions[4].prefill(prompt)
    finally:
        for session in sessions:
            session.close()
    assert len(verifier_server.servicer.sessions) == 0


@pytest.mark.parametrize("service", ["speculum.v1.Verifier", "speculum.v1.Drafter"])
def test_health_and_reflection(verifier_server, drafter_server, service):
    running = verifier_server if service.endswith("Verifier") else drafter_server
    health = health_pb2_grpc.HealthStub(channel(running))
    assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel(running))
    answer = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert service in {s.name for s in answer.list_services_response.service}


def test_beyond_the_rpc_limit_calls_fail_fast(llava_engine, monkeypatch):
    """An overloaded service answers RESOURCE_EXHAUSTED at once instead of queueing without bound."""
    import threading
    import time

    from verify_service.target import TargetSession

    original = TargetSession.prefill
    monkeypatch.setattr(TargetSession, "prefill", lambda self, prompt: time.sleep(1.0) or original(self, prompt))
    running = verify_server.serve(llava_engine.target, ServerSettings(port=0, max_workers=2, max_concurrent_rpcs=1),
                                  SessionSettings())
    try:
        prompt = build_prompt(llava_engine, "Hi")
        verifier = GrpcVerifier(channel(running))
        busy = threading.Thread(target=lambda: verifier.open(SamplingParams(seed=1)).prefill(prompt))
        busy.start()
        time.sleep(0.3)
        started = time.monotonic()
        with pytest.raises(ResourceExhausted):
            verifier.open(SamplingParams(seed=2)).prefill(prompt)
        assert time.monotonic() - started < 0.5
        busy.join()
    finally:
        running.stop()
