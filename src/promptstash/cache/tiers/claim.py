"""The model claim: replicas that share a Redis (or Redis Cluster) KV tier agree on the model they serve.

    key:    promptstash:model        (one key; in a cluster, the slot of that key)
    value:  {"model_id": ..., "kv_layout": ..., "replica": ..., "ttl_s": ...}  (JSON)
    expiry: ttl_s (30 s by default) after its last refresh; every replica refreshes it every ttl_s / 3

Why: every block hash already folds in the model id and the KV layout (cache/hashing.py), so replicas of different
models (or of one model with other weights, block size or dtype) can never load each other's K/V. But they share
nothing either: such a fleet is misconfigured, and its replicas only evict each other's blocks. The claim turns that
into a clear error at start instead of a silent zero hit rate.

Contract:
  - claim() claims the key for this replica's (model_id, kv_layout) when it is free (SET ... PX), refreshes it when
    it holds the same pair (whichever replica wrote it: the value then names this replica), and raises
    ModelMismatchError, naming both models and layouts, the replica holding the claim and the Redis, when it holds
    another pair. Check and write are one Lua script, so two replicas starting at once cannot both win.
  - A Redis that cannot be reached never raises: claim() returns False and logs one warning per outage (as the
    Redis tier does: a dead Redis costs nothing). The refresh thread (start() / stop()) retries every ttl_s / 3
    and logs "claimed" once Redis answers.
  - A mismatch found by the refresh thread is logged as an error, once per other claim, and never stops the server
    (the hashes already keep the models apart).
  - Nothing deletes the claim: it expires ttl_s after the last replica of its model stopped refreshing it.

Replicas of different models can share one Redis server through different databases (redis://HOST:PORT/1): the
claim key lives in each database separately. A Redis Cluster has only database 0.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Any

import redis
from redis.cluster import RedisCluster

from promptstash.cache.tiers.redis_tier import (
    BACKEND_ERRORS,
    CLUSTER_SCHEMES,
    RedisClusterConfigError,
    connect,
    describe,
)
from promptstash.errors import PromptstashError

log = logging.getLogger("promptstash.tiers")

CLAIM_KEY = "promptstash:model"
DEFAULT_TTL_S = 30.0

# KEYS[1]: the claim key; ARGV: this claim's JSON, its model_id, its kv_layout, the expiry in ms.
# Returns nil when the key now holds this claim, else the other claim's value (left as it is).
_CLAIM_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, held = pcall(cjson.decode, current)
  if not (ok and type(held) == 'table' and held.model_id == ARGV[2] and held.kv_layout == ARGV[3]) then
    return current
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[4])
return false
"""


class ModelMismatchError(PromptstashError, ValueError):
    """The shared Redis is claimed by replicas of another model or KV layout (the message says what to do)."""


@dataclass(frozen=True)
class Holder:
    """Who holds a claim, as read from its value ("?" for a field it lacks or a value that is not a claim)."""

    model_id: str
    kv_layout: str
    replica: str
    ttl_s: float | None

    @classmethod
    def parse(cls, raw: bytes | str) -> Holder:
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            return cls("?", "?", "?", None)
        ttl = value.get("ttl_s")
        return cls(str(value.get("model_id", "?")), str(value.get("kv_layout", "?")), str(value.get("replica", "?")),
                   float(ttl) if isinstance(ttl, (int, float)) else None)


