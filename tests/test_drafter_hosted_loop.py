"""The loop run beside the drafter (`Drafter.Generate`, SPECULUM_LOOP_AT=drafter), over real gRPC
servers (port 0) and, for the kill test, a real draft-service process.

Greedy output equals the target alone, sequential and pipelined, for the n-gram and the feature
drafter (features come back from the verifier with each Verify); a seeded sample equals the
in-process loop's; a closed stream releases both sessions; a draft service without a verifier
address refuses with UNAVAILABLE; and a drafter killed mid-request only costs speed: the
orchestrator goes on with its own loop from the tokens already emitted, with the same output.
"""

from __future__ import annotations

import os
import time

import grpc
import pytest

from conftest import (
    build_prompt,
    hf_greedy,
    hosted_verifier,
    loop_hosting_drafter,
    paired_services,
    png_bytes,
    sessions_left_after,
)
from draft_service.ngram import NgramDrafter
from orchestrator.clients import GrpcDrafter, GrpcVerifier, connect
from orchestrator.hosting import HostedLoops
from orchestrator.loop import speculate
from orchestrator.prompting import PromptBuilder
from orchestrator.remote_loop import GrpcLoopHost, LoopPlacement, LoopRequest, loop_request_to_proto
from orchestrator.stopping import FinishReason, StopChecker
from speculum.config import SamplingParams, SpeculationParams
from speculum.launcher import ServiceProcess
from speculum.ports import free_port
from speculum.rpc.settings import ServerSettings, SessionSettings
from speculum.v1 import drafter_pb2_grpc
from test_feature_drafter import drafter_for
from verify_service.target import TargetSession

SETTINGS = ServerSettings(port=0, max_workers=4)
MAX_NEW = 32


@pytest.fixture(scope="module", params=["ngram", "feature"])
def pair(request, llava_engine, llava_dir):
    drafters = {
        "ngram": NgramDrafter,
        "feature": lambda: drafter_for(llava_dir, llava_engine, decouple_visual=True, semi_ar_k=3),
    }
    verifier, drafter = paired_services(drafters[request.param](), llava_engine, llava_dir, SETTINGS,
                                        SessionSettings(max_sessions=4), SessionSettings(max_sessions=4))
    yield verifier, drafter
    drafter.stop()
    verifier.stop()


def stream(drafter, prompt, max_new=MAX_NEW, speculation=SpeculationParams(), fallback=None, **sampling):
    host = GrpcLoopHost(connect(drafter.address), at=LoopPlacement.DRAFTER, fallback=fallback)
    return host.stream(prompt, SamplingParams(max_new_tokens=max_new, **sampling), speculation, time.perf_counter())


@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("with_image", [True, False])
def test_greedy_through_a_drafter_hosted_loop_equals_the_target(llava_engine, pair, with_image, pipelined):
    verifier, drafter = pair
    prompt = build_prompt(llava_engine, "Describe the image in detail.", [png_bytes(3)] if with_image else [])
    chunks = list(stream(drafter, prompt, speculation=SpeculationParams(pipelined=pipelined)))
    assert [t for c in chunks for t in c.token_ids] == hf_greedy(llava_engine.target, prompt, MAX_NEW)
    last = chunks[-1]
    assert last.finish is FinishReason.LENGTH and last.stats.draft_tokens > 0
    assert last.stats.emitted_tokens == MAX_NEW - 1  # every token but the prefill's came from a verification
    # the rounds went through the verifier's Verify (nothing hosted there), drafts stayed local
    assert len(verifier.servicer.sessions) == 0 and len(drafter.servicer.sessions) == 0


def test_a_seeded_sample_equals_the_in_process_loop(llava_engine, pair):
    _, drafter = pair
    prompt = build_prompt(llava_engine, "Say something.", [png_bytes(8)])
    sampling = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.8, seed=11)
    local = speculate(prompt, sampling, SpeculationParams(), llava_engine.verifier, drafter.servicer.drafter,
                      StopChecker(MAX_NEW, llava_engine.target.facts.eos_token_ids))
    remote = stream(drafter, prompt, temperature=0.8, seed=11)
    assert [t for c in remote for t in c.token_ids] == [t for c in local for t in c.token_ids]


