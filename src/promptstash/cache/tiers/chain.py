"""The tier chain: lookups go through the tiers in order; writes go to every tier from a background thread.

    lookup(h):  disk ──miss──> redis ──miss──> None        a hit in a lower tier is copied up (async)
    submit(h):  queue ──writer thread──> disk, redis       never on the request's critical path
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence

from promptstash.cache.tiers.base import Tier, TierStats

log = logging.getLogger("promptstash.tiers")

_STOP = object()


class TierChain:
    def __init__(self, tiers: Sequence[Tier], max_pending_writes: int = 512, sweep_interval_s: float = 30.0) -> None:
        self.tiers = list(tiers)
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending_writes)
        self.num_dropped_writes = 0  # the write queue was full
        self._writer = threading.Thread(target=self._write_loop, name="promptstash-tier-writer", daemon=True)
        self._writer.start()
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, args=(sweep_interval_s,),
                                         name="promptstash-tier-sweeper", daemon=True)
        self._sweeper.start()

    def num_leading(self, block_hashes: list[bytes]) -> int:
        """How many leading blocks of the list some tier holds (one round trip per tier where possible)."""
        present = [False] * len(block_hashes)
        for tier in self.tiers:
            todo = [i for i, p in enumerate(present) if not p]
            if not todo:
                break
            many = getattr(tier, "contains_many", None)
            hashes = [block_hashes[i] for i in todo]
            found = many(hashes) if many is not None else [tier.contains(h) for h in hashes]
            for i, f in zip(todo, found, strict=True):
                present[i] = f
        return next((i for i, p in enumerate(present) if not p), len(present))

    def lookup(self, block_hash: bytes) -> tuple[bytes, str] | None:
        """(entry, tier name) from the first tier that has it; copies a lower-tier hit to the tiers above."""
        for i, tier in enumerate(self.tiers):
            entry = tier.get(block_hash)
            if entry is not None:
                for upper in self.tiers[:i]:
                    self._enqueue((upper, block_hash, lambda e=entry: e, None))
                return entry, tier.name
        return None

    def submit(self, block_hash: bytes, make_entry: Callable[[], bytes], ttl_s: float | None) -> bool:
        """Write an entry to every tier, later; make_entry runs on the writer thread. False if dropped."""
        return self._enqueue((None, block_hash, make_entry, ttl_s))

    def _enqueue(self, item) -> bool:
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            self.num_dropped_writes += 1
            return False

    def delete(self, block_hash: bytes) -> None:
        for tier in self.tiers:
            tier.delete(block_hash)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until queued writes are done (at shutdown). True if the queue drained in time."""
        done = threading.Event()
        self._queue.put((None, None, done.set, None))
        return done.wait(timeout_s)

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            tier, block_hash, make_entry, ttl_s = item
            try:
                if block_hash is None:  # a flush marker
                    make_entry()
                    continue
                entry = make_entry()
                for t in [tier] if tier is not None else self.tiers:
                    t.put(block_hash, entry, ttl_s)
            except Exception:  # a tier must not raise; if one does, keep writing the others' entries
                log.exception("tier write failed")

    def _sweep_loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            for tier in self.tiers:
                sweep = getattr(tier, "sweep", None)
                if sweep is not None:
                    try:
                        sweep()
                    except Exception:
                        log.exception("tier sweep failed")

    def stats(self) -> list[TierStats]:
        return [t.stats() for t in self.tiers]

    def close(self, flush_timeout_s: float = 30.0) -> None:
        self.flush(flush_timeout_s)
        self._stop.set()
        self._queue.put(_STOP)
        self._writer.join(timeout=5)
        for tier in self.tiers:
            tier.close()
