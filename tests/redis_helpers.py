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


def redis_cli_binary() -> str | None:
    return shutil.which("redis-cli") or next(
        (p for p in ("/usr/bin/redis-cli", "/usr/local/bin/redis-cli") if Path(p).exists()), None)


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 >= 65536:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class RedisClusterServers:
    """A throwaway Redis Cluster on loopback: `masters` cluster-enabled redis-servers in one directory.

        cluster = RedisClusterServers(tmp_path / "cluster")  # created; cluster.url == "redis+cluster://127.0.0.1:P,..."
        cluster.kill(1)                                       # SIGKILL the second master (its slots are lost)

    create=False starts the nodes without `redis-cli --cluster create`, so no slot is assigned (a broken cluster).
    Nodes run with cluster-require-full-coverage no, so the other masters keep serving when one dies.
    """

    def __init__(self, directory: str | Path, masters: int = 3, create: bool = True, node_timeout_ms: int = 1000,
                 timeout_s: float = 20.0) -> None:
        server, cli = redis_server_binary(), redis_cli_binary()
        if server is None or cli is None:
            pytest.skip("redis-server / redis-cli are not installed, so the Redis Cluster tests are skipped; "
                        "`make redis` installs them (or: apt-get install redis-server redis-tools)")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ports = [free_cluster_port() for _ in range(masters)]
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)
        self.procs: list[subprocess.Popen | None] = []
        try:
            for port in self.ports:
                node_dir = self.dir / str(port)
                node_dir.mkdir(exist_ok=True)
                with open(node_dir / "redis.log", "ab") as log:
                    self.procs.append(subprocess.Popen(
                        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                         "--dir", str(node_dir), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                         "--cluster-node-timeout", str(node_timeout_ms), "--cluster-require-full-coverage", "no"],
                        stdout=log, stderr=subprocess.STDOUT, cwd=node_dir))
            deadline = time.monotonic() + timeout_s
            for port in self.ports:
                self._wait(lambda c: c.ping(), port, deadline, "answer PING")
            if create:
                subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                                "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True,
                               timeout=timeout_s)
                for port in self.ports:
                    self._wait(lambda c: c.cluster("INFO")["cluster_state"] == "ok", port, deadline,
                               "report cluster_state:ok")
        except BaseException:
            self.close()
            raise

    def _wait(self, ready, port: int, deadline: float, what: str) -> None:
        client = redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                try:
                    if ready(client):
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    logs = "\n".join((self.dir / str(p) / "redis.log").read_text(errors="replace")[-1000:]
                                     for p in self.ports)
                    raise RuntimeError(f"cluster node on port {port} did not {what}:\n{logs}")
                time.sleep(0.05)
        finally:
            client.close()

    def client(self, index: int) -> redis.Redis:
        """A plain client of one node (to count its keys)."""
        return redis.Redis(port=self.ports[index], socket_timeout=2, socket_connect_timeout=2)

    def kill(self, index: int) -> None:
        """SIGKILL one node: no shutdown, its data and slots are gone."""
        proc, self.procs[index] = self.procs[index], None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def close(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            if proc is not None:
                proc.wait(timeout=10)
        self.procs = []
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisClusterServers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
