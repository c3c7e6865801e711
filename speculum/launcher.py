"""`speculum serve`: the whole split stack on this machine.

Starts the vision-encoder, verify and draft services as processes (verifier and drafter pinned to
different cores when there are at least two), a local redis-server when no Redis URL is configured
and the binary exists, and the Ray Serve app with the public gRPC API; waits until every part is
healthy; stops everything, in reverse order, on exit.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from speculum.local_redis import RedisServer, redis_binary
from speculum.ports import free_port
from speculum.rpc.settings import MetricsSettings
from speculum.rpc.settings import ClientSettings, TlsServerSettings

log = logging.getLogger("speculum.launcher")
METRICS_OFFSETS = {"orchestrator": 0, "encoder": 1, "verify": 2, "draft": 3}  # from StackConfig.metrics_port


@dataclass(frozen=True)
class StackConfig:
    """target_dir / drafter: the model pair (drafter: `ngram` or a folder).
    port: the public API. http_port: Serve's HTTP proxy (health at /-/healthz), 0 = free port.
    redis_url: an existing Redis; None starts a local one (or, without the binary, in-process LRU).
    pin_cores: verifier on core 0, drafter on core 1 (when the machine has two cores or more).
    metrics_port: Prometheus /metrics of each part: N puts the orchestrator on N, the encoder on N+1,
        the verifier on N+2, the drafter on N+3; 0 (default) picks free ports (logged, `metrics_ports`);
        None turns the exporters off.
    loop_at: where requests' loops run (`orchestrator.remote_loop.LoopPlacement` value): "verifier"
        (default), "drafter" or "orchestrator"."""

    target_dir: Path
    drafter: str = "ngram"
    port: int = 50051
    http_port: int = 0
    redis_url: str | None = None
    pin_cores: bool = True
    startup_timeout_s: float = 180.0
    public_tls: TlsServerSettings | None = None
    metrics_port: int | None = 0
    loop_at: str = "verifier"


@dataclass
class ServiceProcess:
    """One service as a child process on a fixed port. `kill` / `restart` keep the port, so the
    orchestrator's channels find the new process (the soak test and the fault tests use them)."""

    name: str
    module_args: list[str]
    service: str  # the grpc.health.v1 service name that says it is ready
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServiceProcess:
        with self.log_path.open("a") as log_file:
            self.process = subprocess.Popen([sys.executable, "-m", *self.module_args], env=self.env, stdout=log_file,
                                            stderr=subprocess.STDOUT)
        return self

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.process.poll() is not None:
                    tail = self.log_path.read_text()[-3000:]
                    raise RuntimeError(f"the {self.name} service exited ({self.process.returncode}):\n{tail}")
                try:
                    answer = health.Check(health_pb2.HealthCheckRequest(service=self.service), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        log.info("%s service healthy at %s", self.name, self.address)
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the {self.name} service was not healthy within {timeout_s} s")
                time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: no graceful shutdown, sessions lost."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=15)

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: graceful shutdown in the service

    def wait(self, timeout_s: float = 15) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self, timeout_s: float = 180.0) -> None:
        """Kill and start again on the same port; returns once healthy."""
        self.kill()
        self.start().wait_healthy(timeout_s)

    def rss_bytes(self) -> int:
        """Resident memory of the process now (0 when it is not running)."""
        if self.process is None or self.process.poll() is not None:
            return 0
        return rss_bytes(self.process.pid)


