"""A closed-loop gRPC load generator that reports what ghz reports.

`concurrency` workers share one channel (like ghz's default `connections: 1`); each sends a request,
waits for the whole answer, and sends the next, until the level's duration is over. Requests in
flight at that moment finish and count (ghz's `duration-stop: wait`). Per level it reports the
count, requests/s, latency average / fastest / slowest / p50 / p90 / p95 / p99, and the status code
distribution; for streams also the time to the first message.

Built on grpc.aio rather than locust: locust's gRPC users need gevent to monkey-patch the whole
process (so it cannot share a process with the stack or with pytest), and it reports percentiles
rounded into buckets. Tried with locust 2.47.0 + grpc.experimental.gevent: it works, but those two
costs bought nothing here.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import grpc
import numpy as np

from speculum.v1 import speculum_pb2, speculum_pb2_grpc


class Method(enum.Enum):
    """The public RPCs under test (ghz's `call` is `speculum.v1.Speculum/<value>`)."""

    GENERATE = "Generate"
    GENERATE_STREAM = "GenerateStream"


@dataclass(frozen=True)
class LevelSettings:
    """One measurement: `concurrency` closed-loop workers for `duration_s` seconds.

    timeout_s: each call's deadline (ghz `timeout`). metadata: sent with every call (e.g. a bearer token).
    max_calls: stop after this many calls even before the duration is over (ghz `total`).
    max_message_bytes: the channel's message limit (requests carry images).
    """

    target: str
    method: Method
    concurrency: int
    duration_s: float
    timeout_s: float = 120.0
    metadata: tuple[tuple[str, str], ...] = ()
    max_calls: int | None = None
    max_message_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.duration_s <= 0 or self.timeout_s <= 0:
            raise ValueError(f"concurrency >= 1 and positive durations required: {self}")


@dataclass(frozen=True)
class Call:
    """One finished call: when it started (s since the level began), how long it took, its status."""

    started_s: float
    latency_s: float
    code: str
    first_message_s: float | None = None  # streams only
    tokens: int = 0


@dataclass(frozen=True)
class Latency:
    """Milliseconds, over the calls of a level (OK and failed alike, as ghz does)."""

    average: float
    fastest: float
    slowest: float
    p50: float
    p90: float
    p95: float
    p99: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency | None:
        if not seconds:
            return None
        ms = np.asarray(seconds) * 1000.0
        p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
        return cls(*(round(float(x), 2) for x in (ms.mean(), ms.min(), ms.max(), p50, p90, p95, p99)))


@dataclass(frozen=True)
class LevelReport:
    """ghz's summary for one level: count, total time, rps, latency, status code distribution."""

    method: str
    concurrency: int
    count: int
    total_s: float
    rps: float
    latency_ms: Latency | None
    status_codes: dict[str, int]
    errors: int
    time_to_first_message_ms: Latency | None = None
    tokens_per_s: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Level:
    settings: LevelSettings
    started: float = field(default_factory=time.perf_counter)
    calls: list[Call] = field(default_factory=list)
    sent: int = 0

    def next_call(self, deadline: float) -> bool:
        """Whether a worker may start another call (and count it as started)."""
        limit = self.settings.max_calls
        if time.perf_counter() >= deadline or (limit is not None and self.sent >= limit):
            return False
        self.sent += 1
        return True


async def run_level(settings: LevelSettings, request: speculum_pb2.GenerateRequest) -> LevelReport:
    """Run one level against `settings.target` and summarise it."""
    options = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
    ]
    async with grpc.aio.insecure_channel(settings.target, options=options) as channel:
        stub = speculum_pb2_grpc.SpeculumStub(channel)
        level = _Level(settings)
        deadline = level.started + settings.duration_s
        await asyncio.gather(*(_worker(stub, request, level, deadline) for _ in range(settings.concurrency)))
        total_s = time.perf_counter() - level.started
    return summarise(settings, level.calls, total_s)


async def _worker(stub, request, level: _Level, deadline: float) -> None:
    while level.next_call(deadline):
        level.calls.append(await _call(stub, request, level))


async def _call(stub, request, level: _Level) -> Call:
    settings = level.settings
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    code = "OK"
    try:
        if settings.method is Method.GENERATE:
            reply = await stub.Generate(request, timeout=settings.timeout_s, metadata=settings.metadata)
            tokens = reply.usage.completion_tokens
        else:
            async for message in stub.GenerateStream(request, timeout=settings.timeout_s, metadata=settings.metadata):
                if first is None:
                    first = time.perf_counter() - started
                tokens += len(message.token_ids)
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
    return Call(started - level.started, time.perf_counter() - started, code, first, tokens)


def summarise(settings: LevelSettings, calls: Sequence[Call], total_s: float) -> LevelReport:
    codes = Counter(call.code for call in calls)
    ok = [call for call in calls if call.code == "OK"]
    firsts = [call.first_message_s for call in ok if call.first_message_s is not None]
    return LevelReport(
        method=settings.method.value,
        concurrency=settings.concurrency,
        count=len(calls),
        total_s=round(total_s, 3),
        rps=round(len(calls) / total_s, 3) if total_s > 0 else 0.0,
        latency_ms=Latency.of([call.latency_s for call in calls]),
        status_codes=dict(sorted(codes.items())),
        errors=len(calls) - len(ok),
        time_to_first_message_ms=Latency.of(firsts),
        tokens_per_s=round(sum(call.tokens for call in ok) / total_s, 2) if total_s > 0 else 0.0,
    )
