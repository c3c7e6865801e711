"""Service settings from the environment (the k8s ConfigMap sets the same variables)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from speculum.prefix_cache import DEFAULT_MAX_BYTES as DEFAULT_PREFIX_CACHE_BYTES
from speculum.tree import TreeShape


def _int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def _float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return default if value in (None, "") else float(value)


@dataclass(frozen=True)
class MetricsSettings:
    """Prometheus `/metrics` over HTTP, one port per process.

    port: None = no exporter (the default for servers built in code: tests run many per process),
        0 = a free port (logged; tests), else that port (9100 in pods, where the annotations point).
    host: the interface to bind (the pod IP must be reachable for Prometheus: 0.0.0.0 there).
    """

    port: int | None = None
    host: str = "127.0.0.1"

    DEFAULT_PORT = 9100

    @classmethod
    def from_env(cls, default_host: str = "127.0.0.1") -> MetricsSettings:
        """SPECULUM_METRICS_PORT (default 9100, `off` = none) and SPECULUM_METRICS_HOST (default: the
        service's own host)."""
        value = os.environ.get("SPECULUM_METRICS_PORT", "").strip().lower()
        port = None if value == "off" else int(value) if value else cls.DEFAULT_PORT
        return cls(port=port, host=os.environ.get("SPECULUM_METRICS_HOST") or default_host)


@dataclass(frozen=True)
class TlsServerSettings:
    """cert_path / key_path: PEM certificate chain and private key the service presents."""

    cert_path: str
    key_path: str

    @classmethod
    def from_env(cls, scope: str = "") -> TlsServerSettings | None:
        """SPECULUM_TLS_CERT and SPECULUM_TLS_KEY (both or neither; unset: plaintext); with scope
        PUBLIC, SPECULUM_PUBLIC_TLS_CERT/KEY (the public API's TLS front)."""
        prefix = f"SPECULUM_{scope}_" if scope else "SPECULUM_"
        cert, key = os.environ.get(f"{prefix}TLS_CERT") or None, os.environ.get(f"{prefix}TLS_KEY") or None
        if (cert is None) != (key is None):
            raise ValueError(f"set both {prefix}TLS_CERT and {prefix}TLS_KEY, or neither")
        return None if cert is None else cls(cert, key)


@dataclass(frozen=True)
class ServerSettings:
    """Settings every internal gRPC service shares.

    host / port: where to listen (port 0 picks a free one; the bound port is logged).
    max_message_bytes: receive and send limit for one message.
    max_workers: threads serving RPCs.
    max_concurrent_rpcs: RPCs admitted at once (running or queued for a thread); beyond it a call
        fails at once with RESOURCE_EXHAUSTED instead of queueing without bound.
    grace_s: graceful-shutdown grace period (k8s terminationGracePeriodSeconds must exceed it).
    metrics: the Prometheus exporter (off unless configured; `from_env` turns it on at 9100).
    tls: the server's certificate and key (None: plaintext, the local default).
    """

    host: str = "127.0.0.1"
    port: int = 0
    max_message_bytes: int = 64 * 1024 * 1024
    max_workers: int = 8
    max_concurrent_rpcs: int = 64
    grace_s: float = 10.0
    metrics: MetricsSettings = MetricsSettings()
    tls: TlsServerSettings | None = None

    @classmethod
    def from_env(cls, prefix: str, default_port: int = 0) -> ServerSettings:
        """E.g. prefix VERIFY reads SPECULUM_VERIFY_HOST, SPECULUM_VERIFY_PORT, and shared limits."""
        host = os.environ.get(f"SPECULUM_{prefix}_HOST", "127.0.0.1")
        return cls(
            host=host,
            port=_int(f"SPECULUM_{prefix}_PORT", default_port),
            max_message_bytes=_int("SPECULUM_MAX_MESSAGE_BYTES", cls.max_message_bytes),
            max_workers=_int("SPECULUM_MAX_WORKERS", cls.max_workers),
            max_concurrent_rpcs=_int("SPECULUM_MAX_CONCURRENT_RPCS", cls.max_concurrent_rpcs),
            grace_s=_float("SPECULUM_GRACE_S", cls.grace_s),
            metrics=MetricsSettings.from_env(host),
            tls=TlsServerSettings.from_env(),
        )

    def channel_options(self) -> list[tuple[str, int]]:
        return message_options(self.max_message_bytes)


def message_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


@dataclass(frozen=True)
class SessionSettings:
    """ttl_s: idle seconds before a session expires. max_sessions: beyond it, the least recently used goes."""

    ttl_s: float = 300.0
    max_sessions: int = 64

    @classmethod
    def from_env(cls, prefix: str) -> SessionSettings:
        return cls(
            ttl_s=_float(f"SPECULUM_{prefix}_SESSION_TTL_S", cls.ttl_s),
            max_sessions=_int(f"SPECULUM_{prefix}_MAX_SESSIONS", cls.max_sessions),
        )


@dataclass(frozen=True)
class ClientSettings:
    """How the orchestrator calls the internal services.

    tls_ca_path: PEM root certificate(s) that sign the services' certificates; None: plaintext.
    draft_round_deadline_s: a draft round not finished by then is dropped; the round decodes with
        the target alone (a stalled drafter must not stall requests).
    max_reconnect_backoff_ms: ceiling of gRPC's reconnect backoff, so a restarted service is
        found again within about a second.
    """

    tls_ca_path: str | None = None
    draft_round_deadline_s: float = 1.0
    max_reconnect_backoff_ms: int = 1000

    def __post_init__(self) -> None:
        if self.draft_round_deadline_s <= 0:
            raise ValueError(f"draft_round_deadline_s must be > 0, got {self.draft_round_deadline_s}")

    @classmethod
    def from_env(cls) -> ClientSettings:
        """SPECULUM_TLS_CA, SPECULUM_DRAFT_ROUND_DEADLINE_S, SPECULUM_MAX_RECONNECT_BACKOFF_MS."""
        return cls(
            tls_ca_path=os.environ.get("SPECULUM_TLS_CA") or None,
            draft_round_deadline_s=_float("SPECULUM_DRAFT_ROUND_DEADLINE_S", cls.draft_round_deadline_s),
            max_reconnect_backoff_ms=_int("SPECULUM_MAX_RECONNECT_BACKOFF_MS", cls.max_reconnect_backoff_ms),
        )

    def channel_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.initial_reconnect_backoff_ms", min(200, self.max_reconnect_backoff_ms)),
            ("grpc.min_reconnect_backoff_ms", min(200, self.max_reconnect_backoff_ms)),
            ("grpc.max_reconnect_backoff_ms", self.max_reconnect_backoff_ms),
        ]


