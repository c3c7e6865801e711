"""A local `redis-server` process: a free port, a temp dir, no persistence; stoppable and restartable.

`speculum serve` starts one when the binary exists and no Redis URL is configured; tests start
their own, isolated from any Redis already running on the machine.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from speculum.ports import free_port


def redis_binary() -> str | None:
    return shutil.which("redis-server")




class RedisServer:
    """`with RedisServer() as server:` ... `server.url`; `stop()` / `start()` keep the same port."""

    def __init__(self, port: int | None = None, startup_timeout_s: float = 10.0):
        binary = redis_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        self.port = port or free_port()
        self.startup_timeout_s = startup_timeout_s
        self._dir = tempfile.TemporaryDirectory(prefix="speculum-redis-")
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2.0)

    def start(self) -> RedisServer:
        """Start the server and return once it answers PING."""
        assert not self.running, "already running"
        log_path = Path(self._dir.name) / "redis.log"
        self._process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self._dir.name, "--daemonize", "no", "--logfile", str(log_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self.startup_timeout_s
        with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5) as client:
            while True:
                if self._process.poll() is not None:
                    log = log_path.read_text() if log_path.exists() else ""
                    raise RuntimeError(f"redis-server exited with {self._process.returncode}:\n{log}")
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer PING within {self.startup_timeout_s} s")
                time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s); its data is gone (no persistence)."""
        if self._process is None:
            return
        process, self._process = self._process, None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()
