"""KV events for external routers: which block hashes this replica's pool holds, as a Redis Stream.

    cache manager (under the engine lock)          flusher thread                       Redis
    stored(h) / removed(h) ──O(1)──> buffer ──every 50 ms──> one XADD per batch ──> promptstash:kv-events

Entry fields (all strings):

    replica   the replica id (--replica-id)
    seq       after this entry, the replica's stored set is the one it had after its event number `seq`
              (events are numbered 1, 2, ... per replica run; a batch holds consecutive ones)
    prev      seq of the replica's previous entry ("0" for its first): a consumer that saw another seq last
              for this replica has missed entries (trimmed, or a failed write) and should resync
    reset     "1": drop everything known of this replica first; the batch starts with ["cleared"] and lists
              every stored hash (sent at startup and after events were lost); else "0"
    ts        Unix seconds (float) when the batch was sent
    events    compact JSON: [["cleared"], ["stored", "<hash hex>"], ["removed", "<hash hex>"], ...] in order

Hashes are the blocks' chained blake2b-128 hashes (cache/hashing.py) in hex: the model, KV layout and tenant
namespace are folded into them, so no tenant name, token id or text ever leaves the replica.

NOTE: never blocks or fails a request: the manager only appends to a bounded buffer; a Redis that is down
drops batches (counted in num_dropped), and the next batch that gets through is a full snapshot (reset).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("promptstash.kv_events")

STREAM = "promptstash:kv-events"
STREAM_MAXLEN = 100_000  # entries, trimmed approximately (MAXLEN ~)


def digest(hashes: Iterable[bytes | str]) -> str:
    """The summary digest of a set of block hashes (raw bytes or hex): sha256 over the sorted raw hashes."""
    raw = sorted(bytes.fromhex(h) if isinstance(h, str) else h for h in hashes)
    return hashlib.sha256(b"".join(raw)).hexdigest()


@dataclass(frozen=True)
class Summary:
    replica: str
    num_blocks: int
    digest: str
    seq: int  # the last event recorded: the stream reproduces this set once it has carried this seq
    hashes: tuple[str, ...] | None = None  # hex, sorted (full=True)


class Publisher(Protocol):
    def publish(self, fields: Mapping[str, str]) -> None:
        """Append one entry; raise on failure."""
        ...

    def close(self) -> None: ...


class RedisStreamPublisher:
    """XADD to one stream with approximate MAXLEN trimming; a client of its own (not the Redis tier's)."""

    def __init__(self, url: str, stream: str = STREAM, maxlen: int = STREAM_MAXLEN, timeout_s: float = 1.0) -> None:
        import redis

        self.stream = stream
        self.maxlen = maxlen
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    def publish(self, fields: Mapping[str, str]) -> None:
        self.client.xadd(self.stream, dict(fields), maxlen=self.maxlen, approximate=True)

    def close(self) -> None:
        self.client.close()


class KVEventSink:
    """Records stored / removed block hashes and sends them in batches from a background thread.

    stored() / removed() are O(1) (a short lock, a set update and a deque append). The sink mirrors the
    stored set, so summary() is consistent with `seq`, and a batch after lost events can be a snapshot.
    """

    def __init__(self, publisher: Publisher, replica: str, *, interval_s: float = 0.05, max_buffer: int = 100_000,
                 max_batch: int = 4096, retry_s: float = 1.0) -> None:
        self.publisher = publisher
        self.replica = replica
        self.interval_s = interval_s
        self.max_buffer = max_buffer
        self.max_batch = max_batch
        self.retry_s = retry_s
        self._lock = threading.Lock()
        self._stored: set[bytes] = set()
        self._buffer: deque[tuple[str, bytes]] = deque()
        self._seq = 0  # events recorded
        self._resync = True  # the next batch is a snapshot with reset (startup: consumers drop stale state)
        self._prev = 0  # seq of the last entry published
        self.num_published = 0  # events sent
        self.num_dropped = 0  # events lost to a full buffer or a failed write (covered by the next snapshot)
        self.num_batches = 0
        self.num_failed_batches = 0
        self._send_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._down_since: float | None = None

    # -- recording (the cache manager, under the engine lock) ---------------------------------------
    def stored(self, block_hash: bytes) -> None:
        with self._lock:
            self._stored.add(block_hash)
            self._record("stored", block_hash)

    def removed(self, block_hash: bytes) -> None:
        with self._lock:
            self._stored.discard(block_hash)
            self._record("removed", block_hash)

    def seed(self, hashes: Iterable[bytes]) -> None:
        """Blocks already stored when the sink is attached (sent with the startup snapshot)."""
        with self._lock:
            for h in hashes:
                self._stored.add(h)
                self._seq += 1
            self._resync = True
            self._buffer.clear()

    def _record(self, kind: str, block_hash: bytes) -> None:
        self._seq += 1
        if self._resync:  # the snapshot will cover it
            self.num_dropped += 1
        elif len(self._buffer) >= self.max_buffer:
            self.num_dropped += len(self._buffer) + 1
            self._buffer.clear()
            self._resync = True
        else:
            self._buffer.append((kind, block_hash))

    def summary(self, full: bool = False) -> Summary:
        with self._lock:
            stored, seq = list(self._stored), self._seq
        hashes = tuple(sorted(h.hex() for h in stored)) if full else None
        return Summary(self.replica, len(stored), digest(stored), seq, hashes)

    # -- sending -----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="promptstash-kv-events", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop:
                break
            while self.flush_once() and not self._stop:
                pass
            if self._down_since is not None:
                self._wake.wait(self.retry_s)

    def flush_once(self) -> bool:
        """Send one batch if there is one; True if one was sent and more may be waiting."""
        with self._send_lock:
            with self._lock:
                if self._resync:
                    events: list[list[str]] = [["cleared"]] + [["stored", h.hex()] for h in self._stored]
                    reset, self._resync = True, False
                    self._buffer.clear()
                else:
                    if not self._buffer:
                        return False
                    n = min(len(self._buffer), self.max_batch)
                    taken = [self._buffer.popleft() for _ in range(n)]
                    events = [[kind, h.hex()] if h else [kind] for kind, h in taken]
                    reset = False
                seq = self._seq - len(self._buffer)
                more = bool(self._buffer)
            fields = {"replica": self.replica, "seq": str(seq), "prev": str(self._prev), "reset": "1" if reset else "0",
                      "ts": f"{time.time():.6f}", "events": json.dumps(events, separators=(",", ":"))}
            try:
                self.publisher.publish(fields)
            except Exception as exc:  # noqa: BLE001 - any failure: drop, count, resync later
                with self._lock:
                    if not reset:  # a snapshot holds no events of its own: they were counted when recorded
                        self.num_dropped += len(events)
                    self._resync = True
                self.num_failed_batches += 1
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning("KV events: cannot publish to Redis (%s); events are dropped and a snapshot "
                                "follows once it is back", exc)
                return False
            if self._down_since is not None:
                log.warning("KV events: Redis is back after %.1f s; sent a snapshot",
                            time.monotonic() - self._down_since)
                self._down_since = None
            self._prev = seq
            self.num_batches += 1
            self.num_published += len(events)
            return more

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Send everything recorded so far (True if the buffer emptied in time and nothing needs a resync)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.flush_once()
            with self._lock:
                if not self._buffer and not self._resync:
                    return True
            time.sleep(0.01)
        return False

    def close(self, timeout_s: float = 5.0) -> None:
        """Tell consumers this replica's blocks are gone (["cleared"]), send what is left, stop."""
        with self._lock:
            self._stored.clear()
            self._seq += 1
            if not self._resync:
                self._buffer.append(("cleared", b""))
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        self.flush(timeout_s)
        self.publisher.close()

    def stats(self) -> dict[str, Any]:
        return {"replica": self.replica, "seq": self._seq, "published_seq": self._prev,
                "num_published": self.num_published, "num_dropped": self.num_dropped,
                "num_batches": self.num_batches, "num_failed_batches": self.num_failed_batches}


def replay_events(entries: Iterable[tuple[Any, Mapping[Any, Any]]]) -> dict[str, set[str]]:
    """The reference consumer: stream entries (as XRANGE returns them, bytes or str) -> replica -> stored
    hashes (hex). Raises ValueError on a gap in a replica's chain of entries (missed entries: resync)."""
    state: dict[str, set[str]] = {}
    last: dict[str, int] = {}
    for _entry_id, raw in entries:
        fields = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                  for k, v in raw.items()}
        replica = fields["replica"]
        if fields["reset"] == "1":
            state[replica] = set()
        elif replica in last and int(fields["prev"]) != last[replica]:
            raise ValueError(f"replica {replica!r}: entries missing after seq {last[replica]}")
        stored = state.setdefault(replica, set())
        for event in json.loads(fields["events"]):
            if event[0] == "stored":
                stored.add(event[1])
            elif event[0] == "removed":
                stored.discard(event[1])
            elif event[0] == "cleared":
                stored.clear()
        last[replica] = int(fields["seq"])
    return state
