"""`make soak`: minutes of mixed load on `speculum serve`'s stack, with one fault of each kind.

Load: `--clients` threads loop over a mix of requests to the public API: unary greedy (text, or an
image from a small set so the cache is hit), streamed greedy, streams cancelled after two messages,
calls with a deadline too short to finish, and sampled requests (not compared).
Faults, spread over the run (each announced when injected): Redis stopped then started, Redis
FLUSHALL, the drafter SIGKILLed then started again, the verifier SIGKILLed and restarted at once, the
vision encoder SIGKILLed then started again.
Every greedy answer is compared with the target alone in this process (no speculation). A call that
fails with UNAVAILABLE or RESOURCE_EXHAUSTED is retried after 0.5 s, as a client would, for up
to 60 s; a request never answered is lost.

Report: requests, answers, wrong and lost answers, every status seen (per fault window),
p50/p99 latency of answered greedy requests, mean accepted length per window, the RSS of each
service process at the start and at the end (processes restarted by a fault: right after their
restart and at the end), and the sessions the verifier and drafter still hold once the load stops.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import random
import statistics
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from orchestrator.engine import Engine, GenerateRequest
from orchestrator.public_api import request_to_proto
from speculum.config import SamplingParams, SpeculationParams
from speculum.launcher import LocalStack, StackConfig, rss_bytes
from speculum.paths import demo_drafter_dir, demo_target_dir, models_dir
from speculum.ports import free_port
from speculum.v1 import speculum_pb2_grpc

log = logging.getLogger("speculum.soak")

PROMPTS = ("How many objects are there?", "What shape is the red object?", "Read the letter in the image.",
           "Describe the image.")
TEXT_PROMPTS = ("Tell me about shapes.", "What is a circle?", "Count to five.")
RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
RETRY_FOR_S = 60.0
MEMORY_MARGIN_MB = 32  # allocator slack; a per-request leak over thousands of requests is far more
MAX_NEW_TOKENS = 32
KINDS = ("text", "image", "streamed", "cancel", "deadline", "sampled")
WEIGHTS = (3, 4, 2, 2, 1, 1)


@dataclass
class Window:
    """What clients saw while one fault (or none) was in effect."""

    name: str
    statuses: collections.Counter = field(default_factory=collections.Counter)
    answered: int = 0
    accepted_lengths: list[float] = field(default_factory=list)


@dataclass
class Record:
    started: float = field(default_factory=time.monotonic)
    requests: int = 0
    answered: int = 0
    wrong: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    windows: list[Window] = field(default_factory=lambda: [Window("warm-up")])
    failures: collections.Counter = field(default_factory=collections.Counter)  # status + details, retried or not
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def window(self) -> Window:
        return self.windows[-1]

    def enter(self, name: str) -> None:
        with self.lock:
            self.windows.append(Window(name))
        log.info("fault window: %s", name)


class Client:
    """One client thread's requests; every outcome goes into the shared record."""

    def __init__(self, address: str, references: dict, images: list[bytes], record: Record, seed: int):
        self.stub = speculum_pb2_grpc.SpeculumStub(grpc.insecure_channel(address))
        self.references = references
        self.images = images
        self.record = record
        self.rng = random.Random(seed)

    def run(self, until: float) -> None:
        while time.monotonic() < until:
            kind = self.rng.choices(KINDS, WEIGHTS)[0]
            try:
                getattr(self, f"_{kind}")()
            except Exception as exc:  # a bug in the soak itself must not pass silently
                with self.record.lock:
                    self.record.lost.append(f"{kind}: client error {exc!r}")

    def _greedy_request(self, with_image: bool) -> tuple[GenerateRequest, tuple[int, ...]]:
        if with_image:
            image = self.rng.randrange(len(self.images))
            prompt = self.rng.choice(PROMPTS)
            request = GenerateRequest(prompt, [self.images[image]], SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
            return request, self.references[(prompt, image)]
        prompt = self.rng.choice(TEXT_PROMPTS)
        return GenerateRequest(prompt, [], SamplingParams(max_new_tokens=MAX_NEW_TOKENS)), self.references[(prompt, None)]

    def _call(self, label: str, call, expected: tuple[int, ...] | None) -> None:
        """Run `call` (returns token ids and the accepted length) with retries; check the answer."""
        record = self.record
        with record.lock:
            record.requests += 1
        started = time.monotonic()
        while True:
            window = record.window
            try:
                tokens, accepted_length = call()
            except grpc.RpcError as exc:
                with record.lock:
                    window.statuses[exc.code().name] += 1
                    record.failures[f"{exc.code().name}: {(exc.details() or '')[:110]}"] += 1
                if exc.code() in RETRIED and time.monotonic() - started < RETRY_FOR_S:
                    time.sleep(0.5)
                    continue
                with record.lock:
                    record.lost.append(f"{label}: {exc.code().name} {exc.details()}")
                return
            with record.lock:
                window.statuses["OK"] += 1
                window.answered += 1
                record.answered += 1
                if expected is not None:
                    record.latencies.append(time.monotonic() - started)
                    window.accepted_lengths.append(accepted_length)
                    if tuple(tokens) != expected:
                        record.wrong.append(f"{label}: got {list(tokens)[:8]}..., expected {list(expected)[:8]}...")
            return

    def _unary(self, request: GenerateRequest, timeout: float = 120):
        reply = self.stub.Generate(request_to_proto(request), timeout=timeout)
        return reply.token_ids, reply.speculation.mean_accepted_length

    def _stream(self, request: GenerateRequest):
        messages = list(self.stub.GenerateStream(request_to_proto(request), timeout=120))
        if not messages:
            raise AssertionError("a stream ended OK without any message")
        return [t for m in messages for t in m.token_ids], messages[-1].speculation.mean_accepted_length

    def _text(self) -> None:
        request, expected = self._greedy_request(with_image=False)
        self._call("text", lambda: self._unary(request), expected)

    def _image(self) -> None:
        request, expected = self._greedy_request(with_image=True)
        self._call("image", lambda: self._unary(request), expected)

    def _streamed(self) -> None:
        request, expected = self._greedy_request(with_image=self.rng.random() < 0.5)
        self._call("streamed", lambda: self._stream(request), expected)

    def _cancel(self) -> None:
        """Read two messages, then cancel: the client sees CANCELLED, the stack frees the sessions."""
        request, _ = self._greedy_request(with_image=self.rng.random() < 0.5)
        call = self.stub.GenerateStream(request_to_proto(request), timeout=120)
        with self.record.lock:
            self.record.requests += 1
        try:
            for _ in range(2):
                next(call)
            call.cancel()
            status = "CANCELLED (by the client)"
        except grpc.RpcError as exc:  # a fault window: the call failed before the cancel
            status = f"{exc.code().name} (before the cancel)"
        except StopIteration:
            status = "OK (finished before the cancel)"
        with self.record.lock:
            self.record.window.statuses[status] += 1

    def _deadline(self) -> None:
        """A deadline far too short for the answer: DEADLINE_EXCEEDED, never a hang."""
        request, _ = self._greedy_request(with_image=False)
        with self.record.lock:
            self.record.requests += 1
        try:
            self._unary(GenerateRequest(request.prompt, [], SamplingParams(max_new_tokens=200)), timeout=0.05)
            status = "OK (within 0.05 s)"
        except grpc.RpcError as exc:
            status = f"{exc.code().name} (0.05 s deadline)"
        with self.record.lock:
            self.record.window.statuses[status] += 1

    def _sampled(self) -> None:
        request, _ = self._greedy_request(with_image=self.rng.random() < 0.5)
        sampled = GenerateRequest(request.prompt, request.images,
                                  SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.8, top_p=0.95))
        self._call("sampled", lambda: self._unary(sampled), None)


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def replica_pids() -> list[int]:
    """Our Ray Serve replica processes (by process title, descendants of this process)."""
    me, pids = os.getpid(), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if b"ServeReplica" not in (proc / "cmdline").read_bytes():
                continue
            pid = int(proc.name)
            while pid > 1 and pid != me:
                pid = _parent(pid)
        except (OSError, ValueError, IndexError):
            continue
        if pid == me:
            pids.append(int(proc.name))
    return pids


