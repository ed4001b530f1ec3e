"""The bridge between the pool's K/V tensors and the tier chain (the cache manager's BlockStore).

    save:  pool slots of block b ──copy (engine thread)──> [2, layers, block_size, kv_heads, head_dim]
           ──encode + write (tier writer thread)──> disk, redis
    load:  tier entry ──decode + verify──> tensor ──copy──> pool slots     (the next entry is read meanwhile)

NOTE: load() runs on the engine's loader thread, never under the engine lock: the pool blocks it writes
are reserved for it (referenced, unpublished), so no request reads or reuses them until it returns.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Protocol

import torch

from promptstash.cache.tiers.base import TierStats
from promptstash.cache.tiers.chain import TierChain
from promptstash.cache.tiers.entry import CorruptEntryError, EntryMeta, decode, encode
from promptstash.cache.ttl import TTL_SECONDS

log = logging.getLogger("promptstash.tiers")
PREFETCH = 8  # entries read ahead of the one being copied into the pool
# While other requests are being computed, a load works at most this share of its time: its reads and copies
# compete with their decode steps for cores and memory bandwidth (measured in `bench tiers`).
LOAD_DUTY_CYCLE = 0.25
READER_THREADS = 2  # measured best on 2 cores (4 threads: 0.38 s, 2: 0.24 s for 512 Redis blocks)


def lower_thread_priority() -> None:
    """Run the calling thread at the lowest CPU priority (Linux: per-thread nice 19; elsewhere a no-op).

    Tier loads compete for the CPU with running requests' decode steps; at nice 19 they only take what
    decoding leaves, so a long load slows itself rather than everyone's tokens.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


