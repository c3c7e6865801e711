"""Load testing: the ghz configurations parse against the proto, and the generator measures a real stack.

ghz itself cannot be installed on this machine (no apt/PyPI package; npm's `ghz` is an empty
placeholder, notes/stack.md §5), so its configurations are checked the way ghz reads them: the
option names are ghz's, the call names a method the public service has, and the request JSON
converts to a `speculum.v1.GenerateRequest` with protobuf's JSON mapping. The Python generator
then runs briefly against `speculum serve`'s stack (LocalStack, real Ray Serve), and the stack's
Prometheus exporters (the orchestrator replica's included) are scraped afterwards.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.generator import Call, LevelSettings, Method, summarise
from loadtest.ghz_config import CONFIGS, SAMPLE_IMAGE, request_from_config
from speculum.launcher import LocalStack, StackConfig
from speculum.ports import free_port
from speculum.v1 import common_pb2, speculum_pb2, speculum_pb2_grpc

# The JSON option names of ghz's runner.Config (ghz v0.120, runner/config.go).
GHZ_OPTIONS = {
    "proto", "protoset", "call", "cacert", "cert", "key", "skipTLS", "cname", "authority", "insecure", "total",
    "concurrency", "connections", "qps", "duration", "duration-stop", "max-duration", "timeout", "data",
    "data-file", "binary-file", "metadata", "metadata-file", "stream-interval", "output", "format",
    "connect-timeout", "keepalive", "cpus", "import-paths", "name", "tags", "reflect-metadata", "debug", "host",
    "enable-compression",
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_ghz_config_parses_against_the_proto(method):
    config = json.loads(CONFIGS[method].read_text())
    assert set(config) <= GHZ_OPTIONS, set(config) - GHZ_OPTIONS
    assert "proto" not in config and "protoset" not in config  # ghz then uses server reflection
    service_name, _, rpc = config["call"].partition("/")
    service = speculum_pb2.DESCRIPTOR.services_by_name["Speculum"]
    assert service_name == service.full_name and rpc == method
    assert service.methods_by_name[rpc].server_streaming == (method == "GenerateStream")
    assert config["insecure"] is True and config["duration-stop"] in {"close", "ignore", "wait"}

    request = request_from_config(CONFIGS[method])  # json_format.ParseDict: unknown fields fail
    assert request.prompt and request.sampling.max_new_tokens > 0
    assert list(request.images) == [SAMPLE_IMAGE.read_bytes()], (
        "the sample image changed: run `python -m loadtest ghz-configs`"
    )


def test_summary_counts_errors_and_orders_percentiles():
    settings = LevelSettings("127.0.0.1:1", Method.GENERATE, concurrency=4, duration_s=1.0)
    calls = [Call(0.0, (i + 1) / 1000, "OK", tokens=8) for i in range(97)]
    calls += [Call(0.0, 0.5, "UNAVAILABLE"), Call(0.0, 0.5, "UNAVAILABLE"), Call(0.0, 0.2, "DEADLINE_EXCEEDED")]
    report = summarise(settings, calls, total_s=2.0)
    assert (report.count, report.errors, report.rps) == (100, 3, 50.0)
    assert report.status_codes == {"DEADLINE_EXCEEDED": 1, "OK": 97, "UNAVAILABLE": 2}
    latency = report.latency_ms
    assert latency.fastest == 1.0 and latency.slowest == 500.0
    assert latency.fastest <= latency.p50 <= latency.p90 <= latency.p95 <= latency.p99 <= latency.slowest
    assert latency.p50 == pytest.approx(50.5)
    assert report.tokens_per_s == pytest.approx(97 * 8 / 2.0)


@pytest.fixture(scope="module")
def stack(llava_dir):
    with LocalStack(StackConfig(llava_dir, "ngram", port=free_port())) as running:
        yield running


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def handled(samples, service: str, method: str, code: str) -> float:
    labels = frozenset({"grpc_service": service, "grpc_method": method, "grpc_code": code}.items())
    return samples.get(("grpc_server_handled_total", labels), 0.0)


def test_generator_against_the_local_stack_and_its_metrics(stack, tmp_path):
    from loadtest.__main__ import measure

    started = datetime.datetime.now()
    reports = asyncio.run(measure(stack.address, list(Method), levels=[1, 2], duration_s=1.5, timeout_s=60))
    assert [(r.method, r.concurrency) for r in reports] == [
        ("Generate", 1), ("Generate", 2), ("GenerateStream", 1), ("GenerateStream", 2)
    ]
    for report in reports:
        assert report.errors == 0 and report.status_codes == {"OK": report.count} and report.count >= 1
        assert report.rps > 0 and report.tokens_per_s > 0
        latency = report.latency_ms
        assert latency.fastest <= latency.p50 <= latency.p95 <= latency.p99 <= latency.slowest
    assert reports[-1].time_to_first_message_ms.p50 <= reports[-1].latency_ms.p50
    assert (datetime.datetime.now() - started).total_seconds() < 60

    # What the stack's exporters saw: every call above (and a warm-up per method), all OK.
    public = speculum_pb2_grpc.SpeculumStub(grpc.insecure_channel(stack.address))
    with pytest.raises(grpc.RpcError) as caught:
        public.Generate(speculum_pb2.GenerateRequest(prompt="", sampling=common_pb2.SamplingParams(max_new_tokens=2)),
                        timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    orchestrator = scrape(stack.metrics_ports["orchestrator"])
    for method in Method:
        calls = sum(r.count for r in reports if r.method == method.value) + 1
        assert handled(orchestrator, "speculum.v1.Speculum", method.value, "OK") == calls
    assert handled(orchestrator, "speculum.v1.Speculum", "Generate", "INVALID_ARGUMENT") == 1
    assert orchestrator[("speculum_verify_round_seconds_count", frozenset())] > 0

    verify = scrape(stack.metrics_ports["verify"])
    assert handled(verify, "speculum.v1.Verifier", "Prefill", "OK") == sum(r.count for r in reports) + 2
    deadline = time.monotonic() + 10  # the last sessions are released just after the last answer
    while scrape(stack.metrics_ports["verify"])[("speculum_sessions_live", frozenset())] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert scrape(stack.metrics_ports["verify"])[("speculum_sessions_live", frozenset())] == 0
    encoder = scrape(stack.metrics_ports["encoder"])
    assert encoder[("speculum_image_cache_hits_total", frozenset())] >= sum(r.count for r in reports)
