"""Prometheus metrics for every Speculum process: a registry per server, exported over HTTP.

Edge code only (the gRPC server set-up, the Serve replica): the core keeps plain counters
(`SessionCounters`, `CacheStats`, `SpecStats`) and never imports this module; the collectors here
read those counters when Prometheus scrapes. One registry per server, not the global one, so a
test process can run several servers without their series colliding.

Names follow the gRPC ecosystem's conventions (`grpc_server_handled_total`,
`grpc_server_handling_seconds`) so existing dashboards work; everything else is `speculum_*`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from threading import Thread
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from speculum.batch_window import BatchStats
from speculum.rpc.settings import MetricsSettings
from speculum.sessions import SessionStore
from speculum.stats import SpecStats

log = logging.getLogger("speculum.metrics")

# Seconds: from a ~1 ms internal round to a minute-long generation.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROUND_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.0)
# τ is tokens per verification pass, bonus included: 1 (nothing accepted) ... K + 1.
TAU_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 9.0)
ACCEPTED_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16)
UNMETERED_SERVICES = ("grpc.health.v1.Health",)  # probes every few seconds would drown the real calls


def new_registry() -> CollectorRegistry:
    """A registry with this process's CPU, memory and file-descriptor metrics (`process_*`)."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return registry


# --- RPCs ---------------------------------------------------------------------------------------