def _numpy_views(*tensors: torch.Tensor) -> tuple | None:
    """numpy views of CPU tensors (bfloat16 as int16: the same bytes), or None if one is not on the CPU."""
    if any(t.device.type != "cpu" for t in tensors):
        return None
    return tuple((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy() for t in tensors)


class KVTensors(Protocol):
    """The pool's K/V storage: k and v are [layers, num_blocks * block_size, kv_heads, head_dim]."""

    k: torch.Tensor
    v: torch.Tensor
    block_size: int


class KVStore:
    def __init__(self, kv: KVTensors, chain: TierChain, model_id: str, kv_layout: str,
                 storage_dtype: torch.dtype | None = None) -> None:
        """storage_dtype: the dtype entries are stored in (None = the pool's, which keeps reuse exact)."""
        self.kv = kv
        self.chain = chain
        self.storage_dtype = storage_dtype or kv.k.dtype
        num_layers, _, num_heads, head_dim = kv.k.shape
        self.meta = EntryMeta(model_id=model_id, kv_layout=kv_layout, num_layers=num_layers,
                              shape=(2, num_layers, kv.block_size, num_heads, head_dim),
                              dtype=str(self.storage_dtype).removeprefix("torch."), num_tokens=kv.block_size)
        self._reader = ThreadPoolExecutor(max_workers=READER_THREADS, thread_name_prefix="promptstash-tier-reader",
                                          initializer=lower_thread_priority)
        self._lock = threading.Lock()
        self._corrupt: dict[str, int] = {}  # tier name -> damaged entries found by load()
        self._loaded: dict[str, int] = {}  # tier name -> entries copied into the pool

    def _slots(self, block_id: int) -> slice:
        bs = self.kv.block_size
        return slice(block_id * bs, (block_id + 1) * bs)

    # -- BlockStore ------------------------------------------------------------------------------
    def save(self, block_id: int, block_hash: bytes, ttl_class: str | None) -> None:
        s = self._slots(block_id)
        block = torch.stack([self.kv.k[:, s], self.kv.v[:, s]]).to(device="cpu", dtype=self.storage_dtype,
                                                                    copy=True)
        meta = self.meta

        def make_entry() -> bytes:
            payload = block.contiguous().view(torch.uint8).numpy().tobytes()
            return encode(block_hash, meta, payload, None if ttl_class is None
                          else time.time() + TTL_SECONDS[ttl_class])

        self.chain.submit(block_hash, make_entry, None if ttl_class is None else TTL_SECONDS[ttl_class])

    def num_leading(self, block_hashes: list[bytes]) -> int:
        return self.chain.num_leading(block_hashes)

    def load(self, items: Sequence[tuple[bytes, int]], busy: Callable[[], bool] = lambda: False) -> int:
        """Fill reserved pool blocks from the tiers, in order; returns how many leading items were loaded (it
        stops at the first miss or damaged entry). While busy() is true (other requests are being computed),
        the load yields: after each block it pauses for as long as the block took (LOAD_DUTY_CYCLE)."""
        # NOTE: up to PREFETCH entries are being read (by the reader threads) while one is verified and copied
        pending = deque(self._reader.submit(self._fetch, h) for h, _ in items[:PREFETCH])
        pool = _numpy_views(self.kv.k, self.kv.v)
        num = 0
        for i, (_, block_id) in enumerate(items):
            started = time.perf_counter()
            found = pending.popleft().result()
            if i + PREFETCH < len(items):
                pending.append(self._reader.submit(self._fetch, items[i + PREFETCH][0]))
            if found is None:
                break
            block, tier = found
            s = self._slots(block_id)
            if pool is not None and block.dtype == self.kv.k.dtype:
                # NOTE: a numpy copy runs on this thread alone; a torch copy here would start an OpenMP team
                # of this thread's own, whose spinning workers compete with the decode step (measured: the
                # decode of running requests slowed 12-22% during an 8,192-token load, against 7%).
                (b,) = _numpy_views(block)
                pool[0][:, s] = b[0]
                pool[1][:, s] = b[1]
            else:
                block = block.to(device=self.kv.k.device, dtype=self.kv.k.dtype)
                self.kv.k[:, s] = block[0]
                self.kv.v[:, s] = block[1]
            with self._lock:
                self._loaded[tier] = self._loaded.get(tier, 0) + 1
            num += 1
            if busy():
                time.sleep((time.perf_counter() - started) * (1 / LOAD_DUTY_CYCLE - 1))
        for future in pending:
            future.cancel()
        return num

    def _fetch(self, block_hash: bytes) -> tuple[torch.Tensor, str] | None:
        """Read and verify one entry (on a reader thread). A damaged entry is deleted and counted: None."""
        found = self.chain.lookup(block_hash)
        if found is None:
            return None
        entry, tier = found
        try:
            payload = decode(entry, block_hash, self.meta)
        except CorruptEntryError as exc:
            with self._lock:
                self._corrupt[tier] = self._corrupt.get(tier, 0) + 1
            log.warning("damaged KV entry %s from %s deleted (%s); recomputing", block_hash.hex(), tier, exc)
            self.chain.delete(block_hash)
            return None
        block = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(self.storage_dtype)  # owns its bytes
        return block.view(self.meta.shape), tier

    # -- figures and shutdown --------------------------------------------------------------------
    def stats(self) -> list[TierStats]:
        """Each tier's figures, with the damaged entries and loaded blocks that load() found in it."""
        with self._lock:
            corrupt, loaded = dict(self._corrupt), dict(self._loaded)
        return [replace(t, num_corrupt=t.num_corrupt + corrupt.get(t.name, 0),
                        num_loaded_blocks=loaded.get(t.name, 0)) for t in self.chain.stats()]

    @property
    def num_dropped_writes(self) -> int:
        return self.chain.num_dropped_writes

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until queued tier writes are done. True if they finished in time."""
        return self.chain.flush(timeout_s)

    def close(self, flush_timeout_s: float = 30.0) -> None:
        self.chain.close(flush_timeout_s)
        self._reader.shutdown(wait=False)
