"""Starting and stopping the local Ray Serve runtime that serves the public gRPC API."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from orchestrator.serve_app import SERVICER_FUNCTION, OrchestratorConfig, SpeculumApp

log = logging.getLogger("speculum.ray")
APP_NAME = "speculum"


@dataclass(frozen=True)
class RayServeSettings:
    """grpc_port: the public API. http_port / http_host: Serve's HTTP proxy (`/-/healthz` for probes;
    0.0.0.0 in a pod so the kubelet can reach it). num_replicas: orchestrator replicas.
    temp_dir: Ray's session files (kept out of /tmp/ray)."""

    grpc_port: int
    http_port: int
    temp_dir: Path
    num_replicas: int = 1
    num_cpus: int = 2
    http_host: str = "127.0.0.1"


def start(config: OrchestratorConfig, settings: RayServeSettings) -> None:
    """ray.init + serve.start with the gRPC proxy + deploy the app; returns when it is ready."""
    # Before ray.init: Ray 2.60 enables token auth by default and reports usage (notes/stack.md).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # On a busy 2-core machine the raylet can take longer than Ray's default wait to register.
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
    # Likewise Serve's proxy: with its default 5 s ready / 10 s health timeouts a loaded machine had
    # the controller kill a healthy, slow-starting proxy (seen with two trainings and the tests running).
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "30")
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    settings.temp_dir.mkdir(parents=True, exist_ok=True)
    # Replicas inherit this process's environment as it is now, OTEL_* included: that is how the
    # orchestrator's tracing gets its endpoint (tests/test_tracing.py checks it).
    _init_ray(settings)
    serve.start(
        http_options={"host": settings.http_host, "port": settings.http_port},
        grpc_options=gRPCOptions(port=settings.grpc_port, grpc_servicer_functions=[SERVICER_FUNCTION]),
    )
    serve.run(application(config, settings.num_replicas), name=APP_NAME, route_prefix="/speculum")
    log.info("public API on 127.0.0.1:%d", settings.grpc_port)


def _init_ray(settings: RayServeSettings, attempts: int = 3) -> None:
    """ray.init, retried: on a loaded machine the local node sometimes misses its start-up deadline."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(
                num_cpus=settings.num_cpus,
                include_dashboard=False,
                object_store_memory=200 * 1024**2,
                _temp_dir=str(settings.temp_dir),
                log_to_driver=False,
            )
            return
        except Exception:
            ray.shutdown()
            if attempt == attempts:
                raise
            log.warning("ray.init failed (attempt %d of %d); retrying", attempt, attempts, exc_info=True)


def application(config: OrchestratorConfig, num_replicas: int = 1):
    """The Serve application (also what KubeRay's RayService imports through serve_main.build_app)."""
    from ray import serve

    deployment = serve.deployment(
        SpeculumApp,
        name="Speculum",
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=config.max_concurrent,
        max_queued_requests=config.max_queued,  # beyond it: RESOURCE_EXHAUSTED, not an unbounded queue
    )
    return deployment.bind(config)


def stop() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