def test_a_closed_stream_releases_both_sessions(llava_engine, pair):
    verifier, drafter = pair
    prompt = build_prompt(llava_engine, "Describe the image in detail.", [png_bytes(9)])
    chunks = stream(drafter, prompt)
    next(chunks), next(chunks)
    assert len(verifier.servicer.sessions) == 1 and len(drafter.servicer.sessions) == 1
    chunks.close()  # the orchestrator closes it when the client goes away
    assert sessions_left_after(10, verifier, drafter) == 0


def test_a_draft_service_without_a_verifier_hosts_no_loop(llava_engine, llava_dir):
    verifier = hosted_verifier(llava_engine, llava_dir, None)
    drafter = loop_hosting_drafter(NgramDrafter(), llava_engine, llava_dir, None)
    try:
        prompt = build_prompt(llava_engine, "Hi", [])
        request = LoopRequest(prompt, SamplingParams(max_new_tokens=6, seed=1), SpeculationParams())
        generate = drafter_pb2_grpc.DrafterStub(connect(drafter.address)).Generate
        with pytest.raises(grpc.RpcError) as refused:
            list(generate(loop_request_to_proto(request), timeout=10))
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE and "verify service" in refused.value.details()
        # the orchestrator then runs the request itself: same answer
        here = HostedLoops(GrpcVerifier(connect(verifier.address)), None, llava_engine.target.facts.eos_token_ids,
                           PromptBuilder.from_pretrained(llava_dir, llava_engine.target.facts).decode)
        chunks = list(stream(drafter, prompt, max_new=12, fallback=here))
        assert [t for c in chunks for t in c.token_ids] == hf_greedy(llava_engine.target, prompt, 12)
        assert chunks[-1].stats.draft_tokens == 0 and chunks[-1].stats.target_forwards == 11
    finally:
        drafter.stop()
        verifier.stop()


def test_a_drafter_killed_mid_request_only_costs_speed(llava_engine, llava_dir, tmp_path, monkeypatch):
    original = TargetSession.verify
    monkeypatch.setattr(TargetSession, "verify", lambda self, block: time.sleep(0.02) or original(self, block))
    verifier = hosted_verifier(llava_engine, llava_dir, None)
    port = free_port()
    env = {**os.environ, "SPECULUM_DRAFT_PORT": str(port), "SPECULUM_METRICS_PORT": "off", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    process = ServiceProcess("draft", ["draft_service.server", "--target", str(llava_dir), "--drafter", "ngram",
                                       "--verifier-address", verifier.address], "speculum.v1.Drafter", port, env,
                             tmp_path / "draft.log").start()
    try:
        process.wait_healthy(120)
        here = HostedLoops(GrpcVerifier(connect(verifier.address)), GrpcDrafter(connect(process.address), timeout_s=2),
                           llava_engine.target.facts.eos_token_ids,
                           PromptBuilder.from_pretrained(llava_dir, llava_engine.target.facts).decode)
        prompt = build_prompt(llava_engine, "Describe the image in detail.", [png_bytes(7)])
        chunks = stream(process, prompt, max_new=40, fallback=here)
        tokens = [t for _ in range(3) for t in next(chunks).token_ids]
        process.kill()  # SIGKILL: the loop and its draft session are gone; the verifier session is orphaned
        rest = list(chunks)
        assert tokens + [t for c in rest for t in c.token_ids] == hf_greedy(llava_engine.target, prompt, 40)
        last = rest[-1]
        assert last.finish is FinishReason.LENGTH and last.stats.emitted_tokens + 1 >= 40 - len(tokens)
    finally:
        process.terminate()
        process.wait()
        verifier.stop()
