"""The public API through a real local Ray Serve, over real verify and draft services.

Greedy output through the whole stack equals the target alone (unary and streaming); bad input is
INVALID_ARGUMENT naming the field; cancellation releases the sessions in both services. Every test
runs with the loop beside the target (the default) and with the loop in the orchestrator.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import grpc
import pytest

from conftest import build_prompt, hf_greedy, paired_services, png_bytes
from draft_service.ngram import NgramDrafter
from orchestrator import ray_runtime
from orchestrator.remote_loop import LoopPlacement
from orchestrator.serve_app import OrchestratorConfig
from speculum.rpc.settings import ServerSettings, SessionSettings
from speculum.v1 import common_pb2, speculum_pb2, speculum_pb2_grpc
from speculum.local_redis import RedisServer
from speculum.ports import free_port
from verify_service.target import TargetSession
from vision_encoder import server as encoder_server
from vision_encoder.cache import CacheSettings

SETTINGS = ServerSettings(port=0, max_workers=8)
API_TOKEN = "s3cret-token"


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call, as an authenticated client does."""

    def __init__(self, token: str):
        self.metadata = (("authorization", f"Bearer {token}"),)

    def _with_token(self, details):
        return details._replace(metadata=tuple(details.metadata or ()) + self.metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)


@pytest.fixture(scope="module")
def redis():
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module", params=list(LoopPlacement))
def placement(request):
    return request.param


@pytest.fixture(scope="module")
def public_port(placement):
    return free_port()


@pytest.fixture(scope="module")
def stack(llava_engine, llava_dir, redis, public_port, placement):
    verifier, drafter = paired_services(NgramDrafter(), llava_engine, llava_dir, SETTINGS,
                                        SessionSettings(max_sessions=8))
    encoder = encoder_server.serve(llava_dir, SETTINGS, CacheSettings(redis_url=redis.url))
    port = public_port
    # 8 requests stepped at once (the verifier's 8 sessions) and 2 queued: the overload test goes beyond both.
    config = OrchestratorConfig(str(llava_dir), verifier.address, drafter.address, encoder.address,
                                api_token=API_TOKEN, max_concurrent=8, max_queued=2, loop_at=placement)
    # Ray puts unix sockets under its temp dir: keep the path short (107-byte socket path limit).
    ray_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    ray_runtime.start(config, ray_runtime.RayServeSettings(port, free_port(), ray_dir))
    channel = grpc.intercept_channel(grpc.insecure_channel(f"127.0.0.1:{port}"), BearerToken(API_TOKEN))
    yield speculum_pb2_grpc.SpeculumStub(channel), verifier, drafter, encoder
    channel.close()
    ray_runtime.stop()
    shutil.rmtree(ray_dir, ignore_errors=True)
    for server in (verifier, drafter, encoder):
        server.stop()


def request(prompt, images=(), max_new=24, **sampling):
    return speculum_pb2.GenerateRequest(
        prompt=prompt, images=list(images), sampling=common_pb2.SamplingParams(max_new_tokens=max_new, **sampling)
    )


