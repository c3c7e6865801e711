"""`speculum serve`'s stack in a child process, for the benchmarks that call it.

Ray's driver (the process that calls ray.init) runs background threads of its own; in the
benchmark's process they would take CPU from whatever it measures there (the in-process engine,
or the client loop). In a child, the benchmark's process only sends requests.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from contextlib import contextmanager

from speculum.launcher import LocalStack, StackConfig


def _serve(config: StackConfig, ready, stop) -> None:
    os.sched_setaffinity(0, range(os.cpu_count() or 1))  # the services pin themselves; Ray floats
    with LocalStack(config) as stack:
        ready.put((stack.address, dict(stack.metrics_ports)))
        stop.wait()


@contextmanager
def stack_in_child(config: StackConfig, start_timeout_s: float = 600) -> Iterator[tuple[str, dict[str, int]]]:
    """Yields the stack's public address and its parts' /metrics ports; stops it on exit."""
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Queue(), context.Event()
    child = context.Process(target=_serve, args=(config, ready, stop))
    child.start()
    try:
        yield ready.get(timeout=start_timeout_s)
    finally:
        stop.set()
        child.join(120)
        if child.is_alive():
            child.terminate()