def memory(stack: LocalStack) -> dict[str, tuple[int, int]]:
    """RSS (bytes) and pid of each service process, the orchestrator replica(s) and Redis."""
    rows = {s.name: (s.rss_bytes(), s.process.pid) for s in stack.services}
    for i, pid in enumerate(replica_pids()):
        rows[f"orchestrator replica {i}"] = (rss_bytes(pid), pid)
    if stack.redis is not None and stack.redis.running:
        with stack.redis.client() as client:
            rows["redis"] = (int(client.info("memory")["used_memory_rss"]), 0)
    return rows


def inject_faults(stack: LocalStack, record: Record, duration_s: float, restarted: dict) -> None:
    """One fault of each kind at fixed fractions of the run."""
    start = record.started

    def at(fraction: float) -> None:
        time.sleep(max(0.0, start + fraction * duration_s - time.monotonic()))

    def restart(name: str, label: str, announce: bool = True) -> None:
        if announce:
            record.enter(f"{label} restarting")
        stack.service(name).start().wait_healthy(120)
        record.enter(f"{label} restarted")
        time.sleep(3)
        restarted[name] = stack.service(name).rss_bytes()

    def kill(name: str, label: str) -> None:
        record.enter(label)  # before the kill: what fails from now on belongs to this window
        stack.service(name).kill()

    at(0.10)
    record.enter("no fault")
    if stack.redis is not None:
        at(0.16)
        record.enter("Redis stopped")
        stack.redis.stop()
        at(0.24)
        stack.redis.start()
        record.enter("Redis started again (empty)")
        at(0.30)
        record.enter("Redis FLUSHALL")
        with stack.redis.client() as client:
            client.flushall()
    at(0.38)
    kill("draft", "drafter SIGKILLed")
    at(0.46)
    restart("draft", "drafter")
    at(0.56)
    kill("verify", "verifier SIGKILLed, restarting")
    restart("verify", "verifier", announce=False)
    at(0.70)
    kill("encoder", "encoder SIGKILLed")
    at(0.78)
    restart("encoder", "encoder")
    at(0.86)
    record.enter("no fault (end)")


