"""The Redis tier: one Redis string per block, shared by every server process that points at the same Redis.

    key:   <key_prefix>{<block hash hex>}      the braces are a Redis Cluster hash tag: each key is self-contained
    value: the entry bytes (opaque)            expiry: server-side (SET ... PX), so Redis itself drops old blocks

Contract (the Tier protocol): no method raises for backend trouble. A Redis that is unreachable at start, or goes
away mid-run, makes get() miss, contains() answer False and put() return False; each such call is counted in
num_failed_reads / num_failed_writes, and one warning is logged per outage (not one per call). After a failure the
tier does not touch the network again until retry_interval_s has passed, so a dead Redis costs nothing on the
request path; the first call after that probes Redis again, and when it answers the tier logs "reconnected" and
carries on. Construction never connects, so it never fails because Redis is down (a malformed URL still raises).
RedisGuard holds that part of the contract (back-off, one warning per outage, reconnect) for any user of a shared
Redis: this tier and the Responses API's shared store (server/response_store_redis.py).

Redis Cluster: a URL redis+cluster://HOST:PORT[,HOST:PORT...] (rediss+cluster:// for TLS; [USER:PASSWORD@] before the
first node) uses redis-py's RedisCluster; the nodes listed are only where the client learns the topology. Each key is
one entry and carries its block hash as hash tag, so an entry is always in one slot, and entries spread over the
masters.
Unlike a single Redis, construction does connect: a cluster that cannot be reached, or whose CLUSTER INFO is not
cluster_state:ok with all 16384 slots assigned, raises RedisClusterConfigError naming the problem (a server does not
start on a broken cluster). Later, a master that dies is "a Redis that went away": calls for keys in its slots fail
and are counted (the tier backs off as above, so a block is recomputed, never served damaged: entries are checksummed).

NOTE: stats().num_entries / num_bytes are a LOCAL ESTIMATE, not a SCAN of Redis: entries this process wrote minus
those it deleted. Overwrites of a key count again, and expiry and other processes' writes are not seen.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from promptstash.cache.tiers.base import TierStats
from promptstash.errors import PromptstashError

log = logging.getLogger("promptstash.tiers")

T = TypeVar("T")
# Everything a Redis call can raise for backend trouble (redis.ConnectionError / TimeoutError are RedisErrors).
# RedisClusterException (slots not covered, no node reachable) is not a RedisError.
BACKEND_ERRORS = (redis.RedisError, RedisClusterException, OSError)
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
NUM_SLOTS = 16384


class RedisClusterConfigError(PromptstashError, ValueError):
    """A redis+cluster:// URL that is malformed, or a cluster that is unreachable or not serving all slots at start."""


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], str | None, str | None, bool]:
    """redis+cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...][/0] -> (nodes, username, password, tls)."""
    scheme = next((s for s in CLUSTER_SCHEMES if url.startswith(s)), None)
    if scheme is None:
        raise RedisClusterConfigError("not a Redis Cluster URL (want redis+cluster://HOST:PORT[,HOST:PORT...])")
    rest = url[len(scheme):]
    rest, _, db = rest.partition("/")
    if db not in ("", "0"):
        raise RedisClusterConfigError(f"Redis Cluster has only database 0, the URL names /{db}")
    username = password = None
    if "@" in rest:
        creds, _, rest = rest.rpartition("@")
        user, colon, pw = creds.partition(":")
        username, password = user or None, (pw or None) if colon else None
    nodes = []
    for part in rest.split(","):
        host, _, port = part.strip().rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit():
            raise RedisClusterConfigError(f"cannot read cluster node {part!r} in the Redis Cluster URL; want HOST:PORT")
        nodes.append((host, int(port)))
    return nodes, username, password, scheme == "rediss+cluster://"