@pytest.mark.parametrize("with_image", [True, False])
def test_unary_and_streaming_equal_the_target(stack, llava_engine, with_image):
    stub, verifier, drafter, _ = stack
    images = [png_bytes(8)] if with_image else []
    expected = hf_greedy(llava_engine.target, build_prompt(llava_engine, "Describe the image.", images), 24)

    reply = stub.Generate(request("Describe the image.", images), timeout=120)
    assert list(reply.token_ids) == expected
    assert reply.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert reply.usage.completion_tokens == 24 and reply.usage.prompt_tokens > 0
    assert reply.speculation.target_forwards > 0 and reply.speculation.mean_accepted_length >= 1
    assert reply.text == llava_engine.prompts.decode(expected)

    messages = list(stub.GenerateStream(request("Describe the image.", images), timeout=120))
    assert [t for m in messages for t in m.token_ids] == expected
    assert messages[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert all(m.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    assert "".join(m.text for m in messages) == reply.text
    assert len(verifier.servicer.sessions) == 0 and len(drafter.servicer.sessions) == 0


@pytest.mark.parametrize(
    "bad, field",
    [
        (request(""), "prompt"),
        (request("hi", max_new=0), "sampling.max_new_tokens"),
        (request("hi", temperature=-1.0), "sampling.temperature"),
        (request("hi", top_p=1.5), "sampling.top_p"),
        (request("hi", images=[b"not an image"]), "images[0]"),
    ],
)
@pytest.mark.parametrize("streaming", [False, True])
def test_bad_input_is_invalid_argument(stack, bad, field, streaming):
    """Streams too: Serve's proxy would report a stream without messages as OK unless the app raises."""
    stub, *_ = stack
    with pytest.raises(grpc.RpcError) as caught:
        if streaming:
            list(stub.GenerateStream(bad, timeout=60))
        else:
            stub.Generate(bad, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.details()


@pytest.fixture
def slow_rounds(monkeypatch):
    """Each verification takes >= 50 ms and is counted, so a 400-token request runs for many seconds."""
    rounds = []
    original = TargetSession.verify

    def slow_verify(self, block):
        rounds.append(time.monotonic())
        time.sleep(0.05)
        return original(self, block)

    monkeypatch.setattr(TargetSession, "verify", slow_verify)
    return rounds


def assert_released(verifier, drafter, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while (len(verifier.servicer.sessions) or len(drafter.servicer.sessions)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(verifier.servicer.sessions) == 0 and len(drafter.servicer.sessions) == 0


def assert_stopped_and_released(verifier, drafter, rounds):
    """The loop stops soon after the client goes away, long before the 400 tokens, and frees both sessions."""
    assert_released(verifier, drafter)
    settled = len(rounds)
    time.sleep(0.5)
    assert len(rounds) == settled and settled < 60, settled


def test_cancelled_stream_releases_both_sessions(stack, slow_rounds):
    """Known limit: Ray Serve 2.60's gRPC proxy does not always pass a client's cancel of a stream to
    the replica; the request then runs to its end (bounded by max_new_tokens) and frees its
    sessions there. Deadlines always stop it early (next test)."""
    stub, verifier, drafter, _ = stack
    call = stub.GenerateStream(request("Tell me a long story.", max_new=150), timeout=120)
    for _ in range(3):
        next(call)
    call.cancel()
    assert_released(verifier, drafter, within_s=30)
    assert len(slow_rounds) <= 150


@pytest.mark.parametrize("streaming", [True, False])
def test_expired_deadline_releases_both_sessions(stack, slow_rounds, streaming):
    stub, verifier, drafter, _ = stack
    with pytest.raises(grpc.RpcError) as caught:
        if streaming:
            list(stub.GenerateStream(request("Tell me a long story.", max_new=400), timeout=1.0))
        else:
            stub.Generate(request("Tell me a long story.", max_new=400), timeout=1.0)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_stopped_and_released(verifier, drafter, slow_rounds)


def test_second_request_on_an_image_is_served_from_redis(stack, redis, monkeypatch):
    stub, _, _, encoder = stack
    model = encoder.servicer.encoder.model
    calls = []
    original = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda pixels: calls.append(len(pixels)) or original(pixels))
    image = png_bytes(21)
    first = stub.Generate(request("What is this?", [image], max_new=4), timeout=60)
    second = stub.Generate(request("Describe it.", [image], max_new=4), timeout=60)
    assert (first.images.count, first.images.cache_hits) == (1, 0)
    assert (second.images.count, second.images.cache_hits) == (1, 1)
    assert calls == [1]  # the vision tower ran for the first request only
    assert any(key.startswith(b"speculum:enc:") for key in redis.client().keys("*"))


def test_redis_down_does_not_fail_requests(stack, llava_engine, redis):
    stub, *_ = stack
    expected = hf_greedy(llava_engine.target, build_prompt(llava_engine, "What is this?", [png_bytes(22)]), 6)
    redis.stop()
    try:
        reply = stub.Generate(request("What is this?", [png_bytes(22)], max_new=6), timeout=60)
    finally:
        redis.start()
    assert list(reply.token_ids) == expected and reply.images.cache_hits == 0




def test_overload_is_refused_quickly_with_resource_exhausted(stack, llava_engine, slow_rounds):
    """24 long requests at once against 8 verifier sessions, 8 running and 2 queued in the replica:
    the surplus is refused with RESOURCE_EXHAUSTED at once (nothing queues without bound); every
    answered request is right. (With 14, a full-suite run once saw Serve's router admit them all.)"""
    import threading

    stub, verifier, drafter, _ = stack
    outcomes = []

    def call():
        started = time.monotonic()
        try:
            reply = stub.Generate(request("Tell me a long story.", max_new=30), timeout=120)
            outcomes.append(("OK", time.monotonic() - started, list(reply.token_ids)))
        except grpc.RpcError as exc:
            outcomes.append((exc.code().name, time.monotonic() - started, exc.details()))

    threads = [threading.Thread(target=call) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = hf_greedy(llava_engine.target, build_prompt(llava_engine, "Tell me a long story."), 30)
    refused = [seconds for code, seconds, _ in outcomes if code == "RESOURCE_EXHAUSTED"]
    answered = [tokens for code, _, tokens in outcomes if code == "OK"]
    print(f"answered {len(answered)}, refused {len(refused)} within {max(refused, default=0):.2f} s")
    assert {code for code, *_ in outcomes} <= {"OK", "RESOURCE_EXHAUSTED"}, outcomes
    assert refused and max(refused) < 3.0, outcomes
    # How many get in depends on Serve's router (it admits by its own, probed count): 8 alone, 3 in
    # one full-suite run; what must hold is that the surplus is refused at once and answers are right.
    assert answered and all(tokens == expected for tokens in answered)
    assert_released(verifier, drafter)


@pytest.mark.parametrize("token", [None, "wrong"])
def test_calls_without_the_bearer_token_are_unauthenticated(stack, public_port, token):
    channel = grpc.insecure_channel(f"127.0.0.1:{public_port}")
    if token:
        channel = grpc.intercept_channel(channel, BearerToken(token))
    with pytest.raises(grpc.RpcError) as caught:
        speculum_pb2_grpc.SpeculumStub(channel).Generate(request("hi", max_new=2), timeout=60)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_zz_encoder_down_fails_images_with_unavailable_and_text_still_works(stack, llava_engine):
    """Runs last in this module: it stops the stack's vision encoder."""
    stub, _, _, encoder = stack
    encoder.stop()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(request("What is this?", [png_bytes(40)], max_new=4), timeout=60)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    reply = stub.Generate(request("Say something.", max_new=6), timeout=60)
    expected = hf_greedy(llava_engine.target, build_prompt(llava_engine, "Say something."), 6)
    assert list(reply.token_ids) == expected