def rss_bytes(pid: int) -> int:
    """VmRSS of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class LocalStack:
    """Context manager: `with LocalStack(config) as stack: stack.address`."""

    config: StackConfig
    services: list[ServiceProcess] = field(default_factory=list)
    redis: RedisServer | None = None
    redis_url: str | None = None
    workdir: Path | None = None
    ray_started: bool = False
    tls_front: object | None = None  # orchestrator.tls_front.TlsFront when the public API uses TLS
    metrics_ports: dict[str, int] = field(default_factory=dict)  # part -> its /metrics port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.config.port}"

    def service(self, name: str) -> ServiceProcess:
        """The `encoder`, `verify` or `draft` process."""
        return next(service for service in self.services if service.name == name)

    def __enter__(self) -> LocalStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        from orchestrator import ray_runtime
        from orchestrator.remote_loop import LoopPlacement
        from orchestrator.serve_app import OrchestratorConfig

        # Short path: Ray keeps unix sockets under it (107-byte limit).
        self.workdir = Path(tempfile.mkdtemp(prefix="spq", dir="/tmp"))
        self.redis_url = self.config.redis_url or os.environ.get("SPECULUM_REDIS_URL") or None
        if self.redis_url is None and redis_binary():
            self.redis = RedisServer().start()
            self.redis_url = self.redis.url
            log.info("started redis-server at %s", self.redis_url)
        target = str(self.config.target_dir)
        cores = {"VERIFY": "0", "DRAFT": "1"} if self.config.pin_cores and (os.cpu_count() or 1) >= 2 else {}
        self._spawn("encoder", "ENCODER", ["vision_encoder.server", "--target", target, "--drafter", self.config.drafter],
                    "speculum.v1.VisionEncoder")
        # Each may host requests' loops: the verifier drafts with the drafter directly, the drafter
        # verifies with the verifier directly.
        draft_port, verify_port = free_port(), free_port()
        self._spawn("draft", "DRAFT",
                    ["draft_service.server", "--target", target, "--drafter", self.config.drafter,
                     "--verifier-address", f"127.0.0.1:{verify_port}"],
                    "speculum.v1.Drafter", cores.get("DRAFT"), draft_port)
        self._spawn("verify", "VERIFY", ["verify_service.server", "--target", target, "--drafter-address",
                                         f"127.0.0.1:{draft_port}"], "speculum.v1.Verifier", cores.get("VERIFY"),
                    verify_port)
        for service in self.services:
            service.wait_healthy(self.config.startup_timeout_s)
        by_name = {s.name: s.address for s in self.services}
        orchestrator = OrchestratorConfig(target, by_name["verify"], by_name["draft"], by_name["encoder"],
                                          metrics=MetricsSettings(port=self._metrics_port("orchestrator")),
                                          api_token=os.environ.get("SPECULUM_API_TOKEN") or None,
                                          clients=ClientSettings.from_env(),
                                          loop_at=LoopPlacement(self.config.loop_at))
        public_tls = self.config.public_tls or TlsServerSettings.from_env("PUBLIC")
        # With TLS, Serve's plaintext proxy listens on a loopback port behind the TLS front.
        serve_port = free_port() if public_tls else self.config.port
        ray_settings = ray_runtime.RayServeSettings(serve_port, self.config.http_port or free_port(), self.workdir / "ray")
        ray_runtime.start(orchestrator, ray_settings)
        self.ray_started = True
        if public_tls:
            from orchestrator.tls_front import TlsFront

            self.tls_front = TlsFront(f"127.0.0.1:{serve_port}", public_tls, self.config.port).start()

    def _metrics_port(self, name: str) -> int | None:
        base = self.config.metrics_port
        if base is None:
            return None
        port = base + METRICS_OFFSETS[name] if base else free_port()
        self.metrics_ports[name] = port
        log.info("%s metrics at http://127.0.0.1:%d/metrics", name, port)
        return port

    def _spawn(self, name: str, prefix: str, module_args: list[str], service: str,
               cpus: str | None = None, port: int | None = None) -> ServiceProcess:
        port = port or free_port()
        env = {**os.environ, f"SPECULUM_{prefix}_PORT": str(port), "HF_HUB_OFFLINE": "1"}
        metrics_port = self._metrics_port(name)  # explicit: the three would all default to 9100
        env["SPECULUM_METRICS_PORT"] = "off" if metrics_port is None else str(metrics_port)
        if self.redis_url:
            env["SPECULUM_REDIS_URL"] = self.redis_url
        if cpus is not None:
            env[f"SPECULUM_{prefix}_CPUS"] = cpus
        process = ServiceProcess(name, module_args, service, port, env, self.workdir / f"{name}.log")
        self.services.append(process.start())
        return process

    def stop(self) -> None:
        if self.tls_front is not None:
            self.tls_front.stop()
            self.tls_front = None
        if self.ray_started:
            from orchestrator import ray_runtime

            self.ray_started = False
            ray_runtime.stop()
        for service in reversed(self.services):
            service.terminate()
        for service in reversed(self.services):
            service.wait()
        self.services.clear()
        if self.redis is not None:
            self.redis.close()
            self.redis = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