def references(target_dir: Path, images: list[bytes]) -> dict:
    """Greedy answers of the target alone, in this process, for every prompt the clients send."""
    engine = Engine.from_pretrained(target_dir)
    alone = SpeculationParams(enabled=False)
    answers = {}
    for prompt in TEXT_PROMPTS:
        answers[(prompt, None)] = engine.generate(GenerateRequest(prompt, [], SamplingParams(max_new_tokens=MAX_NEW_TOKENS),
                                                                  alone)).token_ids
    for prompt in PROMPTS:
        for i, image in enumerate(images):
            request = GenerateRequest(prompt, [image], SamplingParams(max_new_tokens=MAX_NEW_TOKENS), alone)
            answers[(prompt, i)] = engine.generate(request).token_ids
    return answers


def report(record: Record, before: dict, after: dict, restarted: dict, args, elapsed: float) -> str:
    mb = 2**20
    latencies = sorted(record.latencies)
    lines = [f"soak: {elapsed / 60:.1f} min, {args.clients} clients, target {args.target}, drafter {args.drafter}",
             f"requests {record.requests} (cancelled and short-deadline ones included), answered "
             f"{record.answered} of those that wait for an answer, wrong {len(record.wrong)}, lost {len(record.lost)}"]
    if latencies:
        p50 = statistics.median(latencies)
        p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        lines.append(f"greedy answers: {len(latencies)}, latency p50 {p50:.2f} s, p99 {p99:.2f} s (retries included)")
    lines.append("\n| window | statuses seen | mean accepted length |\n|---|---|---|")
    for window in record.windows:
        statuses = ", ".join(f"{name} {count}" for name, count in window.statuses.most_common())
        tau = f"{statistics.mean(window.accepted_lengths):.2f}" if window.accepted_lengths else "-"
        lines.append(f"| {window.name} | {statuses or '-'} | {tau} |")
    lines.append("\n| process | RSS at start | after its restart | RSS at end | growth |\n|---|---|---|---|---|")
    growths = []
    for name, (rss, _) in after.items():
        start = f"{before[name][0] / mb:.0f} MB" if name in before else "-"
        middle = f"{restarted[name] / mb:.0f} MB" if name in restarted else "-"
        growths.append(growth_mb(name, rss, before, restarted))
        lines.append(f"| {name} | {start} | {middle} | {rss / mb:.0f} MB | {growths[-1]:+.0f} MB |")
    flat = memory_flat(before, after, restarted)
    lines.append(f"memory flat (growth since start or restart <= {MEMORY_MARGIN_MB} MB per process): {flat}")
    if record.failures:
        lines.append("\nfailed calls (each retried after 0.5 s):")
        lines += [f"  {count} x {what}" for what, count in record.failures.most_common(12)]
    for problem in (record.wrong + record.lost)[:20]:
        lines.append(f"problem: {problem}")
    return "\n".join(lines)


