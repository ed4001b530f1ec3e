"""A fixed set of KV blocks shared by reference count. Knows nothing of prefixes, trees or tiers.

Every block is in exactly one of three states:

    free      ref_count == 0, no hash        in `_free` (a stack)
    cached    ref_count == 0, has a hash     in `policy` (an eviction policy: it names the next victim)
    in use    ref_count  > 0                 in neither

NOTE: free + cached + in use == num_blocks at all times; `check()` verifies it. All operations are O(1)
per block (a list stack), plus the policy's cost (O(1) for LRU, O(log n) for cost-aware).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from promptstash.cache.eviction import EvictionPolicy, LRUPolicy


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set while the block's content is published for reuse


@dataclass(frozen=True)
class PoolUsage:
    num_blocks: int
    num_free: int
    num_cached: int
    num_in_use: int


class BlockPool:
    def __init__(self, num_blocks: int, on_evict: Callable[[Block], None] | None = None,
                 policy: EvictionPolicy | None = None) -> None:
        """on_evict(block) is called when a cached block is taken for new content, before its hash is cleared;
        policy orders cached blocks for eviction (default: LRU)."""
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least 1 block, got {num_blocks}")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() yields block 0 first
        self.policy: EvictionPolicy = LRUPolicy() if policy is None else policy
        self._on_evict = on_evict
        self.num_evictions = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_available(self) -> int:
        """Blocks that allocate() can hand out now (free, or cached and unreferenced)."""
        return len(self._free) + len(self.policy)

    def allocate(self, num: int) -> list[int] | None:
        """Take `num` blocks with ref_count 1: free ones first, then cached ones in the policy's order.

        Returns None (and changes nothing) when fewer than `num` are available.
        """
        if num > self.num_available:
            return None
        ids = []
        for _ in range(num):
            if self._free:
                block = self.blocks[self._free.pop()]
            else:
                block = self.blocks[self.policy.pop()]
                if self._on_evict is not None:
                    self._on_evict(block)
                block.block_hash = None
                self.num_evictions += 1
            block.ref_count = 1
            ids.append(block.block_id)
        return ids

    def touch(self, block_id: int) -> None:
        """Add a reference to a block (a cache hit); a cached block leaves the eviction queue."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            if block.block_hash is None:
                raise ValueError(f"block {block_id} is free; only cached or in-use blocks can be shared")
            self.policy.remove(block_id)
        block.ref_count += 1

    def release(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block, in the given order.

        NOTE: blocks reaching ref_count 0 with a hash go to the policy in this order (for LRU: the END of its
        queue), so callers pass a finished request's blocks tail first: its tail is evicted before its head.
        """
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise ValueError(f"block {block_id} released more often than referenced")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is None:
                    self._free.append(block_id)
                else:
                    self.policy.add(block_id)

    def set_hash(self, block_id: int, block_hash: bytes) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            raise ValueError(f"block {block_id} must be in use to be published")
        block.block_hash = block_hash

    def eviction_order(self) -> list[int]:
        """Cached unreferenced blocks, the next to be evicted first."""
        return self.policy.order()

    def usage(self) -> PoolUsage:
        num_free, num_cached = len(self._free), len(self.policy)
        return PoolUsage(self.num_blocks, num_free, num_cached, self.num_blocks - num_free - num_cached)

    def check(self) -> None:
        """Raise AssertionError if the three states do not partition the pool exactly."""
        free, cached = set(self._free), set(self.policy)
        assert len(cached) == len(self.policy), "the eviction policy holds a block twice"
        assert len(free) == len(self._free), "a block is twice in the free list"
        assert not free & cached, "a block is both free and cached"
        in_use = {b.block_id for b in self.blocks if b.ref_count > 0}
        assert not in_use & (free | cached), "a referenced block is in the free list or eviction queue"
        assert len(free) + len(cached) + len(in_use) == self.num_blocks, (
            f"free {len(free)} + cached {len(cached)} + in use {len(in_use)} != {self.num_blocks} blocks"
        )
        for block_id in free:
            assert self.blocks[block_id].block_hash is None, f"free block {block_id} has a hash"
        for block_id in cached:
            assert self.blocks[block_id].block_hash is not None, f"cached block {block_id} has no hash"
        for block in self.blocks:
            assert block.ref_count >= 0, f"block {block.block_id} has ref_count {block.ref_count}"