class RpcMetrics:
    """Calls served, by gRPC service, method and final status code, with their latency."""

    def __init__(self, registry: CollectorRegistry):
        labels = ("grpc_service", "grpc_method", "grpc_code")
        self.handled = Counter(
            "grpc_server_handled", "RPCs completed, by final status code.", labels, registry=registry
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from receiving a call to its last response (whole stream for streaming calls).",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def observe(self, service: str, method: str, code: str, seconds: float) -> None:
        self.handled.labels(service, method, code).inc()
        self.seconds.labels(service, method, code).observe(seconds)


def split_method(full_method: str) -> tuple[str, str]:
    """'/speculum.v1.Verifier/Verify' -> ('speculum.v1.Verifier', 'Verify')."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times every unary and streaming call of a grpcio server (the whole stream is one call).

    The status is what the call ended with: OK, the code a servicer aborted with (`mapped` aborts
    with the typed error's code), UNKNOWN for an unhandled exception, CANCELLED when the client
    went away mid-stream. Calls refused by `maximum_concurrent_rpcs` never reach interceptors.
    """

    def __init__(self, rpc: RpcMetrics):
        self.rpc = rpc

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        service, method = split_method(handler_call_details.method)
        if handler is None or service in UNMETERED_SERVICES:
            return handler
        for behavior, wrap, rebuild in (
            (handler.unary_unary, self._unary, grpc.unary_unary_rpc_method_handler),
            (handler.unary_stream, self._streaming, grpc.unary_stream_rpc_method_handler),
            (handler.stream_stream, self._streaming, grpc.stream_stream_rpc_method_handler),  # draft sessions
        ):
            if behavior is not None:
                return rebuild(wrap(service, method, behavior), handler.request_deserializer,
                               handler.response_serializer)
        return handler  # client streaming alone: nothing of ours uses it

    def _unary(self, service: str, method: str, behavior: Callable):
        def metered(request, context):
            started = time.perf_counter()
            code = None
            try:
                return behavior(request, context)
            except Exception:
                code = _failure_code(context)
                raise
            finally:
                self.rpc.observe(service, method, code or _final_code(context), time.perf_counter() - started)

        return metered

    def _streaming(self, service: str, method: str, behavior: Callable):
        def metered(request, context) -> Iterator:
            started = time.perf_counter()
            code = None
            try:
                yield from behavior(request, context)
            except GeneratorExit:  # the server stopped reading: the client cancelled or the deadline passed
                code = "CANCELLED"
                raise
            except Exception:
                code = _failure_code(context)
                raise
            finally:
                self.rpc.observe(service, method, code or _final_code(context), time.perf_counter() - started)

        return metered


def _final_code(context) -> str:
    code = context.code()
    return "OK" if code is None else code.name


def _failure_code(context) -> str:
    """An exception ends the call with the code set by `abort`, else UNKNOWN (grpcio's own mapping)."""
    code = context.code()
    return "UNKNOWN" if code in (None, grpc.StatusCode.OK) else code.name


# --- sessions and the embedding cache -----------------------------------------------------------


class SessionCollector:
    """A service's session store, read at scrape time: live sessions and how sessions ended."""

    def __init__(self, store: SessionStore):
        self.store = store

    def collect(self) -> Iterator[Metric]:
        counters = self.store.snapshot()
        yield GaugeMetricFamily("speculum_sessions_live", "Sessions held now (KV caches in memory).",
                                value=len(self.store))
        for name, help_text in (
            ("opened", "Sessions opened."),
            ("released", "Sessions released by their owner (the normal end)."),
            ("expired", "Sessions dropped after their idle TTL."),
            ("evicted", "Sessions evicted (least recently used) to make room for a new one."),
        ):
            yield CounterMetricFamily(f"speculum_sessions_{name}", help_text, value=getattr(counters, name))


@dataclass(frozen=True, eq=False)  # registered by identity
class CountersCollector:
    """A stats dataclass of counters (read at scrape time) as `<prefix>_<field>` counters."""

    stats: Callable[[], object]
    prefix: str
    help: dict[str, str]

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        for name, help_text in self.help.items():
            yield CounterMetricFamily(f"{self.prefix}_{name}", help_text, value=getattr(stats, name))


def image_cache_collector(stats: Callable[[], object]) -> CountersCollector:
    """The vision encoder's embedding cache (`CacheStats`)."""
    return CountersCollector(stats, "speculum_image_cache", {
        "hits": "Image lookups answered from the cache.",
        "misses": "Image lookups that had to run the vision tower (errors and bypasses included).",
        "stores": "Encodings written to the cache.",
        "errors": "Failed Redis calls and corrupt entries (each also counted as a miss).",
        "skipped": "Encodings too large to cache.",
        "bypassed": "Lookups and stores not sent while Redis was paused after an error.",
    })


def prefix_cache_collector(stats: Callable[[], object]) -> CountersCollector:
    """The verifier's image-prefix cache (`PrefixStats`)."""
    return CountersCollector(stats, "speculum_prefix_cache", {
        "hits": "Prefills that reused an image prefix's KV rows.",
        "misses": "Prefills with an image prefix not in the cache.",
        "stores": "Image prefixes stored.",
        "evictions": "Prefixes dropped (least recently used) to stay within the budget.",
        "reused_tokens": "Prompt rows not recomputed thanks to the cache.",
    })


def batch_collector(stats: Callable[[], object | None], service: str) -> CountersCollector:
    """A service's batch window (`speculum.batch_window.BatchStats`); items / passes is the mean
    batch. Zeros when batching is off."""
    return CountersCollector(lambda: stats() or BatchStats(), f"speculum_{service}_batch", {
        "passes": "Batched passes run (each holds one or more sessions' work).",
        "items": "Sessions' work items (blocks or draft rounds) run in those passes.",
    })


# --- speculation (the orchestrator) -------------------------------------------------------------


class RoundMetrics:
    """Per round, where the loop runs (the orchestrator, or the verifier when it hosts the loop)."""

    def __init__(self, registry: CollectorRegistry):
        self.accepted_per_round = Histogram(
            "speculum_accepted_tokens_per_round",
            "Draft tokens the target accepted in one verification round.",
            buckets=ACCEPTED_BUCKETS,
            registry=registry,
        )
        self.draft_round = Histogram(
            "speculum_draft_round_seconds", "One drafter round: the Draft call until its last piece.",
            buckets=ROUND_BUCKETS, registry=registry,
        )
        self.verify_round = Histogram(
            "speculum_verify_round_seconds", "One verification round: the Verify call (or the local pass).",
            buckets=ROUND_BUCKETS, registry=registry,
        )


class SpecMetrics:
    """What the orchestrator learns per request (from `SpecStats`)."""

    def __init__(self, registry: CollectorRegistry):
        self.tau = Histogram(
            "speculum_mean_accepted_length",
            "τ per request: tokens emitted per target verification pass, bonus token included.",
            buckets=TAU_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "speculum_time_to_first_token_seconds", "Request arrival to its first token.",
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.totals = {
            "target_forwards": Counter("speculum_target_forwards", "Target verification passes.", registry=registry),
            "draft_tokens": Counter("speculum_draft_tokens", "Tokens the drafter proposed.", registry=registry),
            "accepted_tokens": Counter(
                "speculum_accepted_tokens",
                "Proposed tokens accepted and emitted (accepted / draft tokens = acceptance rate).",
                registry=registry,
            ),
            "emitted_tokens": Counter(
                "speculum_generated_tokens", "Tokens emitted by verification passes.", registry=registry
            ),
        }
        self.images = Counter("speculum_images", "Images in requests.", registry=registry)
        self.image_cache_hits = Counter(
            "speculum_request_image_cache_hits", "Images whose encoding came from the cache.", registry=registry
        )

    def observe_request(self, stats: SpecStats) -> None:
        """A finished request's stats; τ only when verification ran (a 1-token answer has none)."""
        if stats.target_forwards:
            self.tau.observe(stats.mean_accepted_length)
        self.ttft.observe(stats.ttft_s)
        for name, counter in self.totals.items():
            counter.inc(getattr(stats, name))

    def observe_images(self, images: int, cache_hits: int) -> None:
        self.images.inc(images)
        self.image_cache_hits.inc(cache_hits)


# --- the HTTP exporter --------------------------------------------------------------------------


@dataclass
class MetricsExporter:
    """A running `/metrics` endpoint (prometheus-client's WSGI server on a daemon thread)."""

    server: WSGIServer
    thread: Thread

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def export(registry: CollectorRegistry, settings: MetricsSettings, port: int | None = None) -> MetricsExporter | None:
    """Serve `registry` at http://host:port/metrics (`port` overrides the settings'); None when off.

    A port already in use (another process on this machine took 9100) costs only the metrics: the
    service must not fail to start because of its observability. It is logged as a warning.
    """
    port = settings.port if port is None else port
    if port is None:
        return None
    try:
        server, thread = start_http_server(port, addr=settings.host, registry=registry)
    except OSError as exc:
        log.warning("event=metrics_unavailable host=%s port=%d error=%r", settings.host, port, str(exc))
        return None
    exporter = MetricsExporter(server, thread)
    log.info("metrics on http://%s:%d/metrics", settings.host, exporter.port)
    return exporter