class RedisGuard:
    """A Redis client whose calls never raise for backend trouble: the module docstring's contract (back-off for
    retry_interval_s after a failure, one warning per outage, an info line when Redis answers again), for any user
    of a shared Redis. `label` names the user in those lines ("Redis tier at HOST:PORT/0 is unavailable ...").

    Construction connects only for a cluster (see connect()). Thread-safe.
    """

    def __init__(self, url: str, *, label: str, logger: logging.Logger = log, retry_interval_s: float = 5.0,
                 socket_timeout_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.logger = logger
        self.retry_interval_s = retry_interval_s
        self.clock = clock
        self.cluster = url.startswith(CLUSTER_SCHEMES)
        self.client = connect(url, socket_timeout_s)
        self.where = describe(url)
        self._lock = threading.Lock()
        self._down_until: float | None = None  # while set and in the future, calls skip the network
        self._outage = False  # a warning was logged and no call has succeeded since

    def backing_off(self) -> bool:
        with self._lock:
            return self._down_until is not None and self.clock() < self._down_until

    def call(self, op: Callable[[], T]) -> tuple[bool, T | None]:
        """(True, result) of a Redis call, or (False, None) if Redis is failing or backed off (never raises)."""
        if self.backing_off():
            return False, None
        try:
            result = op()
        except BACKEND_ERRORS as exc:
            self._failed(exc)
            return False, None
        with self._lock:
            self._down_until = None
            recovered, self._outage = self._outage, False
        if recovered:
            self.logger.info("%s at %s reconnected", self.label, self.where)
        return True, result

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self._down_until = self.clock() + self.retry_interval_s
            first, self._outage = not self._outage, True
        if first:
            self.logger.warning("%s at %s is unavailable (%s: %s); retrying every %.3g s, further errors are "
                                "counted, not logged", self.label, self.where, type(exc).__name__, exc,
                                self.retry_interval_s)
        try:  # drop idle connections: after a restart they are stale, and the next probe should dial afresh
            if self.cluster:
                self.client.disconnect_connection_pools()
            else:
                self.client.connection_pool.disconnect(inuse_connections=False)
        except BACKEND_ERRORS:
            pass

    def close(self) -> None:
        try:
            self.client.close()
            if not self.cluster:
                self.client.connection_pool.disconnect()
        except BACKEND_ERRORS:
            pass


class RedisTier:
    name = "redis"

    def __init__(self, url: str, *, key_prefix: str = "promptstash:kv:", default_ttl_s: float | None = 3600.0,
                 retry_interval_s: float = 5.0, socket_timeout_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.key_prefix = key_prefix
        self.default_ttl_s = default_ttl_s  # used when put() gets ttl_s=None; None here = no expiry
        self._guard = RedisGuard(url, label="Redis tier", retry_interval_s=retry_interval_s,
                                 socket_timeout_s=socket_timeout_s, clock=clock)
        self.cluster = self._guard.cluster
        self._client = self._guard.client
        self._call = self._guard.call
        self._lock = threading.Lock()
        self._stats = TierStats(self.name)

    @property
    def retry_interval_s(self) -> float:
        return self._guard.retry_interval_s

    @retry_interval_s.setter
    def retry_interval_s(self, seconds: float) -> None:
        self._guard.retry_interval_s = seconds

    def _key(self, block_hash: bytes) -> str:
        return f"{self.key_prefix}{{{block_hash.hex()}}}"

    # -- Tier ------------------------------------------------------------------------------------
    def get(self, block_hash: bytes) -> bytes | None:
        start = time.perf_counter()
        ok, data = self._call(lambda: self._client.get(self._key(block_hash)))
        with self._lock:
            if not ok:
                self._stats.num_failed_reads += 1
                self._stats.num_misses += 1
                return None
            if data is None:
                self._stats.num_misses += 1
                return None
            self._stats.num_hits += 1
            self._stats.load_seconds += time.perf_counter() - start
        return bytes(data)

    def contains(self, block_hash: bytes) -> bool:
        ok, n = self._call(lambda: self._client.exists(self._key(block_hash)))
        if not ok:
            with self._lock:
                self._stats.num_failed_reads += 1
            return False
        return bool(n)

    def contains_many(self, block_hashes: list[bytes]) -> list[bool]:
        """contains() for many blocks in one round trip (a pipeline of EXISTS)."""
        def op() -> list:
            pipe = self._client.pipeline(transaction=False)
            for h in block_hashes:
                pipe.exists(self._key(h))
            return pipe.execute()

        ok, found = self._call(op)
        if not ok:
            with self._lock:
                self._stats.num_failed_reads += 1
            return [False] * len(block_hashes)
        return [bool(n) for n in found]

    def put(self, block_hash: bytes, entry: bytes, ttl_s: float | None) -> bool:
        ttl = self.default_ttl_s if ttl_s is None else ttl_s
        if ttl is not None and ttl <= 0:  # already expired: nothing worth storing
            with self._lock:
                self._stats.num_refused_writes += 1
            return False
        px = None if ttl is None else max(1, round(ttl * 1000))
        ok, _ = self._call(lambda: self._client.set(self._key(block_hash), entry, px=px))
        with self._lock:
            if not ok:
                self._stats.num_failed_writes += 1
                return False
            self._stats.num_writes += 1
            self._stats.num_entries += 1
            self._stats.num_bytes += len(entry)
        return True

    def delete(self, block_hash: bytes) -> None:
        key = self._key(block_hash)

        def op() -> list:
            pipe = self._client.pipeline(transaction=True)
            pipe.strlen(key)
            pipe.delete(key)
            return pipe.execute()

        ok, result = self._call(op)
        with self._lock:
            if not ok or result is None:
                self._stats.num_failed_writes += 1
                return
            size, removed = result
            if removed:
                self._stats.num_entries = max(0, self._stats.num_entries - 1)
                self._stats.num_bytes = max(0, self._stats.num_bytes - int(size))

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(**self._stats.__dict__)

    def close(self) -> None:
        self._guard.close()


def connect(url: str, socket_timeout_s: float = 1.0) -> redis.Redis | RedisCluster:
    """A client of the Redis (redis://, rediss://, unix://) or Redis Cluster (redis+cluster://) at `url`.

    A single Redis is not contacted (a malformed URL raises ValueError); a cluster is, and one that cannot be
    used raises RedisClusterConfigError (see _connect_cluster). Every call fails after socket_timeout_s at most.
    """
    # NOTE: no client-side retries: redis-py's default retries with back-off would make every call to a dead
    # Redis slow. Callers back off on their own (the tier's retry_interval_s).
    if url.startswith(CLUSTER_SCHEMES):
        return _connect_cluster(url, socket_timeout_s)
    return redis.Redis.from_url(url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s,
                                retry=Retry(NoBackoff(), 0), retry_on_timeout=False)


def describe(url: str) -> str:
    """Where `url` points, for messages: host:port/db, or cluster host:port,...; never the password."""
    if url.startswith(CLUSTER_SCHEMES):
        return "cluster " + ",".join(f"{h}:{p}" for h, p in parse_cluster_url(url)[0])
    kw = redis.ConnectionPool.from_url(url).connection_kwargs
    return f"{kw.get('host', kw.get('path', '?'))}:{kw.get('port', '')}/{kw.get('db', 0)}"


def _connect_cluster(url: str, socket_timeout_s: float) -> RedisCluster:
    """A RedisCluster client of a cluster that answers and serves every slot, or RedisClusterConfigError."""
    nodes, username, password, tls = parse_cluster_url(url)
    where = ",".join(f"{h}:{p}" for h, p in nodes)
    try:
        # No client-side retries (as for a single Redis): the tier's back-off replaces them.
        client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], username=username,
                              password=password, ssl=tls, socket_timeout=socket_timeout_s,
                              socket_connect_timeout=socket_timeout_s, retry=Retry(NoBackoff(), 0),
                              require_full_coverage=True)
    except BACKEND_ERRORS as exc:
        raise RedisClusterConfigError(
            f"Redis Cluster at {where} cannot be used: {type(exc).__name__}: {exc} (is every node down or "
            f"unreachable, not cluster-enabled, or are slots unassigned?)") from exc
    try:
        info = client.cluster_info()
    except BACKEND_ERRORS as exc:
        client.close()
        raise RedisClusterConfigError(f"Redis Cluster at {where} does not answer CLUSTER INFO: {exc}") from exc
    state, assigned = info.get("cluster_state"), int(info.get("cluster_slots_assigned", 0))
    if state != "ok" or assigned < NUM_SLOTS:
        client.close()
        raise RedisClusterConfigError(
            f"Redis Cluster at {where} is not serving: cluster_state:{state}, {assigned} of {NUM_SLOTS} slots "
            f"assigned (missing slots; assign them, e.g. redis-cli --cluster fix)")
    return client
