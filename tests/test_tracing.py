"""Tracing through the whole split stack, received by an in-process OTLP receiver (what Jaeger speaks).

The stack runs as `speculum serve` runs it (LocalStack: three service processes and a local Ray
Serve app), so every process exports with its own `service.name`, configured only by the standard
OTEL_* variables. One request must give one trace holding spans from all four services.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from conftest import png_bytes
from orchestrator.remote_loop import LoopPlacement
from speculum.launcher import LocalStack, StackConfig
from speculum.ports import free_port
from speculum.tiny import save_tiny_checkpoint
from speculum.v1 import common_pb2, speculum_pb2, speculum_pb2_grpc

SERVICES = {"orchestrator", "vision-encoder", "verifier", "drafter"}


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict
    resource: dict


def _value(any_value):
    return getattr(any_value, any_value.WhichOneof("value")) if any_value.WhichOneof("value") else None


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector that keeps every span it is sent."""

    def __init__(self):
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()

    def Export(self, request, context):
        received = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(ReceivedSpan(
                        service=resource.get("service.name", ""),
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        resource=resource,
                    ))
        with self._lock:
            self._spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self, where: Callable[[ReceivedSpan], bool] = lambda span: True) -> list[ReceivedSpan]:
        with self._lock:
            return [span for span in self._spans if where(span)]

    def wait_for(self, done: Callable[[list[ReceivedSpan]], bool], where, timeout_s: float = 30.0):
        deadline = time.monotonic() + timeout_s
        while not done(spans := self.spans(where)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return spans


@pytest.fixture(scope="module")
def receiver():
    collector = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    collector.endpoint = f"http://127.0.0.1:{port}"
    yield collector
    server.stop(0).wait()


@pytest.fixture(scope="module", params=[p.value for p in LoopPlacement])
def traced_stack(receiver, tmp_path_factory, request):
    """The whole stack with the OTEL_* variables pointing at the receiver (inherited by every
    process: the launcher copies the environment, Ray's workers inherit the driver's)."""
    env = pytest.MonkeyPatch()
    env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # ms; the default 5 s would only slow the test down
    env.delenv("OTEL_SERVICE_NAME", raising=False)
    env.delenv("OTEL_SDK_DISABLED", raising=False)
    target = save_tiny_checkpoint(tmp_path_factory.mktemp("traced"))
    try:
        config = StackConfig(target, drafter="ngram", port=free_port(), pin_cores=False, loop_at=request.param)
        with LocalStack(config) as stack:
            with grpc.insecure_channel(stack.address) as channel:
                yield speculum_pb2_grpc.SpeculumStub(channel), LoopPlacement(request.param)
    finally:
        env.undo()


def _request(image: bytes) -> speculum_pb2.GenerateRequest:
    return speculum_pb2.GenerateRequest(
        prompt="Describe the image.", images=[image], sampling=common_pb2.SamplingParams(max_new_tokens=8)
    )


def _all_services_reported(spans: list[ReceivedSpan]) -> bool:
    # The request span ends last in the orchestrator; wait for it, for every service, and for every
    # span's parent: a long-lived DraftRounds stream's RPC spans end (and are exported) after it.
    generate = [s for s in spans if s.name == "speculum.generate"]
    if not generate or not {s.service for s in spans} >= SERVICES:
        return False
    known = {s.span_id for s in spans} | {generate[0].parent_span_id, ""}
    return all(s.parent_span_id in known for s in spans)


def test_one_trace_per_request_across_all_four_services(traced_stack, receiver):
    traced_stack, placement = traced_stack
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    seeds = {LoopPlacement.VERIFIER: 31, LoopPlacement.DRAFTER: 33, LoopPlacement.ORCHESTRATOR: 32}
    image = png_bytes(seeds[placement])
    reply = traced_stack.Generate(
        _request(image), metadata=(("traceparent", f"00-{trace_id}-{parent_id}-01"),), timeout=120
    )

    spans = receiver.wait_for(_all_services_reported, lambda s: s.trace_id == trace_id)
    assert {s.service for s in spans} >= SERVICES, sorted({(s.service, s.name) for s in spans})

    # The caller's context crossed Serve's proxy: the request span is the caller's span's child.
    (generate,) = [s for s in spans if s.name == "speculum.generate"]
    assert generate.service == "orchestrator" and generate.parent_span_id == parent_id
    assert generate.attributes["speculum.completion_tokens"] == 8 == len(reply.token_ids)
    assert generate.attributes["speculum.finish_reason"] == "length"
    assert generate.attributes["speculum.prompt_tokens"] == reply.usage.prompt_tokens
    assert generate.attributes["speculum.mean_accepted_length"] == pytest.approx(
        reply.speculation.mean_accepted_length, abs=1e-3
    )
    assert generate.attributes["speculum.request_id"]

    # Every orchestrator span hangs off the request span's subtree (no stray roots).
    by_id = {s.span_id: s for s in spans}
    for span in spans:
        node = span
        while node.parent_span_id in by_id:
            node = by_id[node.parent_span_id]
        assert node is generate, (span.service, span.name)

    # One span per verification round: the loop's Verify call, or the verifier's local pass.
    beside_target = placement is LoopPlacement.VERIFIER
    round_span = "speculum.target.verify" if beside_target else "speculum.verify.round"
    rounds = [s for s in spans if s.name == round_span]
    assert len(rounds) == reply.speculation.target_forwards > 0
    assert all("speculum.accepted_tokens" in s.attributes and "speculum.draft_tokens" in s.attributes for s in rounds)
    assert sum(s.attributes["speculum.accepted_tokens"] for s in rounds) >= reply.speculation.accepted_tokens
    # Draft rounds: the loop's draft client, or the drafter's local proposals when the loop runs there.
    draft_span = "speculum.drafter.propose" if placement is LoopPlacement.DRAFTER else "speculum.draft.round"
    loop_service = {LoopPlacement.VERIFIER: "verifier", LoopPlacement.DRAFTER: "drafter",
                    LoopPlacement.ORCHESTRATOR: "orchestrator"}[placement]
    drafts = [s for s in spans if s.name == draft_span]
    assert drafts and {s.service for s in drafts} == {"drafter" if placement is LoopPlacement.DRAFTER else loop_service}
    assert {s.service for s in spans if s.name == round_span} == {"verifier" if beside_target else loop_service}
    assert [s for s in spans if s.name == ("speculum.target.prefill" if beside_target else "speculum.verify.prefill")]
    (encode,) = [s for s in spans if s.name == "speculum.encode"]
    assert (encode.attributes["speculum.images"], encode.attributes["speculum.cache_hits"]) == (1, 0)
    lookups = [s for s in spans if s.name == "speculum.cache.lookup"]
    assert lookups and all(s.service == "vision-encoder" and s.attributes["cache.hit"] is False for s in lookups)
    assert any(s.service == "verifier" and s.name == "speculum.target.verify" for s in spans)
    assert any(s.service == "drafter" and s.name == "speculum.drafter.propose" for s in spans)

    # Without a caller context the request starts its own trace; the same image now hits the cache.
    known = {s.trace_id for s in receiver.spans()}
    traced_stack.Generate(_request(image), timeout=120)
    fresh = receiver.wait_for(
        lambda found: any(s.name == "speculum.generate" for s in found), lambda s: s.trace_id not in known
    )
    (root,) = [s for s in fresh if s.name == "speculum.generate"]
    second = receiver.wait_for(_all_services_reported, lambda s: s.trace_id == root.trace_id)
    assert {s.service for s in second} >= SERVICES and root.parent_span_id == ""
    assert any(s.name == "speculum.cache.lookup" and s.attributes["cache.hit"] is True for s in second)


SETUP_SCRIPT = """
import sys
from opentelemetry import trace
from speculum.telemetry import flush_tracing, setup_tracing, tracer
on = setup_tracing("probe")
assert setup_tracing("probe") is on  # idempotent
provider = trace.get_tracer_provider()
setup_tracing("probe")
assert trace.get_tracer_provider() is provider
with tracer().start_as_current_span("probe.span"):
    pass
flush_tracing()
print(on)
"""


@pytest.mark.parametrize(
    "variables, expected",
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "{endpoint}", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "{endpoint}"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "{endpoint}", "OTEL_SERVICE_NAME": "renamed"}, True),
    ],
)
def test_setup_tracing_only_with_an_endpoint(receiver, variables, expected):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update({k: v.format(endpoint=receiver.endpoint) for k, v in variables.items()})
    run_id = secrets.token_hex(4)
    env["OTEL_RESOURCE_ATTRIBUTES"] = f"test.run={run_id}"
    out = subprocess.run([sys.executable, "-c", SETUP_SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(expected)
    exported = receiver.spans(lambda s: s.resource.get("test.run") == run_id)
    if expected:  # flush_tracing returned after the export, so the span is already here
        assert [(s.service, s.name) for s in exported] == [(variables.get("OTEL_SERVICE_NAME", "probe"), "probe.span")]
    else:
        assert exported == []
