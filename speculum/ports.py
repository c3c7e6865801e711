"""Picking free local TCP ports for processes started by the launcher and the tests.

Ports come from 20000-32767: below the kernel's ephemeral range (where Ray's own processes and
outgoing connections take random ports, which could steal a port picked a moment earlier) and
above Ray's default worker-port range (10002-19999).
"""

from __future__ import annotations

import random
import socket

LOW, HIGH = 20000, 32767


def free_port() -> int:
    """A port that is free on 127.0.0.1 and on all interfaces (IPv4 and IPv6) right now."""
    for _ in range(200):
        port = random.randint(LOW, HIGH)
        if _bindable(socket.AF_INET, "0.0.0.0", port) and _bindable(socket.AF_INET6, "::", port):
            return port
    raise RuntimeError(f"no free port in {LOW}-{HIGH}")


def _bindable(family: int, host: str, port: int) -> bool:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, port))
        return True
    except OSError:
        return False
