"""The embedding cache: image encodings by content key, in Redis (shared) or in-process (LRU).

A cache may only make encoding faster: every Redis failure is logged, counted and treated as a
miss, and the Redis cache retries by itself after a short pause. Keys come from the encoder
(sha256 of the bytes + model fingerprint); this module adds only its prefix.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from speculum.counters import Counters
from vision_encoder.entry import CorruptEntry, ImageEncoding, from_bytes, to_bytes

log = logging.getLogger("speculum.vision_encoder.cache")


@dataclass(frozen=True)
class CacheSettings:
    """Embedding-cache settings (env names in `from_env`).

    redis_url: e.g. redis://host:6379/0; None selects the in-process LRU cache.
    ttl_s: lifetime of a Redis entry.
    max_bytes: total size of the in-process LRU cache.
    max_entry_bytes: larger encodings are not cached (they would crowd out many small ones).
    key_prefix: namespace of our keys in a shared Redis.
    socket_timeout_s: Redis connect and read timeout; a slow cache must not stall encoding.
    retry_after_s: after a Redis error, skip Redis (all misses) for this long, then try again.
    """

    redis_url: str | None = None
    ttl_s: float = 24 * 3600.0
    max_bytes: int = 512 * 1024 * 1024
    max_entry_bytes: int = 64 * 1024 * 1024
    key_prefix: str = "speculum:enc:"
    socket_timeout_s: float = 0.5
    retry_after_s: float = 2.0

    def __post_init__(self) -> None:
        if self.ttl_s <= 0 or self.max_bytes < 1 or self.max_entry_bytes < 1:
            raise ValueError(f"cache TTL and sizes must be positive: {self}")
        if self.socket_timeout_s <= 0 or self.retry_after_s < 0:
            raise ValueError(f"invalid Redis timeouts: {self}")

    @classmethod
    def from_env(cls) -> CacheSettings:
        """SPECULUM_REDIS_URL, SPECULUM_CACHE_TTL_S, SPECULUM_CACHE_MAX_BYTES, SPECULUM_CACHE_MAX_ENTRY_BYTES,
        SPECULUM_CACHE_PREFIX, SPECULUM_REDIS_TIMEOUT_S, SPECULUM_REDIS_RETRY_S."""
        env = os.environ.get
        return cls(
            redis_url=env("SPECULUM_REDIS_URL") or None,
            ttl_s=float(env("SPECULUM_CACHE_TTL_S") or cls.ttl_s),
            max_bytes=int(env("SPECULUM_CACHE_MAX_BYTES") or cls.max_bytes),
            max_entry_bytes=int(env("SPECULUM_CACHE_MAX_ENTRY_BYTES") or cls.max_entry_bytes),
            key_prefix=env("SPECULUM_CACHE_PREFIX") or cls.key_prefix,
            socket_timeout_s=float(env("SPECULUM_REDIS_TIMEOUT_S") or cls.socket_timeout_s),
            retry_after_s=float(env("SPECULUM_REDIS_RETRY_S") or cls.retry_after_s),
        )


@dataclass(frozen=True)
class CacheStats:
    """Counters since start-up. errors: failed Redis calls and corrupt values (each also a miss).
    skipped: encodings too large to store. bypassed: lookups not sent while Redis was paused."""

    hits: int = 0
    misses: int = 0
    stores: int = 0
    errors: int = 0
    skipped: int = 0
    bypassed: int = 0


class EmbeddingCache(Protocol):
    """Encodings by key. Implementations never raise on lookup or store: a failure is a miss."""

    def get(self, key: str) -> ImageEncoding | None: ...

    def put(self, key: str, encoding: ImageEncoding) -> None: ...

    def stats(self) -> CacheStats: ...

    def close(self) -> None: ...


class LocalLRUCache:
    """In-process cache bounded by total tensor bytes; evicts the least recently used entries."""

    def __init__(self, settings: CacheSettings):
        self.settings = settings
        self._entries: OrderedDict[str, ImageEncoding] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._counters = Counters(CacheStats)

    def get(self, key: str) -> ImageEncoding | None:
        with self._lock:
            encoding = self._entries.get(key)
            if encoding is not None:
                self._entries.move_to_end(key)
        self._counters.add(hits=int(encoding is not None), misses=int(encoding is None))
        return encoding

    def put(self, key: str, encoding: ImageEncoding) -> None:
        size = encoding.nbytes
        if size > min(self.settings.max_entry_bytes, self.settings.max_bytes):
            self._counters.add(skipped=1)
            return
        with self._lock:
            previous = self._entries.pop(key, None)
            self._bytes -= previous.nbytes if previous is not None else 0
            self._entries[key] = encoding
            self._bytes += size
            while self._bytes > self.settings.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
        self._counters.add(stores=1)

    def stats(self) -> CacheStats:
        return self._counters.snapshot()

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


class RedisEmbeddingCache:
    """Redis-backed cache shared by every encoder replica; values are safetensors bytes with a TTL.

    On a Redis error the cache logs one warning, counts it, and sends nothing to Redis for
    `retry_after_s` (so an outage costs each request nothing, not a timeout); the next call
    after that pause tries again, which is how it recovers by itself.
    """

    def __init__(self, settings: CacheSettings):
        if not settings.redis_url:
            raise ValueError("RedisEmbeddingCache needs settings.redis_url")
        self.settings = settings
        # redis-py's default retry policy (10 retries, backoff up to 1 s) and 5 s timeouts would turn
        # a Redis outage into multi-second stalls per image. One immediate retry suffices to replace
        # a pooled connection that went stale while Redis restarted.
        pool = redis.ConnectionPool.from_url(
            settings.redis_url,
            socket_timeout=settings.socket_timeout_s,
            socket_connect_timeout=settings.socket_timeout_s,
            retry=Retry(NoBackoff(), 1),
            **_packer_options(),
        )
        self._client = redis.Redis(connection_pool=pool)
        self._counters = Counters(CacheStats)
        self._lock = threading.Lock()
        self._paused_until = 0.0
        self._failing = False
        log.info("event=cache_init kind=redis url=%s ttl_s=%g", _redacted(settings.redis_url), settings.ttl_s)

    def get(self, key: str) -> ImageEncoding | None:
        if self._paused():
            self._counters.add(misses=1, bypassed=1)
            return None
        try:
            data = self._client.get(self.settings.key_prefix + key)
        except redis.RedisError as exc:
            self._failed("get", exc)
            self._counters.add(misses=1)
            return None
        self._succeeded()
        if data is None:
            self._counters.add(misses=1)
            return None
        try:
            encoding = from_bytes(data)
        except CorruptEntry as exc:
            log.warning("event=cache_corrupt key=%s error=%r", key, str(exc))
            self._counters.add(misses=1, errors=1)
            return None
        self._counters.add(hits=1)
        return encoding

    def put(self, key: str, encoding: ImageEncoding) -> None:
        if self._paused():
            self._counters.add(bypassed=1)
            return
        data = to_bytes(encoding)
        if len(data) > self.settings.max_entry_bytes:
            self._counters.add(skipped=1)
            return
        try:
            self._client.set(self.settings.key_prefix + key, data, px=max(1, round(self.settings.ttl_s * 1000)))
        except redis.RedisError as exc:
            self._failed("set", exc)
            return
        self._succeeded()
        self._counters.add(stores=1)

    def stats(self) -> CacheStats:
        return self._counters.snapshot()

    def close(self) -> None:
        self._client.close()

    # --- outage handling ------------------------------------------------------------------------
    def _paused(self) -> bool:
        with self._lock:
            return time.monotonic() < self._paused_until

    def _failed(self, operation: str, exc: Exception) -> None:
        with self._lock:
            self._paused_until = time.monotonic() + self.settings.retry_after_s
            self._failing = True
        self._counters.add(errors=1)
        log.warning(
            "event=cache_error op=%s error=%r action=treat_as_miss retry_in_s=%g",
            operation,
            str(exc),
            self.settings.retry_after_s,
        )

    def _succeeded(self) -> None:
        with self._lock:
            recovered, self._failing = self._failing, False
        if recovered:
            log.info("event=cache_recovered kind=redis")


def make_cache(settings: CacheSettings) -> EmbeddingCache:
    """Redis when a URL is configured, else the in-process LRU cache (said clearly in the log)."""
    if settings.redis_url:
        return RedisEmbeddingCache(settings)
    log.warning(
        "event=cache_init kind=local_lru max_bytes=%d message=%r",
        settings.max_bytes,
        "no Redis configured, using an in-process LRU cache",
    )
    return LocalLRUCache(settings)


def _packer_options() -> dict:
    """With hiredis installed, redis-py packs commands with hiredis, which copies large values slowly
    (~19 ms for 5 MB, notes/stack.md §4); the pure-Python packer avoids that and keeps hiredis's fast
    reply parser. Without hiredis, the default is already the pure-Python packer."""
    from redis.utils import HIREDIS_AVAILABLE

    if not HIREDIS_AVAILABLE:
        return {}
    from redis._parsers.encoders import Encoder
    from redis.connection import PythonRespSerializer

    return {"command_packer": PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)}


def _redacted(url: str) -> str:
    """The URL without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    return f"{scheme}{sep}***@{rest.split('@', 1)[1]}"
