"""Prometheus metrics, scraped over HTTP from real servers: the counts move when calls happen.

The three gRPC services run in this process with their exporters on free ports; the orchestrator
app is built directly (no Ray: test_loadtest.py scrapes a replica inside Ray Serve) and driven
through its public methods, so its requests reach the services over real gRPC.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from conftest import paired_services, png_bytes
from draft_service.ngram import NgramDrafter
from orchestrator.engine import GenerateRequest
from orchestrator.remote_loop import LoopPlacement, SpeculationRouted
from orchestrator.serve_app import OrchestratorConfig, SpeculumApp
from speculum.config import SamplingParams
from speculum.errors import InvalidArgument
from speculum.local_redis import RedisServer
from speculum.metrics import SessionCollector, export
from speculum.rpc.settings import MetricsSettings, ServerSettings, SessionSettings
from speculum.sessions import SessionStore
from speculum.v1 import common_pb2, session_pb2, speculum_pb2, verifier_pb2, verifier_pb2_grpc
from verify_service import server as verify_server
from vision_encoder import server as encoder_server
from vision_encoder.cache import CacheSettings

METERED = ServerSettings(port=0, metrics=MetricsSettings(port=0))


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """GET /metrics and parse it: {(sample name, labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def handled(samples, service: str, method: str, code: str) -> float:
    labels = frozenset({"grpc_service": service, "grpc_method": method, "grpc_code": code}.items())
    return samples.get(("grpc_server_handled_total", labels), 0.0)


def value(samples, name: str) -> float:
    return samples.get((name, frozenset()), 0.0)


def settled(port: int, name: str, expected: float, within_s: float = 10.0) -> dict:
    """Scrape until `name` reads `expected` (sessions are released just after the last answer)."""
    deadline = time.monotonic() + within_s
    while value(samples := scrape(port), name) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return samples


def calls_settled(port: int, before: dict, service: str, method: str, expected: int, timeout_s: float = 5.0) -> dict:
    """Scrape until `expected` more OK calls of `method` were counted than in `before` (a stream is
    counted once it has ended), or the time is up."""
    deadline = time.monotonic() + timeout_s
    while (handled(samples := scrape(port), service, method, "OK") - handled(before, service, method, "OK")
           != expected and time.monotonic() < deadline):
        time.sleep(0.1)
    return samples


@pytest.fixture(scope="module")
def services(llava_engine, llava_dir):
    with RedisServer() as redis:
        verifier, drafter = paired_services(NgramDrafter(), llava_engine, llava_dir, METERED,
                                            SessionSettings(max_sessions=8))
        encoder = encoder_server.serve(llava_dir, METERED, CacheSettings(redis_url=redis.url))
        yield verifier, drafter, encoder
        for server in (verifier, drafter, encoder):
            server.stop()


@pytest.fixture(scope="module", params=list(LoopPlacement))
def app(services, llava_dir, request):
    verifier, drafter, encoder = services
    config = OrchestratorConfig(str(llava_dir), verifier.address, drafter.address, encoder.address,
                                metrics=MetricsSettings(port=0), loop_at=request.param)
    app = SpeculumApp(config)
    yield app
    app.metrics.close()


def placement_of(app: SpeculumApp) -> LoopPlacement:
    host = app.engine.loop_host
    if host is None:
        return LoopPlacement.ORCHESTRATOR
    return host.speculating.at if isinstance(host, SpeculationRouted) else host.at


IMAGE_SEEDS = {LoopPlacement.VERIFIER: 31, LoopPlacement.DRAFTER: 33, LoopPlacement.ORCHESTRATOR: 32}


def generate(app: SpeculumApp, prompt: str, images=(), max_new: int = 12, **speculation) -> speculum_pb2.GenerateResponse:
    request = speculum_pb2.GenerateRequest(
        prompt=prompt, images=list(images), sampling=common_pb2.SamplingParams(max_new_tokens=max_new)
    )
    for name, value in speculation.items():
        setattr(request.speculation, name, value)
    return asyncio.run(app.Generate(request))


def test_a_request_moves_every_services_counters(services, app):
    verifier, drafter, encoder = services
    before = {name: scrape(s.metrics.port) for name, s in zip(("verify", "draft", "encoder"), services)}
    before_app = scrape(app.metrics.port)
    at = placement_of(app)
    image = png_bytes(IMAGE_SEEDS[at])  # new to the shared encoder cache in each placement

    first = generate(app, "Describe the image.", [image])
    second = generate(app, "What is in it?", [image])
    assert (first.images.cache_hits, second.images.cache_hits) == (0, 1)

    verify = settled(verifier.metrics.port, "speculum_sessions_live", 0)
    draft = settled(drafter.metrics.port, "speculum_sessions_live", 0)
    enc = scrape(encoder.metrics.port)
    rounds = first.speculation.target_forwards + second.speculation.target_forwards
    if at is LoopPlacement.VERIFIER:  # one Generate stream per request, all OK (counted once the stream ends)
        verify = calls_settled(verifier.metrics.port, before["verify"], "speculum.v1.Verifier", "Generate", 2)
        assert handled(verify, "speculum.v1.Verifier", "Generate", "OK") - handled(
            before["verify"], "speculum.v1.Verifier", "Generate", "OK") == 2
    elif at is LoopPlacement.DRAFTER:  # one Prefill and one VerifyRounds stream per request, all OK
        verify = calls_settled(verifier.metrics.port, before["verify"], "speculum.v1.Verifier", "VerifyRounds", 2)
        for method in ("Prefill", "VerifyRounds"):
            assert handled(verify, "speculum.v1.Verifier", method, "OK") - handled(
                before["verify"], "speculum.v1.Verifier", method, "OK") == 2, method
    else:  # the verifier: one Prefill and one Verify per round, per request, all OK
        assert handled(verify, "speculum.v1.Verifier", "Prefill", "OK") - handled(
            before["verify"], "speculum.v1.Verifier", "Prefill", "OK") == 2
        assert handled(verify, "speculum.v1.Verifier", "Verify", "OK") - handled(
            before["verify"], "speculum.v1.Verifier", "Verify", "OK") == rounds
        latency = frozenset({"grpc_service": "speculum.v1.Verifier", "grpc_method": "Verify",
                             "grpc_code": "OK"}.items())
        assert verify[("grpc_server_handling_seconds_count", latency)] >= rounds
    # sessions released
    assert value(verify, "speculum_sessions_live") == 0
    assert value(verify, "speculum_sessions_opened_total") - value(before["verify"], "speculum_sessions_opened_total") == 2
    assert value(verify, "speculum_sessions_released_total") == value(verify, "speculum_sessions_opened_total")
    # the second prompt about the image reused the first one's image-prefix rows
    for name, delta in (("misses", 1), ("hits", 1), ("stores", 1)):
        metric = f"speculum_prefix_cache_{name}_total"
        assert value(verify, metric) - value(before["verify"], metric) == delta, metric
    assert value(verify, "speculum_prefix_cache_reused_tokens_total") > value(
        before["verify"], "speculum_prefix_cache_reused_tokens_total")
    # the drafter: one Generate stream per request when it hosts the loops, else one DraftRounds
    # stream per draft session (it ends just after the session closes)
    method = "Generate" if at is LoopPlacement.DRAFTER else "DraftRounds"
    draft = calls_settled(drafter.metrics.port, before["draft"], "speculum.v1.Drafter", method, 2)
    assert handled(draft, "speculum.v1.Drafter", method, "OK") - handled(
        before["draft"], "speculum.v1.Drafter", method, "OK") == 2
    assert value(draft, "speculum_sessions_live") == 0
    # the encoder: a miss, then a hit on the same image
    assert value(enc, "speculum_image_cache_misses_total") - value(before["encoder"], "speculum_image_cache_misses_total") == 1
    assert value(enc, "speculum_image_cache_hits_total") - value(before["encoder"], "speculum_image_cache_hits_total") == 1
    assert handled(enc, "speculum.v1.VisionEncoder", "Encode", "OK") - handled(
        before["encoder"], "speculum.v1.VisionEncoder", "Encode", "OK") == 2

    orchestrator = scrape(app.metrics.port)
    assert handled(orchestrator, "speculum.v1.Speculum", "Generate", "OK") - handled(
        before_app, "speculum.v1.Speculum", "Generate", "OK") == 2
    assert value(orchestrator, "speculum_mean_accepted_length_count") - value(
        before_app, "speculum_mean_accepted_length_count") == 2
    tau_sum = first.speculation.mean_accepted_length + second.speculation.mean_accepted_length
    assert value(orchestrator, "speculum_mean_accepted_length_sum") - value(
        before_app, "speculum_mean_accepted_length_sum") == pytest.approx(tau_sum, abs=1e-3)
    # round metrics come from where the loop runs
    looped, looped_before = {LoopPlacement.VERIFIER: (verify, before["verify"]),
                             LoopPlacement.DRAFTER: (draft, before["draft"]),
                             LoopPlacement.ORCHESTRATOR: (orchestrator, before_app)}[at]
    assert value(looped, "speculum_verify_round_seconds_count") - value(
        looped_before, "speculum_verify_round_seconds_count") == rounds
    assert value(looped, "speculum_draft_round_seconds_count") > value(looped_before, "speculum_draft_round_seconds_count")
    accepted = first.speculation.accepted_tokens + second.speculation.accepted_tokens
    assert value(orchestrator, "speculum_accepted_tokens_total") - value(before_app, "speculum_accepted_tokens_total") == accepted
    assert value(orchestrator, "speculum_request_image_cache_hits_total") - value(
        before_app, "speculum_request_image_cache_hits_total") == 1


def test_a_request_without_speculation_never_calls_the_drafter(services, app, llava_engine):
    """Wherever speculating loops run, the target alone runs beside the target or in the orchestrator:
    no drafter call (not even a loop hosted by the draft service) and the target's own answer."""
    verifier, drafter, _ = services
    drafter_calls = sum(value for (name, _), value in scrape(drafter.metrics.port).items()
                        if name == "grpc_server_handled_total")
    verify_before = scrape(verifier.metrics.port)
    reply = generate(app, "Tell me a story.", max_new=10, enabled=False)
    assert reply.speculation.draft_tokens == 0 and reply.speculation.target_forwards == 9
    reference = llava_engine.generate(GenerateRequest("Tell me a story.", sampling=SamplingParams(max_new_tokens=10)))
    assert list(reply.token_ids) == list(reference.token_ids)
    method = "Prefill" if placement_of(app) is LoopPlacement.ORCHESTRATOR else "Generate"
    verify = calls_settled(verifier.metrics.port, verify_before, "speculum.v1.Verifier", method, 1)
    assert handled(verify, "speculum.v1.Verifier", method, "OK") - handled(
        verify_before, "speculum.v1.Verifier", method, "OK") == 1
    assert sum(value for (name, _), value in scrape(drafter.metrics.port).items()
               if name == "grpc_server_handled_total") == drafter_calls


def test_failed_calls_are_counted_under_their_status(services, app):
    verifier, *_ = services
    before = scrape(verifier.metrics.port)
    with grpc.insecure_channel(verifier.address) as channel:
        stub = verifier_pb2_grpc.VerifierStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Prefill(verifier_pb2.VerifierPrefillRequest(session_id=""), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as caught:
            stub.Verify(verifier_pb2.VerifyRequest(session_id="no-such-session"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        stub.Release(session_pb2.ReleaseRequest(session_id="no-such-session"), timeout=10)
    after = scrape(verifier.metrics.port)
    for method, code in (("Prefill", "INVALID_ARGUMENT"), ("Verify", "NOT_FOUND"), ("Release", "OK")):
        assert handled(after, "speculum.v1.Verifier", method, code) - handled(
            before, "speculum.v1.Verifier", method, code) == 1, (method, code)

    before_app = scrape(app.metrics.port)
    with pytest.raises(InvalidArgument):
        generate(app, "")
    after_app = scrape(app.metrics.port)
    assert handled(after_app, "speculum.v1.Speculum", "Generate", "INVALID_ARGUMENT") - handled(
        before_app, "speculum.v1.Speculum", "Generate", "INVALID_ARGUMENT") == 1


def test_health_checks_are_not_counted(services):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    verifier, *_ = services
    with grpc.insecure_channel(verifier.address) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert not any("grpc.health" in str(labels) for _, labels in scrape(verifier.metrics.port))


def test_session_gauge_and_evictions():
    store: SessionStore[str] = SessionStore(ttl_s=60, max_sessions=2, evict_when_full=True)
    registry = CollectorRegistry()
    registry.register(SessionCollector(store))
    exporter = export(registry, MetricsSettings(port=0))
    try:
        for name in "abc":
            store.open(name, name)
        samples = scrape(exporter.port)
        assert value(samples, "speculum_sessions_live") == 2
        assert value(samples, "speculum_sessions_evicted_total") == 1
        assert value(samples, "speculum_sessions_opened_total") == 3
        store.release("b")
        store.release("c")
        samples = scrape(exporter.port)
        assert value(samples, "speculum_sessions_live") == 0
        assert value(samples, "speculum_sessions_released_total") == 2
    finally:
        exporter.close()


@pytest.mark.parametrize("env, port", [(None, 9100), ("off", None), ("0", 0), ("9200", 9200)])
def test_metrics_port_setting(monkeypatch, env, port):
    if env is None:
        monkeypatch.delenv("SPECULUM_METRICS_PORT", raising=False)
    else:
        monkeypatch.setenv("SPECULUM_METRICS_PORT", env)
    monkeypatch.setenv("SPECULUM_VERIFY_HOST", "0.0.0.0")
    monkeypatch.delenv("SPECULUM_METRICS_HOST", raising=False)
    settings = ServerSettings.from_env("VERIFY")
    assert settings.metrics == MetricsSettings(port=port, host="0.0.0.0")
    assert ServerSettings().metrics.port is None  # servers built in code export nothing unless asked


def test_a_busy_metrics_port_costs_only_the_metrics(services, llava_engine):
    """Several services on one machine all default to 9100: the second must still serve gRPC."""
    verifier, *_ = services
    taken = verifier.metrics.port
    second = verify_server.serve(llava_engine.target, ServerSettings(port=0, metrics=MetricsSettings(port=taken)),
                                 SessionSettings())
    try:
        assert second.metrics is None
        with grpc.insecure_channel(second.address) as channel:
            stub = verifier_pb2_grpc.VerifierStub(channel)
            assert stub.Release(session_pb2.ReleaseRequest(session_id="x"), timeout=10).released is False
    finally:
        second.stop()


def test_manifests_scrape_the_port_the_services_export_on():
    """The ConfigMap's SPECULUM_METRICS_PORT, the code's default and every Speculum pod's
    prometheus.io/port annotation (KubeRay: the workers, where replicas run) agree."""
    from pathlib import Path

    import yaml

    k8s = Path(__file__).resolve().parents[1] / "k8s"
    docs = [doc for path in sorted(k8s.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]
    (configmap,) = [doc for doc in docs if doc["kind"] == "ConfigMap"]
    port = configmap["data"]["SPECULUM_METRICS_PORT"]
    assert int(port) == MetricsSettings.DEFAULT_PORT
    templates = [doc["spec"]["template"] for doc in docs
                 if doc["kind"] == "Deployment" and doc["metadata"]["name"] in {"vision-encoder", "verify", "draft", "orchestrator"}]
    (rayservice,) = yaml.safe_load_all((k8s / "kuberay" / "rayservice.yaml").read_text().split("\n---\n")[0])
    templates += [group["template"] for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    assert len(templates) == 5
    for template in templates:
        assert template["metadata"]["annotations"]["prometheus.io/port"] == port
