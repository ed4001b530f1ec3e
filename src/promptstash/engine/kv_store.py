"""The bridge between the pool's K/V tensors and the tier chain (the cache manager's BlockStore).

    save:  pool slots of block b ──copy (engine thread)──> [2, layers, block_size, kv_heads, head_dim]
           ──encode + write (tier writer thread)──> disk, redis
    load:  tier entry ──decode + verify──> tensor ──copy──> pool slots     (the next entry is read meanwhile)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from promptstash.cache.manager import TTL_SECONDS
from promptstash.cache.tiers.chain import TierChain
from promptstash.cache.tiers.entry import CorruptEntryError, EntryMeta, decode, encode
from promptstash.models.llama import KVCache

log = logging.getLogger("promptstash.tiers")


class KVStore:
    def __init__(self, kv: KVCache, chain: TierChain, model_id: str, kv_layout: str,
                 storage_dtype: torch.dtype | None = None) -> None:
        """storage_dtype: the dtype entries are stored in (None = the pool's, which keeps reuse exact)."""
        self.kv = kv
        self.chain = chain
        self.storage_dtype = storage_dtype or kv.k.dtype
        num_layers, _, num_heads, head_dim = kv.k.shape
        self.meta = EntryMeta(model_id=model_id, kv_layout=kv_layout, num_layers=num_layers,
                              shape=(2, num_layers, kv.block_size, num_heads, head_dim),
                              dtype=str(self.storage_dtype).removeprefix("torch."), num_tokens=kv.block_size)
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="promptstash-tier-reader")
        self.num_corrupt = 0
        self.num_loaded = 0
        self.load_seconds = 0.0
        self.loaded_by_tier: dict[str, int] = {}

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

    def contains(self, block_hash: bytes) -> bool:
        return self.chain.contains(block_hash)

    def load(self, items: Sequence[tuple[bytes, int]]) -> int:
        start = time.perf_counter()
        pending = self._reader.submit(self.chain.lookup, items[0][0]) if items else None
        num = 0
        for i, (block_hash, block_id) in enumerate(items):
            found = pending.result()
            pending = self._reader.submit(self.chain.lookup, items[i + 1][0]) if i + 1 < len(items) else None
            if found is None:
                break
            entry, tier = found
            try:
                payload = decode(entry, block_hash, self.meta)
            except CorruptEntryError as exc:
                self.num_corrupt += 1
                log.warning("damaged KV entry %s from %s deleted (%s); recomputing", block_hash.hex(), tier, exc)
                self.chain.delete(block_hash)
                break
            block = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(self.storage_dtype)
            block = block.view(self.meta.shape).to(device=self.kv.k.device, dtype=self.kv.k.dtype)
            s = self._slots(block_id)
            self.kv.k[:, s] = block[0]
            self.kv.v[:, s] = block[1]
            self.loaded_by_tier[tier] = self.loaded_by_tier.get(tier, 0) + 1
            num += 1
        if pending is not None:
            pending.cancel()
        self.num_loaded += num
        self.load_seconds += time.perf_counter() - start
        return num

    def close(self, flush_timeout_s: float = 30.0) -> None:
        self.chain.close(flush_timeout_s)
        self._reader.shutdown(wait=False)