def sessions_live(stack: LocalStack, within_s: float = 30.0) -> dict[str, float]:
    """`speculum_sessions_live` of the verifier and the drafter once the load has stopped (waiting
    up to `within_s` for the last released sessions), read from their Prometheus endpoints."""
    from prometheus_client.parser import text_string_to_metric_families

    def read() -> dict[str, float]:
        live = {}
        for name in ("verify", "draft"):
            port = stack.metrics_ports.get(name)
            if port is None:
                continue
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                text = reply.read().decode()
            live[name] = sum(sample.value for family in text_string_to_metric_families(text)
                             if family.name == "speculum_sessions_live" for sample in family.samples)
        return live

    deadline = time.monotonic() + within_s
    live = read()
    while any(live.values()) and time.monotonic() < deadline:
        time.sleep(1.0)
        live = read()
    return live


def growth_mb(name: str, rss: int, before: dict, restarted: dict) -> float:
    """RSS growth since the start, or since its restart for a process a fault restarted."""
    baseline = restarted[name] if name in restarted else before.get(name, (rss, 0))[0]
    return (rss - baseline) / 2**20


def memory_flat(before: dict, after: dict, restarted: dict) -> bool:
    return all(growth_mb(name, rss, before, restarted) <= MEMORY_MARGIN_MB for name, (rss, _) in after.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--target", type=Path, default=demo_target_dir())
    parser.add_argument("--drafter", default=str(demo_drafter_dir()) if (demo_drafter_dir() / "config.json").is_file()
                        else "ngram")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    images = [path.read_bytes() for path in sorted((models_dir() / "demo" / "samples").glob("*.png"))[:3]]
    answers = references(args.target, images)
    duration_s = args.minutes * 60
    with LocalStack(StackConfig(args.target, args.drafter, port=free_port())) as stack:
        record = Record()
        until = record.started + duration_s
        clients = [Client(stack.address, answers, images, record, seed) for seed in range(args.clients)]
        threads = [threading.Thread(target=c.run, args=(until,), name=f"client{i}") for i, c in enumerate(clients)]
        for thread in threads:
            thread.start()
        time.sleep(min(10.0, 0.08 * duration_s))
        before = memory(stack)
        restarted: dict[str, int] = {}
        inject_faults(stack, record, duration_s, restarted)
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - record.started
        after = memory(stack)
        live = sessions_live(stack)
    print(report(record, before, after, restarted, args, elapsed), flush=True)
    print("sessions left after the load: " + (", ".join(f"{name} {count:.0f}" for name, count in live.items()) or "-"))
    return 1 if record.wrong or record.lost or not memory_flat(before, after, restarted) or any(live.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
