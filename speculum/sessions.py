"""A bounded store of per-request sessions: TTL expiry, a size cap with LRU eviction, per-session locks.

Services keep KV caches here. A session is touched on every use; idle ones expire. When the store
is full it either evicts the least recently used session (the drafter: its owner gets
SessionNotFound and decodes without speculation) or refuses the new one with ResourceExhausted
(the verifier: evicting would lose a request).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from speculum.errors import InvalidArgument, ResourceExhausted, SessionNotFound

State = TypeVar("State")


@dataclass
class _Entry(Generic[State]):
    state: State
    last_used: float
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class SessionCounters:
    opened: int = 0
    released: int = 0
    expired: int = 0
    evicted: int = 0


class SessionStore(Generic[State]):
    """Thread-safe sessions keyed by id. `close` is called on every state that leaves the store."""

    def __init__(self, ttl_s: float, max_sessions: int, evict_when_full: bool,
                 close: Callable[[State], None] = lambda state: None, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.evict_when_full = evict_when_full
        self._close = close
        self._clock = clock
        self._entries: OrderedDict[str, _Entry[State]] = OrderedDict()
        self._lock = threading.Lock()
        self.counters = SessionCounters()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def snapshot(self) -> SessionCounters:
        """A consistent copy of the counters (metrics read them from another thread)."""
        with self._lock:
            return replace(self.counters)

    def open(self, session_id: str, state: State) -> None:
        """Add a session; when full, evict the LRU one or raise ResourceExhausted (closing `state`)."""
        if not session_id:
            raise InvalidArgument("session_id", "must not be empty")
        leaving: list[State] = []
        with self._lock:
            if session_id in self._entries:
                raise InvalidArgument("session_id", f"session {session_id!r} already exists")
            leaving += self._expire_locked()
            full = len(self._entries) >= self.max_sessions and not self.evict_when_full
            while not full and len(self._entries) >= self.max_sessions:
                _, entry = self._entries.popitem(last=False)
                self.counters.evicted += 1
                leaving.append(entry.state)
            if not full:
                self._entries[session_id] = _Entry(state, self._clock())
                self.counters.opened += 1
        for old in leaving:
            self._close(old)
        if full:
            self._close(state)
            raise ResourceExhausted(f"all {self.max_sessions} sessions are in use; retry later")

    @contextmanager
    def use(self, session_id: str) -> Iterator[State]:
        """Hold the session exclusively while the block runs; refreshes its TTL."""
        with self._lock:
            entry = self._entries.get(session_id)
            if entry is None or self._clock() - entry.last_used > self.ttl_s:
                raise SessionNotFound(f"session {session_id!r} is unknown or expired")
            self._entries.move_to_end(session_id)
            entry.last_used = self._clock()
        with entry.lock:
            yield entry.state
        entry.last_used = self._clock()

    def release(self, session_id: str) -> bool:
        with self._lock:
            entry = self._entries.pop(session_id, None)
            if entry is not None:
                self.counters.released += 1
        if entry is None:
            return False
        with entry.lock:  # wait for an in-flight use to finish before freeing its state
            self._close(entry.state)
        return True

    def expire(self) -> int:
        """Drop idle sessions now (services also call this on every open)."""
        with self._lock:
            leaving = self._expire_locked()
        for state in leaving:
            self._close(state)
        return len(leaving)

    def _expire_locked(self) -> list[State]:
        now = self._clock()
        stale = [key for key, entry in self._entries.items() if now - entry.last_used > self.ttl_s]
        self.counters.expired += len(stale)
        return [self._entries.pop(key).state for key in stale]
