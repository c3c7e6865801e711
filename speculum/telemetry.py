"""OpenTelemetry setup for every Speculum process: traces exported by OTLP/gRPC, off by default.

Tracing turns on only when the standard variables name an endpoint (OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT); the SDK itself reads the rest (OTEL_TRACES_SAMPLER, OTEL_BSP_*,
OTEL_EXPORTER_OTLP_INSECURE/HEADERS...). gRPC servers and channels are instrumented so W3C trace
context crosses every RPC. Only edge code (servers, clients, the Serve app) may import this module:
the core fills stats dataclasses and never sees a span.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import TypeVar

from opentelemetry import context, propagate, trace
from opentelemetry.context import Context

log = logging.getLogger("speculum.telemetry")
T = TypeVar("T")
TRACER_NAME = "speculum"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def tracing_requested() -> bool:
    """True when the environment names an OTLP endpoint and does not disable the SDK."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(os.environ.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def setup_tracing(service_name: str) -> bool:
    """Install a TracerProvider exporting to the configured OTLP endpoint and instrument gRPC.

    `service_name` is this process's `service.name` unless OTEL_SERVICE_NAME overrides it. Returns
    False (and changes nothing) when tracing is not requested. Idempotent: a second call in the
    same process keeps the first provider. Spans are flushed when the process exits normally
    (the provider's atexit hook) and by `flush_tracing` on server shutdown.
    """
    if not tracing_requested():
        return False
    from opentelemetry.sdk.trace import TracerProvider

    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        name = os.environ.get("OTEL_SERVICE_NAME", "").strip() or service_name
        # No sampler argument: the SDK honours OTEL_TRACES_SAMPLER(_ARG), default parent-based always-on.
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
        # The exporter reads its endpoint, TLS and headers from the same OTEL_* variables.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        log.info("tracing on: service.name=%s endpoint=%s", name, _endpoint())
    _instrument_grpc()
    return True


def _instrument_grpc() -> None:
    """Patch grpc.server / grpc.*_channel: channels and servers created from now on carry spans."""
    from opentelemetry.instrumentation.grpc import GrpcInstrumentorClient, GrpcInstrumentorServer, filters

    # Health probes arrive every few hundred ms from launchers and kubelets: each would be a trace.
    not_health = filters.negate(filters.health_check())
    for instrumentor in (GrpcInstrumentorServer(filter_=not_health), GrpcInstrumentorClient(filter_=not_health)):
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument()


def _endpoint() -> str:
    return next(os.environ[name] for name in ENDPOINT_VARIABLES if os.environ.get(name, "").strip())


def flush_tracing(timeout_s: float = 5.0) -> None:
    """Export the spans still buffered (no-op when tracing is off)."""
    from opentelemetry.sdk.trace import TracerProvider

    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.force_flush(int(timeout_s * 1000))


def tracer() -> trace.Tracer:
    """Speculum's tracer (a no-op one until `setup_tracing` installs a provider)."""
    return trace.get_tracer(TRACER_NAME)


def context_from_metadata(metadata: Iterable[tuple[str, str | bytes]]) -> Context:
    """The caller's trace context from request metadata (W3C `traceparent`/`tracestate` by default,
    or whatever OTEL_PROPAGATORS names); an empty context, i.e. a new trace, when there is none."""
    carrier = {key.lower(): value for key, value in metadata if isinstance(value, str)}
    return propagate.extract(carrier, context=Context())


def call_in_context(ctx: Context, fn: Callable[..., T], *args) -> T:
    """Run `fn(*args)` with `ctx` as the current context: worker threads do not inherit the
    caller's context, so spans started by `fn` (and RPCs it makes) would otherwise start new traces."""
    token = context.attach(ctx)
    try:
        return fn(*args)
    finally:
        context.detach(token)
