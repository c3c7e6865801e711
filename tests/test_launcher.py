"""`speculum serve`'s stack as users run it: service processes, local Redis, Ray Serve, public API.

A killed drafter process only costs speed (same greedy output); the public API answers reflection
(what ghz and grpcurl need) and Serve's HTTP health endpoint answers for probes.
"""

from __future__ import annotations

import signal
import urllib.request

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import png_bytes
from orchestrator.engine import GenerateRequest
from orchestrator.public_api import request_to_proto
from speculum.config import SamplingParams
from speculum.launcher import LocalStack, StackConfig
from speculum.ports import free_port
from speculum.v1 import speculum_pb2_grpc


@pytest.fixture(scope="module")
def stack(llava_dir):
    http_port = free_port()
    with LocalStack(StackConfig(llava_dir, "ngram", port=free_port(), http_port=http_port)) as running:
        yield running, http_port


def ask(stub, prompt, images=()):
    request = GenerateRequest(prompt, list(images), SamplingParams(max_new_tokens=24))
    return stub.Generate(request_to_proto(request), timeout=120)


def test_public_api_reflection_and_http_health(stack):
    running, http_port = stack
    reflection = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(running.address))
    answer = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert "speculum.v1.Speculum" in {s.name for s in answer.list_services_response.service}
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/-/healthz", timeout=10) as reply:
        assert reply.status == 200


def test_every_part_exports_metrics_the_ray_replica_included(stack):
    from test_metrics import calls_settled, handled, scrape

    running, _ = stack
    stub = speculum_pb2_grpc.SpeculumStub(grpc.insecure_channel(running.address))
    before = scrape(running.metrics_ports["orchestrator"])
    verify_before = scrape(running.metrics_ports["verify"])
    ask(stub, "Describe the image in detail.", [png_bytes(32)])
    orchestrator = scrape(running.metrics_ports["orchestrator"])  # the Serve replica's own exporter
    assert handled(orchestrator, "speculum.v1.Speculum", "Generate", "OK") - handled(
        before, "speculum.v1.Speculum", "Generate", "OK") == 1
    assert orchestrator[("speculum_mean_accepted_length_count", frozenset())] >= 1
    # the loop runs in the verifier (the default): one Generate stream (counted once it has ended);
    # its round metrics are there
    verify = calls_settled(running.metrics_ports["verify"], verify_before, "speculum.v1.Verifier", "Generate", 1)
    assert handled(verify, "speculum.v1.Verifier", "Generate", "OK") - handled(
        verify_before, "speculum.v1.Verifier", "Generate", "OK") == 1
    assert verify[("speculum_verify_round_seconds_count", frozenset())] >= 1
    assert handled(scrape(running.metrics_ports["draft"]), "speculum.v1.Drafter", "Prefill", "OK") >= 1
    assert handled(scrape(running.metrics_ports["encoder"]), "speculum.v1.VisionEncoder", "Encode", "OK") >= 1


def test_killed_drafter_process_keeps_the_output(stack, llava_engine):
    running, _ = stack
    stub = speculum_pb2_grpc.SpeculumStub(grpc.insecure_channel(running.address))
    image = png_bytes(31)
    before = ask(stub, "Describe the image in detail.", [image])
    assert before.speculation.draft_tokens > 0 or before.speculation.target_forwards > 0
    drafter = next(s for s in running.services if s.name == "draft")
    drafter.process.send_signal(signal.SIGKILL)
    drafter.process.wait(timeout=10)
    after = ask(stub, "Describe the image in detail.", [image])
    assert list(after.token_ids) == list(before.token_ids)
    assert after.speculation.draft_tokens == 0  # plain target decoding, same answer
    reference = llava_engine.generate(GenerateRequest("Describe the image in detail.", [image],
                                                      SamplingParams(max_new_tokens=24)))
    assert list(after.token_ids) == list(reference.token_ids)
