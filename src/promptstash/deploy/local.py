"""Replicas, HAProxy and Redis on one machine: what `promptstash route --replicas N` (and `make cluster`) starts to
try a multi-replica deployment, and what the cluster test and `bench cluster` run against.

    client --> HAProxy :PORT --affinity hash--> replica1 :PORT+1 --+
                                            --> replica2 :PORT+2 --+--> Redis (Cluster): the shared KV tier
                                            --> replica3 :PORT+3 --+    (+ the KV events stream, plain Redis)

Every process is a child of this one, logs to a file in `work_dir`, and is killed by close(). Nothing here is
needed to run replicas for real: there, each machine runs `promptstash serve --redis-url ...` and deploy/haproxy.cfg
names them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

from promptstash.deploy.haproxy import HAProxyConfig, HAProxyError, Replica, haproxy_binary, render
from promptstash.errors import PromptstashError

HOST = "127.0.0.1"
REDIS_MODES = ("cluster", "single", "none")


class DeploymentError(PromptstashError):
    """A process of the local deployment is missing or did not start."""


def free_port(avoid: Sequence[int] = ()) -> int:
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def redis_server_binary() -> str | None:
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if Path(p).exists()), None)


def redis_cli_binary() -> str | None:
    return shutil.which("redis-cli") or next(
        (p for p in ("/usr/bin/redis-cli", "/usr/local/bin/redis-cli") if Path(p).exists()), None)


def _stop(proc: subprocess.Popen | None, timeout_s: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


class RedisServer:
    """A redis-server on 127.0.0.1:<port>: no persistence, its own directory; stop() and start() keep the port
    (and lose the data), like a Redis that went away and came back."""

    def __init__(self, directory: str | Path | None = None, port: int | None = None, start: bool = True) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise DeploymentError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.binary = binary
        self._own_dir = directory is None
        self.dir = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="promptstash-redis-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port() if port is None else port
        self.url = f"redis://{HOST}:{self.port}/0"
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
                [self.binary, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
                 "--dir", str(self.dir)], stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        try:
            _wait_redis(self.port, lambda c: c.ping(), time.monotonic() + timeout_s, "answer PING", self.proc)
        except DeploymentError as exc:
            self.stop()
            raise DeploymentError(f"{exc}\n{log_path.read_text(errors='replace')[-2000:]}") from None

    def stop(self) -> None:
        """Stop the server (idempotent); clients then get connection errors."""
        proc, self.proc = self.proc, None
        _stop(proc)

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self) -> redis.Redis:
        """A raw client, to look at what was stored."""
        return redis.Redis.from_url(self.url)

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def free_cluster_port(avoid: Sequence[int] = ()) -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = free_port(avoid)
        if port + 10000 < 65536 and port_is_free(port + 10000):
            return port


class RedisClusterServers:
    """A Redis Cluster on loopback: `masters` cluster-enabled redis-servers in one directory, no replicas.

        cluster = RedisClusterServers(work / "cluster")  # created; cluster.url == "redis+cluster://127.0.0.1:P,..."
        cluster.kill(1)                                  # SIGKILL the second master (its slots are lost)

    create=False starts the nodes without `redis-cli --cluster create`, so no slot is assigned (a broken cluster).
    Nodes run with cluster-require-full-coverage no, so the other masters keep serving when one dies.
    """

    def __init__(self, directory: str | Path, masters: int = 3, create: bool = True, node_timeout_ms: int = 1000,
                 timeout_s: float = 20.0) -> None:
        server, cli = redis_server_binary(), redis_cli_binary()
        if server is None or cli is None:
            raise DeploymentError("redis-server / redis-cli are not installed (Debian: apt-get install redis-server)")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ports: list[int] = []
        for _ in range(masters):
            self.ports.append(free_cluster_port(self.ports))
        self.url = "redis+cluster://" + ",".join(f"{HOST}:{p}" for p in self.ports)
        self.procs: list[subprocess.Popen | None] = []
        try:
            for port in self.ports:
                node_dir = self.dir / str(port)
                node_dir.mkdir(exist_ok=True)
                with open(node_dir / "redis.log", "ab") as log:
                    self.procs.append(subprocess.Popen(
                        [server, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                         "--dir", str(node_dir), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                         "--cluster-node-timeout", str(node_timeout_ms), "--cluster-require-full-coverage", "no"],
                        stdout=log, stderr=subprocess.STDOUT, cwd=node_dir))
            deadline = time.monotonic() + timeout_s
            for port, proc in zip(self.ports, self.procs, strict=True):
                _wait_redis(port, lambda c: c.ping(), deadline, "answer PING", proc, self._logs)
            if create:
                subprocess.run([cli, "--cluster", "create", *(f"{HOST}:{p}" for p in self.ports),
                                "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True,
                               timeout=timeout_s)
                for port, proc in zip(self.ports, self.procs, strict=True):
                    _wait_redis(port, lambda c: c.cluster("INFO")["cluster_state"] == "ok", deadline,
                                "report cluster_state:ok", proc, self._logs)
        except BaseException:
            self.close()
            raise

    def _logs(self) -> str:
        return "\n".join((self.dir / str(p) / "redis.log").read_text(errors="replace")[-1000:]
                         for p in self.ports if (self.dir / str(p) / "redis.log").exists())

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


def _wait_redis(port: int, ready: Callable[[redis.Redis], bool], deadline: float, what: str,
                proc: subprocess.Popen | None = None, logs: Callable[[], str] = lambda: "") -> None:
    client = redis.Redis(host=HOST, port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        while True:
            with contextlib.suppress(redis.RedisError):
                if ready(client):
                    return
            if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
                raise DeploymentError(f"redis-server on port {port} did not {what}\n{logs()}".rstrip())
            time.sleep(0.05)
    finally:
        client.close()


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float, log_path: Path, what: str) -> float:
    """Poll `url` until it answers 200; seconds it took. DeploymentError (with the log's tail) if `proc` exits
    or the time runs out."""
    start = time.monotonic()
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - start
        if proc.poll() is not None or time.monotonic() - start > timeout_s:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
            state = f"exited with {proc.returncode}" if proc.poll() is not None else f"not ready in {timeout_s:.0f} s"
            raise DeploymentError(f"{what} {state}; its log ({log_path}) ends:\n{tail}")
        time.sleep(0.2)


class HAProxyProcess:
    """haproxy -db (foreground) with a rendered config in `work_dir`; its status page tells which replicas are up.

        proxy = HAProxyProcess(HAProxyConfig(replicas, bind=..., stats_bind=...), work_dir)
        proxy.start()                   # config checked (haproxy -c), process answering on the bind address
        proxy.wait_up({"replica1"})     # until its health checks route to these
    """

    def __init__(self, config: HAProxyConfig, work_dir: str | Path) -> None:
        if config.stats_bind is None:
            raise HAProxyError("HAProxyProcess needs a stats_bind address (it reads which replicas are up there)")
        binary = haproxy_binary()
        if binary is None:
            raise DeploymentError("haproxy is not installed (Debian: apt-get install haproxy; `make cluster` "
                                  "installs it)")
        self.binary = binary
        self.config = config
        self.work_dir = Path(work_dir)
        self.config_path = self.work_dir / "haproxy.cfg"
        self.log_path = self.work_dir / "haproxy.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.config.bind}"

    def start(self, timeout_s: float = 30.0) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(render(self.config))
        checked = subprocess.run([self.binary, "-c", "-f", str(self.config_path)], capture_output=True, text=True,
                                 timeout=timeout_s)
        if checked.returncode != 0:
            raise HAProxyError(f"haproxy rejected {self.config_path}:\n{checked.stdout}{checked.stderr}")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([self.binary, "-f", str(self.config_path), "-db"], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_http(f"http://{self.config.stats_bind}/", self.proc, timeout_s, self.log_path, "HAProxy")

    def servers(self) -> dict[str, str]:
        """Each replica's status as HAProxy sees it now ("UP", "DOWN", "UP 1/2", ...); {} when it does not answer."""
        try:
            text = httpx.get(f"http://{self.config.stats_bind}/;csv", timeout=2).text
        except httpx.HTTPError:
            return {}
        header, *rows = text.splitlines()
        columns = header.lstrip("# ").split(",")
        name, status = columns.index("svname"), columns.index("status")
        out = {}
        for row in rows:
            cols = row.split(",")
            if len(cols) > status and cols[0] == "replicas" and cols[name] not in ("FRONTEND", "BACKEND"):
                out[cols[name]] = cols[status]
        return out

    def servers_up(self) -> set[str]:
        return {name for name, status in self.servers().items() if status.startswith("UP")}

    def wait_up(self, names: set[str], timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not names <= self.servers_up():
            if time.monotonic() > deadline:
                raise DeploymentError(f"HAProxy does not see {sorted(names - self.servers_up())} up: "
                                      f"{self.servers()}")
            time.sleep(0.1)

    def wait_down(self, name: str, timeout_s: float = 30.0) -> float:
        """Seconds until HAProxy takes `name` out."""
        start = time.monotonic()
        while name in self.servers_up():
            if time.monotonic() - start > timeout_s:
                raise DeploymentError(f"HAProxy still routes to {name} after {timeout_s:.0f} s: {self.servers()}")
            time.sleep(0.05)
        return time.monotonic() - start

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        _stop(proc)


def served_format(log_text: str) -> tuple[str, str]:
    """(weights, activation dtype) from `promptstash serve`'s ready line."""
    found = re.findall(r"promptstash: serving .*?\((\S+) weights, (\S+) activations", log_text)
    if not found:
        raise DeploymentError("cannot find the weight format in the replica's ready line")
    weights, dtype = found[-1]
    return weights, dtype


@dataclass
class ReplicaProcess:
    name: str
    port: int
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class LocalDeployment:
    """N `promptstash serve` replicas, HAProxy in front (affinity or round robin) and Redis behind, all local.

        with LocalDeployment(3, work_dir=tmp) as d:   # started: d.url is HAProxy, d.replicas[i].url each replica
            d.kill_replica(1)                          # SIGKILL: HAProxy's health check takes it out
            d.set_routing(affinity=False)              # HAProxy restarted with round robin, replicas untouched

    redis: "cluster" (a 3-master Redis Cluster, the KV tier), "single" (one redis-server), "none" (no shared
    tier), or a redis:// / redis+cluster:// URL of a Redis already running. port: HAProxy's (replicas take the next
    ones); 0 = free ports, chosen as each process starts (and chosen again if another process takes one first).
    kv_events: replicas publish KV events to a plain redis-server started for them (README "KV events").
    serve_args go to every replica's `promptstash serve` (e.g. ["--model", DIR]); threads: each replica's torch
    threads (default: the cores shared out).
    """

    def __init__(self, num_replicas: int, *, work_dir: str | Path, port: int = 8000, redis_url: str = "cluster",
                 affinity: bool = True, kv_events: bool = False, serve_args: Sequence[str] = (),
                 threads: int | None = None, start_timeout_s: float = 300.0, stats_port: int | None = None,
                 log: Callable[[str], None] = lambda _: None) -> None:
        if num_replicas < 1:
            raise DeploymentError("--replicas must be at least 1")
        self.num_replicas = num_replicas
        self.work_dir = Path(work_dir)
        self.port = port  # 0: any free port (chosen when HAProxy starts)
        self._own_port = port != 0
        self._own_stats_port = stats_port is not None
        self.redis_mode = redis_url
        self.affinity = affinity
        self.kv_events = kv_events
        self.serve_args = list(serve_args)
        self.threads = threads or max(1, (os.cpu_count() or 1) // num_replicas)
        self.start_timeout_s = start_timeout_s
        self.stats_port = stats_port or 0
        self.log = log
        self.redis_url: str | None = None
        self.events_url: str | None = None
        self.replicas: list[ReplicaProcess] = []
        self._cluster: RedisClusterServers | None = None
        self._redis: RedisServer | None = None
        self._events: RedisServer | None = None
        self.haproxy: HAProxyProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    # -- start / stop ----------------------------------------------------------------------------
    def start(self) -> LocalDeployment:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if haproxy_binary() is None:
            raise DeploymentError("haproxy is not installed (Debian: apt-get install haproxy; `make cluster` "
                                  "installs it)")
        try:
            self._start_redis()
            for i in range(self.num_replicas):
                port = self.port + 1 + i if self.port else 0  # 0: chosen as it starts
                self.replicas.append(ReplicaProcess(f"replica{i + 1}", port,
                                                    self.work_dir / f"replica{i + 1}.log"))
            pending = self.replicas
            if "--weights" not in self.serve_args:
                # NOTE: `serve` picks its weight format by measuring at start, and replicas measuring at once on
                # shared cores could pick differently: different K/V, no sharing (the claim refuses them). The
                # first replica picks; the others are told its choice.
                self.start_replica(self.replicas[0])
                self._wait_ready(self.replicas[0])
                weights, dtype = served_format(self.replicas[0].log_path.read_text(errors="replace"))
                self.serve_args += ["--weights", weights, "--dtype", dtype]
                self.log(f"replicas serve {weights} weights, {dtype} activations (what {self.replicas[0].name} "
                         "picked)")
                pending = self.replicas[1:]
            for replica in pending:
                self.start_replica(replica)
            for replica in pending:
                self._wait_ready(replica)
            self.set_routing(self.affinity)
        except BaseException:
            self.close()
            raise
        return self

    def _wait_ready(self, replica: ReplicaProcess, attempts: int = 3) -> None:
        """Wait for a started replica; one that lost its port to another process while it loaded (EADDRINUSE) is
        started again on another port."""
        for attempt in range(attempts):
            assert replica.proc is not None
            try:
                took = wait_http(replica.url + "/health", replica.proc, self.start_timeout_s, replica.log_path,
                                 f"replica {replica.name}")
            except DeploymentError as exc:
                if attempt + 1 == attempts or "address already in use" not in str(exc):
                    raise
                self.log(f"{replica.name}: port {replica.port} was taken while it loaded; starting it again")
                replica.port = 0
                self.start_replica(replica)
                continue
            self.log(f"{replica.name} ready at {replica.url} ({took:.0f} s)")
            return

    def _start_redis(self) -> None:
        mode = self.redis_mode
        if mode == "cluster":
            self._cluster = RedisClusterServers(self.work_dir / "redis-cluster")
            self.redis_url = self._cluster.url
        elif mode == "single":
            self._redis = RedisServer(self.work_dir / "redis")
            self.redis_url = self._redis.url
        elif mode == "none":
            self.redis_url = None
        elif mode.startswith(("redis://", "rediss://", "redis+cluster://", "rediss+cluster://", "unix://")):
            self.redis_url = mode
        else:
            raise DeploymentError(f"--redis must be one of {', '.join(REDIS_MODES)} or a Redis URL, not {mode!r}")
        if self.redis_url:
            self.log(f"shared KV tier: {self.redis_url}")
        if self.kv_events:
            if self.redis_url and "cluster" not in self.redis_url.partition("://")[0]:
                self.events_url = self.redis_url
            else:
                self._events = RedisServer(self.work_dir / "redis-events")
                self.events_url = self._events.url
            self.log(f"KV events: stream promptstash:kv-events on {self.events_url}")

    def replica_command(self, replica: ReplicaProcess) -> list[str]:
        cmd = [sys.executable, "-m", "promptstash.cli", "serve", "--host", HOST, "--port", str(replica.port),
               "--replica-id", replica.name, "--threads", str(self.threads), "--no-disk-cache"]
        if self.redis_url:
            cmd += ["--redis-url", self.redis_url]
        if self.events_url:
            cmd += ["--kv-events", "--kv-events-url", self.events_url]
        return cmd + self.serve_args

    def start_replica(self, replica: ReplicaProcess) -> None:
        """Start (or restart) one replica; does not wait for it."""
        if replica.alive:
            return
        if not replica.port or not port_is_free(replica.port):
            replica.port = free_port([self.port, self.stats_port, *(r.port for r in self.replicas)])
        with open(replica.log_path, "ab") as log:
            replica.proc = subprocess.Popen(self.replica_command(replica), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                            start_new_session=True)

    def set_routing(self, affinity: bool, num_replicas: int | None = None) -> None:
        """(Re)start HAProxy with affinity routing or round robin over the first `num_replicas` replicas (all by
        default); the replicas and their caches are untouched."""
        self.affinity = affinity
        if self.haproxy is not None:
            self.haproxy.stop()
        routed = self.replicas[:num_replicas] if num_replicas else self.replicas
        for attempt in range(3):
            if not self._own_port and (attempt or not self.port or not port_is_free(self.port)):
                self.port = free_port([self.stats_port, *(r.port for r in self.replicas)])
            if not self._own_stats_port and (attempt or not self.stats_port or not port_is_free(self.stats_port)):
                self.stats_port = free_port([self.port, *(r.port for r in self.replicas)])
            config = HAProxyConfig(tuple(Replica(r.name, HOST, r.port) for r in routed), bind=f"{HOST}:{self.port}",
                                   affinity=affinity, stats_bind=f"{HOST}:{self.stats_port}")
            self.haproxy = HAProxyProcess(config, self.work_dir)
            try:
                self.haproxy.start()
                break
            except DeploymentError as exc:
                # NOTE: a port chosen here can be taken by another process before HAProxy binds it; ports the
                # caller chose are never changed
                if attempt == 2 or "bind" not in str(exc) or (self._own_port and self._own_stats_port):
                    raise
        self.haproxy.wait_up({r.name for r in routed if r.alive})
        self.log(f"HAProxy at {self.url} ({'affinity' if affinity else 'round robin'}; config "
                 f"{self.haproxy.config_path})")

    def kill_replica(self, index: int) -> None:
        """SIGKILL one replica (no shutdown: in-flight requests lose their connection)."""
        replica = self.replicas[index]
        if replica.proc is not None and replica.proc.poll() is None:
            replica.proc.kill()
            replica.proc.wait(timeout=30)

    def close(self) -> None:
        if self.haproxy is not None:
            self.haproxy.stop()
        for replica in self.replicas:
            _stop(replica.proc, timeout_s=30)
        for server in (self._cluster, self._redis, self._events):
            if server is not None:
                server.close()
        self._cluster = self._redis = self._events = None

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
