"""The orchestrator as a container process (k8s): a local Ray runtime serving the public API.

Settings from the environment (the k8s ConfigMap): SPECULUM_TARGET_DIR, SPECULUM_VERIFY_ADDRESS,
SPECULUM_DRAFT_ADDRESS (empty: no speculation), SPECULUM_ENCODER_ADDRESS, SPECULUM_PUBLIC_PORT
(50051), SPECULUM_HTTP_PORT (8000, Serve's /-/healthz), SPECULUM_HTTP_HOST (127.0.0.1; 0.0.0.0 in
a pod), SPECULUM_ORCHESTRATOR_REPLICAS (1), SPECULUM_API_TOKEN (unset: no bearer-token check),
SPECULUM_TLS_CA (TLS towards the services), SPECULUM_DRAFT_ROUND_DEADLINE_S (1.0),
SPECULUM_METRICS_PORT (9100; replica i on a node serves 9100 + i; `off`: no exporter),
SPECULUM_LOOP_AT (`verifier`, the default: the verify service runs requests' loops; `drafter`; `orchestrator`).
Runs until SIGTERM, then shuts Ray Serve down.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
from pathlib import Path

from orchestrator import ray_runtime
from orchestrator.remote_loop import DEFAULT_LOOP_AT, LoopPlacement
from orchestrator.serve_app import OrchestratorConfig
from speculum.logs import setup_logging
from speculum.rpc.settings import ClientSettings, MetricsSettings


def config_from_env() -> tuple[OrchestratorConfig, ray_runtime.RayServeSettings]:
    env = os.environ
    config = OrchestratorConfig(
        target_dir=env["SPECULUM_TARGET_DIR"],
        verify_address=env["SPECULUM_VERIFY_ADDRESS"],
        draft_address=env.get("SPECULUM_DRAFT_ADDRESS") or None,
        encoder_address=env.get("SPECULUM_ENCODER_ADDRESS") or None,
        max_message_bytes=int(env.get("SPECULUM_MAX_MESSAGE_BYTES", OrchestratorConfig.max_message_bytes)),
        api_token=env.get("SPECULUM_API_TOKEN") or None,
        clients=ClientSettings.from_env(),
        # Prometheus must reach the pod IP: the exporter binds where Serve's HTTP proxy does.
        metrics=MetricsSettings.from_env(env.get("SPECULUM_HTTP_HOST", "127.0.0.1")),
        loop_at=LoopPlacement(env.get("SPECULUM_LOOP_AT", DEFAULT_LOOP_AT.value)),
    )
    settings = ray_runtime.RayServeSettings(
        grpc_port=int(env.get("SPECULUM_PUBLIC_PORT", "50051")),
        http_port=int(env.get("SPECULUM_HTTP_PORT", "8000")),
        temp_dir=Path(tempfile.mkdtemp(prefix="ray", dir="/tmp")),
        num_replicas=int(env.get("SPECULUM_ORCHESTRATOR_REPLICAS", "1")),
        num_cpus=os.cpu_count() or 2,
        http_host=env.get("SPECULUM_HTTP_HOST", "127.0.0.1"),
    )
    return config, settings


def build_app(args: dict):
    """KubeRay RayService entry (`import_path: orchestrator.serve_main:build_app`); settings from env."""
    config, settings = config_from_env()
    return ray_runtime.application(config, settings.num_replicas)


def main() -> None:
    setup_logging("orchestrator")
    config, settings = config_from_env()
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    ray_runtime.start(config, settings)
    logging.getLogger("speculum.orchestrator").info("ready port=%d", settings.grpc_port)
    stopping.wait()
    ray_runtime.stop()


if __name__ == "__main__":
    main()
