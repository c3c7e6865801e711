"""Random public requests: every answer is a result or a clean typed error, never a crash or a hang.

Requests are built as protobuf messages (what arrives at the API), converted at the edge and run
by the engine on a tiny target, with hypothesis choosing every field.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import png_bytes
from orchestrator.public_api import request_from_proto
from speculum.errors import InvalidArgument, SpeculumError
from speculum.v1 import common_pb2, speculum_pb2

IMAGES = st.one_of(
    st.binary(max_size=64),
    st.just(png_bytes(1)),
    st.just(png_bytes(2)[:50]),
    st.sampled_from([b"GIF89a", b"\x89PNG\r\n\x1a\n", b"BM" + bytes(60)]),
)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def requests(draw):
    sampling = common_pb2.SamplingParams()
    if draw(st.booleans()):
        sampling.max_new_tokens = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        sampling.temperature = draw(FLOATS)
    if draw(st.booleans()):
        sampling.top_p = draw(FLOATS)
    if draw(st.booleans()):
        sampling.top_k = draw(st.integers(-(2**31), 2**31 - 1))
    if draw(st.booleans()):
        sampling.seed = draw(st.integers(0, 2**64 - 1))
    sampling.stop.extend(draw(st.lists(st.text(max_size=4), max_size=2)))
    speculation = common_pb2.SpeculationParams()
    if draw(st.booleans()):
        speculation.num_draft_tokens = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        speculation.enabled = draw(st.booleans())
    return speculum_pb2.GenerateRequest(
        prompt=draw(st.text(max_size=40)),
        images=draw(st.lists(IMAGES, max_size=2)),
        sampling=sampling,
        speculation=speculation,
    )


@settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(message=requests())
def test_random_requests_answer_or_fail_cleanly(llava_engine, message):
    try:
        request = request_from_proto(message)
        request = type(request)(request.prompt, request.images,
                               type(request.sampling)(**{**request.sampling.__dict__,
                                                         "max_new_tokens": min(request.sampling.max_new_tokens, 8)}),
                               request.speculation)
        result = llava_engine.generate(request)
    except SpeculumError as exc:
        assert str(exc), "errors carry a message"
        if isinstance(exc, InvalidArgument):
            assert exc.field, "invalid-argument errors name the field"
        return
    assert 1 <= len(result.token_ids) <= 8
    assert result.finish_reason is not None


def test_fuzzing_reaches_both_outcomes(llava_engine):
    """The strategy is not degenerate: valid requests succeed and invalid ones are refused."""
    ok = llava_engine.generate(request_from_proto(speculum_pb2.GenerateRequest(
        prompt="hi", sampling=common_pb2.SamplingParams(max_new_tokens=3))))
    assert len(ok.token_ids) == 3
    with pytest.raises(InvalidArgument):
        request_from_proto(speculum_pb2.GenerateRequest(prompt="hi", sampling=common_pb2.SamplingParams(top_p=2)))
