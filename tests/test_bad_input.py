"""Bad requests get a clear InvalidArgument naming the offending field; nothing is half-done.

Also at the gRPC edge: unknown fields are ignored (forward compatibility), and a message beyond the
size limit is RESOURCE_EXHAUSTED before any of our code runs, with the server still serving.
"""

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


def _unknown_field(number: int, value: int) -> bytes:
    """A varint field the schema does not know (wire type 0), as a newer client might send."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            byte, n = n & 0x7F, n >> 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                return bytes(out)
    return varint(number << 3) + varint(value)


def test_unknown_fields_are_ignored(llava_engine):
    """Forward compatibility: fields this server does not know are skipped, the request is served."""
    from orchestrator.public_api import request_from_proto
    from speculum.v1 import common_pb2, speculum_pb2

    known = speculum_pb2.GenerateRequest(prompt="Hello", sampling=common_pb2.SamplingParams(max_new_tokens=3))
    message = speculum_pb2.GenerateRequest.FromString(known.SerializeToString() + _unknown_field(999, 7))
    assert message.prompt == "Hello"
    assert len(llava_engine.generate(request_from_proto(message)).token_ids) == 3


def test_oversize_message_is_resource_exhausted_and_the_server_lives(llava_engine):
    """A message beyond SPECULUM_MAX_MESSAGE_BYTES is refused by gRPC before any of our code runs."""
    import grpc

    from orchestrator.clients import GrpcVerifier
    from speculum.config import SamplingParams
    from speculum.rpc.settings import ServerSettings, SessionSettings, message_options
    from speculum.v1 import verifier_pb2, verifier_pb2_grpc
    from verify_service import server as verify_server
    from conftest import build_prompt

    running = verify_server.serve(llava_engine.target, ServerSettings(port=0, max_workers=2, max_message_bytes=2**20),
                                  SessionSettings())
    try:
        channel = grpc.insecure_channel(running.address, message_options(64 * 2**20))  # the client would send it
        request = verifier_pb2.VerifierPrefillRequest(session_id="big")
        request.prompt.token_ids.extend([100_000] * 500_000)  # 3-byte varints: ~1.5 MB
        with pytest.raises(grpc.RpcError) as caught:
            verifier_pb2_grpc.VerifierStub(channel).Prefill(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in caught.value.details()
        assert len(running.servicer.sessions) == 0
        session = GrpcVerifier(channel).open(SamplingParams(seed=1))
        assert len(session.prefill(build_prompt(llava_engine, "Hi")).tokens) == 1  # still serving
        session.close()
    finally:
        running.stop()
