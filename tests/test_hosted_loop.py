"""The loop run beside the target (`Verifier.Generate`), over real gRPC servers (port 0).

Greedy output equals the target alone for every kind of drafter (features go from the verifier to
the drafter directly); a seeded sample equals the in-process loop's; stop strings and EOS end the
stream; a closed stream releases both sessions; a drafter that dies only costs speed; a verifier
process killed mid-request is resumed on a fresh stream with the same output; round metrics are
counted where the loop runs.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from conftest import ScriptedDrafter, build_prompt, hf_greedy, hosted_verifier, png_bytes, sessions_left_after
from draft_service import server as draft_server
from draft_service.ngram import NgramDrafter
from draft_service.vlm_drafter import VlmDrafter
from orchestrator.clients import connect
from orchestrator.loop import speculate
from orchestrator.prompting import PromptBuilder
from orchestrator.remote_loop import GrpcLoopHost, LoopRequest, loop_request_from_proto, loop_request_to_proto
from orchestrator.stopping import FinishReason, StopChecker
from speculum.config import SamplingParams, SpeculationParams
from speculum.errors import Unavailable
from speculum.launcher import ServiceProcess
from speculum.ports import free_port
from speculum.rpc.settings import ServerSettings, SessionSettings
from test_feature_drafter import drafter_for
from verify_service.target import TargetSession

SETTINGS = ServerSettings(port=0, max_workers=4)
MAX_NEW = 32


@pytest.fixture(scope="module", params=["ngram", "small-vlm", "feature"])
def pair(request, llava_engine, llava_dir, small_llava_drafter_model):
    drafters = {
        "ngram": NgramDrafter,
        "small-vlm": lambda: VlmDrafter(small_llava_drafter_model),
        "feature": lambda: drafter_for(llava_dir, llava_engine, decouple_visual=True, semi_ar_k=3),
    }
    drafter = draft_server.serve(drafters[request.param](), SETTINGS, SessionSettings(max_sessions=4))
    verifier = hosted_verifier(llava_engine, llava_dir, drafter.address)
    yield verifier, drafter
    verifier.stop()
    drafter.stop()


def generate(verifier, prompt, max_new=MAX_NEW, speculation=SpeculationParams(), **sampling):
    host = GrpcLoopHost(connect(verifier.address))
    chunks = list(host.stream(prompt, SamplingParams(max_new_tokens=max_new, **sampling), speculation,
                              time.perf_counter()))
    return [t for c in chunks for t in c.token_ids], chunks[-1]


@pytest.mark.parametrize("with_image", [True, False])
def test_greedy_through_a_hosted_loop_equals_the_target(llava_engine, pair, with_image):
    verifier, drafter = pair
    prompt = build_prompt(llava_engine, "Describe the image in detail.", [png_bytes(3)] if with_image else [])
    tokens, last = generate(verifier, prompt)
    assert tokens == hf_greedy(llava_engine.target, prompt, MAX_NEW)
    assert last.finish is FinishReason.LENGTH and last.stats.draft_tokens > 0
    assert last.stats.emitted_tokens == MAX_NEW - 1  # every token but the prefill's came from a verification
    assert len(verifier.servicer.sessions) == 0 and len(drafter.servicer.sessions) == 0


def test_a_hosted_loop_speculates_with_a_drafter_that_guesses_right(llava_engine, llava_dir):
    prompt = build_prompt(llava_engine, "Tell me about the picture.", [png_bytes(4)])
    reference = hf_greedy(llava_engine.target, prompt, MAX_NEW)
    drafter = draft_server.serve(ScriptedDrafter(reference, None, llava_engine.target.vocab_size), SETTINGS,
                                 SessionSettings())
    verifier = hosted_verifier(llava_engine, llava_dir, drafter.address)
    try:
        for pipelined in (False, True):
            tokens, last = generate(verifier, prompt, speculation=SpeculationParams(pipelined=pipelined))
            assert tokens == reference
            assert last.stats.accepted_tokens == last.stats.draft_tokens > 0
            assert last.stats.target_forwards < MAX_NEW // 3
    finally:
        verifier.stop()
        drafter.stop()


def test_a_seeded_sample_equals_the_in_process_loop(llava_engine, pair):
    verifier, drafter = pair
    prompt = build_prompt(llava_engine, "Say something.", [png_bytes(8)])
    sampling = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.8, seed=11)
    local = speculate(prompt, sampling, SpeculationParams(), llava_engine.verifier, drafter.servicer.drafter,
                      StopChecker(MAX_NEW, llava_engine.target.facts.eos_token_ids))
    tokens, _ = generate(verifier, prompt, temperature=0.8, seed=11)
    assert tokens == [t for c in local for t in c.token_ids]


def test_stop_strings_end_a_hosted_loop(llava_engine, llava_dir, pair):
    verifier, _ = pair
    prompt = build_prompt(llava_engine, "Count.", [])
    full, _ = generate(verifier, prompt)
    decode = PromptBuilder.from_pretrained(llava_dir, llava_engine.target.facts).decode
    text = decode(full)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    if not stop.strip():
        pytest.skip("the random model's text has no usable stop string here")
    tokens, last = generate(verifier, prompt, stop=(stop,))
    assert last.finish is FinishReason.STOP and tokens == full[: len(tokens)] and stop in decode(tokens)
    assert stop not in decode(tokens[:-1])


def test_a_closed_stream_releases_both_sessions(llava_engine, pair):
    verifier, drafter = pair
    prompt = build_prompt(llava_engine, "Describe the image in detail.", [png_bytes(9)])
    host = GrpcLoopHost(connect(verifier.address))
    chunks = host.stream(prompt, SamplingParams(max_new_tokens=MAX_NEW), SpeculationParams(), time.perf_counter())
    next(chunks), next(chunks)
    assert len(verifier.servicer.sessions) == 1 and len(drafter.servicer.sessions) == 1
    chunks.close()  # the orchestrator closes it when the client goes away
    assert sessions_left_after(10, verifier, drafter) == 0


def test_a_drafter_that_dies_mid_request_only_costs_speed(llava_engine, llava_dir, small_llava_drafter_model,
                                                          monkeypatch):
    original = TargetSession.verify
    monkeypatch.setattr(TargetSession, "verify", lambda self, block: time.sleep(0.01) or original(self, block))
    drafter = draft_server.serve(VlmDrafter(small_llava_drafter_model), SETTINGS, SessionSettings())
    verifier = hosted_verifier(llava_engine, llava_dir, drafter.address)
    try:
        prompt = build_prompt(llava_engine, "Describe the image.", [png_bytes(6)])
        host = GrpcLoopHost(connect(verifier.address))
        chunks = host.stream(prompt, SamplingParams(max_new_tokens=MAX_NEW), SpeculationParams(), time.perf_counter())
        tokens = list(next(chunks).token_ids) + list(next(chunks).token_ids)
        drafter.stop()
        tokens += [t for chunk in chunks for t in chunk.token_ids]
        assert tokens == hf_greedy(llava_engine.target, prompt, MAX_NEW)
    finally:
        verifier.stop()


def test_without_a_drafter_a_hosted_loop_decodes_with_the_target_alone(llava_engine, llava_dir):
    verifier = hosted_verifier(llava_engine, llava_dir, None)
    try:
        prompt = build_prompt(llava_engine, "Hi", [])
        tokens, last = generate(verifier, prompt, max_new=12)
        assert tokens == hf_greedy(llava_engine.target, prompt, 12)
        assert last.stats.draft_tokens == 0 and last.stats.target_forwards == 11
    finally:
        verifier.stop()


def test_the_session_limit_is_resource_exhausted(llava_engine, llava_dir):
    from speculum.errors import ResourceExhausted

    verifier = hosted_verifier(llava_engine, llava_dir, None, sessions=SessionSettings(max_sessions=1))
    try:
        prompt = build_prompt(llava_engine, "Hi", [])
        host = GrpcLoopHost(connect(verifier.address))
        first = host.stream(prompt, SamplingParams(max_new_tokens=20), SpeculationParams(), time.perf_counter())
        next(first)
        with pytest.raises(ResourceExhausted):
            generate(verifier, prompt, max_new=4)
        first.close()
    finally:
        verifier.stop()


def test_loop_request_round_trip(llava_engine):
    prompt = build_prompt(llava_engine, "Describe.", [png_bytes(2)])
    request = LoopRequest(prompt, SamplingParams(max_new_tokens=9, temperature=0.5, top_k=3, seed=4, stop=("x",)),
                          SpeculationParams(num_draft_tokens=6, pipelined=True), emitted=(5, 6))
    back = loop_request_from_proto(loop_request_to_proto(request))
    assert back.sampling == request.sampling and back.speculation == request.speculation
    assert back.emitted == (5, 6) and back.prompt.token_ids == prompt.token_ids
    assert (back.prompt.pixel_values == prompt.pixel_values).all()
    assert (back.prompt.visual_embeds == prompt.visual_embeds).all()


def test_stop_strings_see_the_tokens_a_resumed_request_emitted_before():
    words = {1: "ab", 2: "cd", 3: "ef"}
    stop = StopChecker(10, frozenset(), ("bc",), lambda ids: "".join(words[i] for i in ids), preceding=(1,))
    decision = stop.offer([], [2, 3])
    assert decision.keep == 1 and decision.finish is FinishReason.STOP


def spawn_hosted_verifier(llava_dir, port: int, drafter_address: str, log_path) -> ServiceProcess:
    env = {**os.environ, "SPECULUM_VERIFY_PORT": str(port), "SPECULUM_METRICS_PORT": "off", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    return ServiceProcess("verify", ["verify_service.server", "--target", str(llava_dir), "--drafter-address",
                                     drafter_address], "speculum.v1.Verifier", port, env, log_path)


def test_a_verifier_killed_mid_request_is_resumed_with_the_same_output(llava_engine, llava_dir, tmp_path):
    drafter = draft_server.serve(NgramDrafter(), SETTINGS, SessionSettings())
    process = spawn_hosted_verifier(llava_dir, free_port(), drafter.address, tmp_path / "verify.log").start()
    try:
        process.wait_healthy(120)
        prompt = build_prompt(llava_engine, "Describe the image in detail.", [png_bytes(7)])
        host = GrpcLoopHost(connect(process.address), resume_within_s=90)
        chunks = host.stream(prompt, SamplingParams(max_new_tokens=40), SpeculationParams(), time.perf_counter())
        tokens = [t for _ in range(3) for t in next(chunks).token_ids]
        process.kill()  # SIGKILL: the loop, its session and its KV cache are gone
        restarting = threading.Thread(target=process.start)  # the replica comes back (k8s restarts it)
        restarting.start()
        rest = list(chunks)
        restarting.join()
        assert tokens + [t for c in rest for t in c.token_ids] == hf_greedy(llava_engine.target, prompt, 40)
        assert rest[-1].finish is FinishReason.LENGTH and rest[-1].stats.target_forwards > 0
    finally:
        process.terminate()
        process.wait()
        drafter.stop()


def test_a_verifier_that_does_not_come_back_fails_fast(llava_engine, llava_dir):
    verifier = hosted_verifier(llava_engine, llava_dir, None)
    host = GrpcLoopHost(connect(verifier.address), resume_within_s=1.5)
    original = TargetSession.verify
    try:
        TargetSession.verify = lambda self, block: time.sleep(0.02) or original(self, block)
        chunks = host.stream(build_prompt(llava_engine, "Hi", []), SamplingParams(max_new_tokens=60),
                             SpeculationParams(), time.perf_counter())
        next(chunks)
        verifier.stop()
        started = time.monotonic()
        with pytest.raises(Unavailable, match="not back within"):
            list(chunks)
        assert time.monotonic() - started < 5
    finally:
        TargetSession.verify = original


def test_round_metrics_are_counted_where_the_loop_runs(llava_engine, pair):
    verifier, _ = pair
    registry = verifier.registry

    def count(name):
        return registry.get_sample_value(name) or 0.0

    before = count("speculum_verify_round_seconds_count"), count("speculum_draft_round_seconds_count")
    _, last = generate(verifier, build_prompt(llava_engine, "Hello there.", []), max_new=10)
    assert count("speculum_verify_round_seconds_count") - before[0] == last.stats.target_forwards
    assert count("speculum_draft_round_seconds_count") > before[1]


def test_a_unary_caller_gets_one_chunk_with_the_whole_answer(llava_engine, pair):
    verifier, _ = pair
    prompt = build_prompt(llava_engine, "Describe the image in detail.", [png_bytes(12)])
    host = GrpcLoopHost(connect(verifier.address))
    started = time.perf_counter()
    chunks = list(host.stream(prompt, SamplingParams(max_new_tokens=MAX_NEW), SpeculationParams(), started,
                              each_round=False))
    assert len(chunks) == 1 and list(chunks[0].token_ids) == hf_greedy(llava_engine.target, prompt, MAX_NEW)
    stats = chunks[0].stats
    assert 0 < stats.ttft_s < stats.ttft_s + stats.decode_s <= time.perf_counter() - started
