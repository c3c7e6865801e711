"""Building an internal gRPC server with the standard hygiene: health, reflection, limits, shutdown,
and Prometheus metrics (calls by method and status, plus the service's own collectors)."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

from speculum.metrics import MetricsExporter, MetricsInterceptor, RpcMetrics, export, new_registry
from speculum.rpc.settings import ServerSettings
from speculum.telemetry import flush_tracing

log = logging.getLogger("speculum.rpc")


@dataclass
class RunningServer:
    """A started server, its bound port, its health servicer and its metrics."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: tuple[str, ...]
    servicer: object | None = None  # the service's own servicer (tests read its sessions)
    registry: CollectorRegistry | None = None
    metrics: MetricsExporter | None = None  # the /metrics endpoint, when configured

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace_s: float | None = 0.0) -> None:
        """Mark NOT_SERVING first so balancers drain, then stop within the grace period."""
        for name in (*self.service_names, ""):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(grace_s).wait()
        if self.metrics is not None:
            self.metrics.close()
        # The last RPCs' spans are still buffered; a SIGKILL after this would lose them.
        flush_tracing()


def start_server(
    settings: ServerSettings,
    register: Sequence[Callable[[grpc.Server], None]],
    service_names: Sequence[str],
    servicer: object | None = None,
    collectors: Sequence[Collector] = (),
    registry: CollectorRegistry | None = None,
) -> RunningServer:
    """Start a server with the given servicers, grpc.health.v1 and reflection; return once bound.

    Every call is counted and timed; `collectors` add the service's own metrics (sessions, cache).
    All of it is served at /metrics when `settings.metrics` names a port. `registry`: one the
    service already registered metrics of its own in (default: a new one).
    """
    registry = new_registry() if registry is None else registry
    for collector in collectors:
        registry.register(collector)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="rpc"),
        interceptors=[MetricsInterceptor(RpcMetrics(registry))],
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        options=settings.channel_options(),
    )
    for add in register:
        add(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = _add_port(server, settings)
    metrics = export(registry, settings.metrics)
    server.start()
    for name in (*service_names, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s:%d", ",".join(service_names), settings.host, port)
    return RunningServer(server, port, health_servicer, tuple(service_names), servicer, registry, metrics)


def _add_port(server: grpc.Server, settings: ServerSettings) -> int:
    """Bind the configured address, with TLS when the settings carry a certificate and key."""
    address = f"{settings.host}:{settings.port}"
    if settings.tls is None:
        return server.add_insecure_port(address)
    credentials = grpc.ssl_server_credentials(
        [(Path(settings.tls.key_path).read_bytes(), Path(settings.tls.cert_path).read_bytes())]
    )
    return server.add_secure_port(address, credentials)


def run_until_signal(running: RunningServer, grace_s: float) -> None:
    """Block until SIGTERM/SIGINT, then shut down gracefully (in-flight RPCs get `grace_s`)."""
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    stopping.wait()
    log.info("shutting down (grace %.1f s)", grace_s)
    running.stop(grace_s)