class ModelClaim:
    """This replica's claim on the Redis at `url` for (model_id, kv_layout); see the module docstring.

    Construction does not connect (a malformed URL still raises). Thread-safe.
    """

    def __init__(self, url: str, model_id: str, kv_layout: str, replica: str, *, ttl_s: float = DEFAULT_TTL_S,
                 key: str = CLAIM_KEY, socket_timeout_s: float = 1.0) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.url = url
        self.where = describe(url)
        self.model_id = model_id
        self.kv_layout = kv_layout
        self.replica = replica
        self.ttl_s = ttl_s
        self.key = key
        self.socket_timeout_s = socket_timeout_s
        self._value = json.dumps({"model_id": model_id, "kv_layout": kv_layout, "replica": replica, "ttl_s": ttl_s})
        self._client: redis.Redis | RedisCluster | None = None
        self._lock = threading.Lock()  # NOTE: one claim() at a time: the client and the log state below
        self._outage = False  # a warning was logged and no claim() has reached Redis since
        self._logged_mismatch: str | None = None  # the other claim last logged by the refresh thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def claim(self) -> bool:
        """Claim or refresh once: True when this replica's model holds the claim, False when Redis cannot be
        reached (logged once per outage). Raises ModelMismatchError when another model or layout holds it."""
        with self._lock:
            try:
                if self._client is None:
                    self._client = connect(self.url, self.socket_timeout_s)
                other = self._client.eval(_CLAIM_SCRIPT, 1, self.key, self._value, self.model_id, self.kv_layout,
                                          max(1, round(self.ttl_s * 1000)))
            except (*BACKEND_ERRORS, RedisClusterConfigError) as exc:
                self._unavailable(exc)
                return False
            if self._outage:
                self._outage = False
                log.info("model claim: Redis at %s answers again; %s holds it for %s (%s)", self.where, self.replica,
                         self.model_id, self.kv_layout)
            if other is not None:
                raise ModelMismatchError(self._mismatch_message(Holder.parse(other)))
            return True

    def start(self) -> None:
        """Refresh the claim every ttl_s / 3 on a daemon thread, the first time now (idempotent)."""
        with self._lock:
            if self._thread is not None:
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="promptstash-model-claim", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop refreshing and close the connection; the claim itself stays until it expires."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except BACKEND_ERRORS:
                pass

    # -- internals -------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                self.claim()
                if self._logged_mismatch is not None:
                    log.info("model claim on the Redis at %s is %s's again (%s, %s)", self.where, self.model_id,
                             self.replica, self.kv_layout)
                    self._logged_mismatch = None
            except ModelMismatchError as exc:
                if str(exc) != self._logged_mismatch:
                    log.error("%s (requests are unaffected: block hashes keep the models apart)", exc)
                    self._logged_mismatch = str(exc)
            except Exception:  # NOTE: the thread must outlive any surprise, or the claim silently lapses
                log.exception("model claim: unexpected error refreshing the claim on the Redis at %s", self.where)
            if self._stop.wait(self.ttl_s / 3):
                return

    def _unavailable(self, exc: BaseException) -> None:
        if not self._outage:
            self._outage = True
            log.warning("model claim: the Redis at %s is unavailable (%s: %s); the server runs anyway (block hashes "
                        "keep models apart) and retries the claim every %.3g s", self.where, type(exc).__name__, exc,
                        self.ttl_s / 3)
        client, self._client = self._client, None
        if client is not None:  # NOTE: dial afresh next time: after a restart its connections are stale
            try:
                client.close()
            except BACKEND_ERRORS:
                pass

    def _mismatch_message(self, holder: Holder) -> str:
        expiry = f"{holder.ttl_s:g} s" if holder.ttl_s is not None else "a while"
        elsewhere = ("another Redis Cluster (a cluster has only database 0)" if self.url.startswith(CLUSTER_SCHEMES)
                     else "another Redis or another database of this one (e.g. redis://HOST:PORT/1)")
        return (f"the shared Redis at {self.where} is claimed by replica {holder.replica!r} for model "
                f"{holder.model_id!r} (KV layout {holder.kv_layout}), but this replica ({self.replica}) serves model "
                f"{self.model_id!r} (KV layout {self.kv_layout}); replicas sharing a Redis must serve the same "
                f"model with the same KV layout. Point this replica at {elsewhere} with --redis-url, or stop the "
                f"other replicas: their claim expires {expiry} after the last of them stops")
