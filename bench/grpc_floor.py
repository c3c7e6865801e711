"""The floor of one Python gRPC exchange between two processes on this machine (for issue 5's split cost).

A bare server (no servicer logic: it echoes 200-byte messages) runs in a child process pinned to
core 1, the client on core 0, as the drafter and the verifier are pinned. Reports the median round
trip of a unary call and of one message each way on a long-lived bidi stream (what a DraftRounds
round costs at the least), after a warm-up.
Usage: python -m bench.grpc_floor [--exchanges 2000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import statistics
import time
from concurrent import futures

import grpc

from speculum.ports import free_port

SERVICE = "speculum.bench.Echo"


def _same(message: bytes) -> bytes:
    return message


def _serve(port: int, ready) -> None:
    os.sched_setaffinity(0, {1 % (os.cpu_count() or 1)})

    def stream(requests, context):
        yield from requests

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(lambda message, context: message, _same, _same),
        "Stream": grpc.stream_stream_rpc_method_handler(stream, _same, _same),
    })
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    ready.set()
    server.wait_for_termination()


def measure(exchanges: int) -> dict[str, float]:
    port = free_port()
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    child = context.Process(target=_serve, args=(port, ready), daemon=True)
    child.start()
    try:
        ready.wait(60)
        os.sched_setaffinity(0, {0})
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(30)
        payload = b"x" * 200
        unary = channel.unary_unary(f"/{SERVICE}/Unary", _same, _same)
        times = []
        for _ in range(exchanges):
            started = time.perf_counter()
            unary(payload)
            times.append(time.perf_counter() - started)
        unary_ms = 1000 * statistics.median(times[exchanges // 10:])
        outbox: queue.SimpleQueue = queue.SimpleQueue()
        replies = channel.stream_stream(f"/{SERVICE}/Stream", _same, _same)(iter(outbox.get, None))
        times = []
        for _ in range(exchanges):
            started = time.perf_counter()
            outbox.put(payload)
            next(replies)
            times.append(time.perf_counter() - started)
        outbox.put(None)
        return {"unary_ms": unary_ms, "stream_exchange_ms": 1000 * statistics.median(times[exchanges // 10:])}
    finally:
        child.terminate()
        child.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchanges", type=int, default=2000)
    args = parser.parse_args()
    result = measure(args.exchanges)
    print(f"bare Python gRPC, client core 0, server core 1, 200-byte messages, median of {args.exchanges}: "
          f"unary call {result['unary_ms']:.3f} ms, "
          f"one exchange on a bidi stream {result['stream_exchange_ms']:.3f} ms")


if __name__ == "__main__":
    main()