def tree_shape_from_env() -> TreeShape:
    """SPECULUM_DRAFT_TREE_WIDTH (default 1: chains) and SPECULUM_DRAFT_TREE_NODES (default 0: 2 x K x width):
    the candidate trees a feature drafter grows each round."""
    return TreeShape(_int("SPECULUM_DRAFT_TREE_WIDTH", 1), _int("SPECULUM_DRAFT_TREE_NODES", 0))


@dataclass(frozen=True)
class BatchSettings:
    """Batched verification or drafting. window_s: how long the first caller waits for other
    sessions' work (0 = each session's work runs alone) · max_batch: sessions per pass."""

    window_s: float = 0.0
    max_batch: int = 16

    def __post_init__(self) -> None:
        if self.window_s < 0 or self.max_batch < 1:
            raise ValueError("the batch window must be >= 0 and the batch size >= 1")

    @classmethod
    def from_env(cls, service: str = "VERIFY") -> BatchSettings:
        """SPECULUM_<service>_BATCH_WINDOW_MS (default 0: off) and SPECULUM_<service>_MAX_BATCH
        (default 16); service is VERIFY or DRAFT."""
        return cls(_float(f"SPECULUM_{service}_BATCH_WINDOW_MS", 0.0) / 1000, _int(f"SPECULUM_{service}_MAX_BATCH", 16))


def prefix_cache_bytes_from_env() -> int:
    """SPECULUM_VERIFY_PREFIX_CACHE_MB: the verifier's budget for reusable image-prefix KV rows
    (speculum.prefix_cache; default 256, 0 = off)."""
    megabytes = _float("SPECULUM_VERIFY_PREFIX_CACHE_MB", DEFAULT_PREFIX_CACHE_BYTES / 2**20)
    if megabytes < 0:
        raise ValueError("SPECULUM_VERIFY_PREFIX_CACHE_MB must be >= 0")
    return int(megabytes * 2**20)
