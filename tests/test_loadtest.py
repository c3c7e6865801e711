"""Load testing: the ghz configurations parse against the proto, and the generator measures a real stack.

ghz itself cannot be installed on this machine (no apt/PyPI package; npm's `ghz` is an empty
placeholder, notes/stack.md §5), so its configurations are checked the way ghz reads them: the
option names are ghz's, the call names a method the public service has, and the request JSON
converts to a `speculum.v1.GenerateRequest` with protobuf's JSON mapping. The Python generator
then runs briefly against the public API on a real gRPC server over the real services, whose
Prometheus exporters are scraped afterwards (`make loadtest` runs it against `speculum serve`).
"""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from loadtest.__main__ import measure
from loadtest.generator import Call, LevelSettings, Method, summarise
from loadtest.ghz_config import CONFIGS, SAMPLE_IMAGE, request_from_config
from orchestrator.serve_app import OrchestratorConfig, SpeculumApp
from speculum.rpc.settings import MetricsSettings
from speculum.v1 import common_pb2, speculum_pb2, speculum_pb2_grpc
from test_metrics import handled, scrape, services, settled  # noqa: F401  (services: the fixture)

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


def test_generator_against_a_real_server_and_its_metrics(services, llava_dir):
    """The public API on a real grpc.aio server (the Serve app's class without Ray, over the real
    services); test_launcher.py scrapes the same app as a replica inside `speculum serve`'s Ray."""
    verifier, drafter, encoder = services
    app = SpeculumApp(OrchestratorConfig(str(llava_dir), verifier.address, drafter.address, encoder.address,
                                         metrics=MetricsSettings(port=0)))

    async def scenario():
        server = grpc.aio.server()
        speculum_pb2_grpc.add_SpeculumServicer_to_server(app, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            target = f"127.0.0.1:{port}"
            reports = await measure(target, list(Method), levels=[1, 2], duration_s=1.0, timeout_s=60)
            async with grpc.aio.insecure_channel(target) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await speculum_pb2_grpc.SpeculumStub(channel).Generate(
                        speculum_pb2.GenerateRequest(prompt="", sampling=common_pb2.SamplingParams(max_new_tokens=2)),
                        timeout=30)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            return reports
        finally:
            await server.stop(0)

    before = scrape(verifier.metrics.port)
    try:
        reports = asyncio.run(scenario())
        orchestrator = scrape(app.metrics.port)
    finally:
        app.metrics.close()
    assert [(r.method, r.concurrency) for r in reports] == [
        ("Generate", 1), ("Generate", 2), ("GenerateStream", 1), ("GenerateStream", 2)
    ]
    for report in reports:
        assert report.errors == 0 and report.status_codes == {"OK": report.count} and report.count >= 1
        assert report.rps > 0 and report.tokens_per_s > 0
        latency = report.latency_ms
        assert latency.fastest <= latency.p50 <= latency.p95 <= latency.p99 <= latency.slowest
    stream = reports[-1]
    assert stream.time_to_first_message_ms.p50 <= stream.latency_ms.p50

    # What the exporters saw: every measured call plus one warm-up per RPC, all OK; one bad call.
    for method in Method:
        calls = sum(r.count for r in reports if r.method == method.value) + 1
        assert handled(orchestrator, "speculum.v1.Speculum", method.value, "OK") == calls
    assert handled(orchestrator, "speculum.v1.Speculum", "Generate", "INVALID_ARGUMENT") == 1
    after = settled(verifier.metrics.port, "speculum_sessions_live", 0)
    opened = (after[("speculum_sessions_opened_total", frozenset())]
              - before[("speculum_sessions_opened_total", frozenset())])  # one verifier session per request
    assert opened == sum(r.count for r in reports) + 2
    assert after[("speculum_sessions_live", frozenset())] == 0
