"""A real, throwaway redis-server for tests: loopback only, a free port, no persistence, in its own directory.

    server = RedisServer(tmp_path / "redis")   # started; server.url == "redis://127.0.0.1:PORT/0"
    server.stop(); server.start()              # Redis going away and coming back on the same port

If redis-server is not installed, constructing one skips the test (`make test` installs it).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis

SKIP_MESSAGE = ("redis-server is not installed, so the Redis tier tests are skipped; `make test` installs it "
                "(or: apt-get install redis-server)")


def redis_server_binary() -> str | None:
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if Path(p).exists()), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server process on 127.0.0.1:<port>; stop() and start() keep the port (and lose the data)."""

    def __init__(self, directory: str | Path | None = None, port: int | None = None, start: bool = True) -> None:
        binary = redis_server_binary()
        if binary is None:
            pytest.skip(SKIP_MESSAGE)
        self.binary = binary
        self._own_dir = directory is None
        self.dir = Path(tempfile.mkdtemp(prefix="promptstash-redis-") if directory is None else directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port() if port is None else port
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        if start:
            self.start()

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server (on the same port as before) and wait until it answers PING."""
        if self.proc is not None and self.proc.poll() is None:
            return
        log_path = self.dir / "redis.log"
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.dir)], stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not start:\n"
                                       + log_path.read_text(errors="replace")[-2000:])
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the server (idempotent); clients then get connection errors."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self) -> redis.Redis:
        """A raw client, to look at what a tier stored."""
        return redis.Redis.from_url(self.url)

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
