"""The one cache API of the engine: prefix matching, block tables, publishing, TTL protection and release.

    scheduler:  open, extend_match, waits_for_other, allocate, close, limit_publish, hold_module,
                prefix_hashes / cached_prefix_len (lpm), note_admission
    engine:     block_table, commit, protect, plan_load / reserve_load / finish_load, locate, stats,
                module_hashes, plan_module_load, allocate_module / publish_module, release_held

A sequence's block table covers the tokens whose K/V are (or are about to be) in the pool:

    token:   0 ........ B-1 | B ....... 2B-1 | 2B ... (partial)
    table:   [ block a      | block b        | block c          ]
             shared (hit)     shared (hit)     owned, not yet full -> never published

Only full blocks are published (hash -> block) and only after their K/V have been computed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from promptstash.cache.block_pool import Block, BlockPool, PoolUsage
from promptstash.cache.events import KVEventSink
from promptstash.cache.eviction import EvictionConfig, make_policy
from promptstash.cache.hashing import extend_hashes, module_hashes, module_root_hash, root_hash
from promptstash.cache.prefix_index import PrefixIndex
from promptstash.cache.ttl import TTL_SECONDS

__all__ = ["TTL_SECONDS", "BlockStore", "CacheManager", "CacheStats", "LoadPlan", "LoadReservation",
           "PrefixLocation", "ProtectResult"]


class BlockStore(Protocol):
    """Where published blocks are written through to (the tiers, via cache.tiers.store.KVStore).

    The manager hands it pool block ids and block hashes only; the store moves the K/V bytes.
    """

    def save(self, block_id: int, block_hash: bytes, ttl_class: str | None) -> None:
        """Snapshot a published block now and write it to the tiers later (off the critical path)."""
        ...


@dataclass(frozen=True)
class CacheStats:
    num_evictions: int
    num_published_blocks: int
    usage: PoolUsage
    num_protected_blocks: dict[str, int]  # TTL class -> blocks protected from eviction now
    num_refused_writes: int  # protect() calls refused because protected blocks would exceed the cap
    num_forced_expiries: int  # protections ended early because a request could not fit otherwise
    num_loaded_blocks: int = 0  # blocks loaded back from the tiers (hits beyond the pool)
    block_size: int = 0


@dataclass(frozen=True)
class LoadPlan:
    """Blocks of a prompt that miss the pool and might be in a tier: hashes[start:] (start = pool match)."""

    hashes: tuple[bytes, ...]
    start: int


@dataclass(frozen=True)
class LoadReservation:
    """Pool blocks reserved (referenced, unpublished) for entries to load: (block hash, block id) pairs."""

    load_id: int
    items: tuple[tuple[bytes, int], ...]


@dataclass(frozen=True)
class PrefixLocation:
    """Where a prefix's last full block is: "pool" or None (then it may be in a tier: block_hash)."""

    where: str | None
    ttl_class: str | None
    block_hash: bytes | None


@dataclass(frozen=True)
class ProtectResult:
    """What protect() did: the TTL class now protecting each leading block, or refused (nothing changed)."""

    block_classes: tuple[str, ...]
    refused: bool


@dataclass(frozen=True)
class ForkResult:
    copy: tuple[int, int] | None  # (parent's partial block, child's block): copy its K/V; None if no partial block


@dataclass
class _Pin:
    ttl_class: str
    expires_at: float


@dataclass
class _Seq:
    root: bytes
    block_ids: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # of every full block of the tokens seen so far
    num_published: int = 0  # leading blocks already published or shared from the cache
    matching: bool = True  # nothing computed yet beyond cache hits, so later hits may still extend
    max_published: int | None = None  # blocks beyond this hold approximate K/V (modules): never published
    held: list[int] = field(default_factory=list)  # module blocks held for copying (one reference each)
    num_tokens: int = 0  # tokens whose K/V are in the pool (matched or computed)


class CacheManager:
    def __init__(self, num_blocks: int, block_size: int, model_id: str, kv_layout: str,
                 enable_prefix_caching: bool = True, *, clock: Callable[[], float] = time.monotonic,
                 ttl_seconds: Mapping[str, float] | None = None, max_protected_blocks: int | None = None,
                 store: BlockStore | None = None, eviction: EvictionConfig | None = None,
                 events: KVEventSink | None = None) -> None:
        """clock: seconds (monotonic) for TTLs; ttl_seconds overrides TTL_SECONDS (tests use short ones);
        max_protected_blocks caps blocks held by TTL protection (default: half the pool); store, if given,
        receives every published block (write-through); loading blocks back is plan_load / reserve_load /
        finish_load, driven by the engine so that no tier I/O happens here; eviction picks the policy that
        orders cached blocks for eviction (cache/eviction.py; default LRU); events, if given, hears of every
        block hash stored in / removed from the pool (cache/events.py, KV events for external routers)."""
        self.block_size = block_size
        self.model_id = model_id
        self.kv_layout = kv_layout
        self.enable_prefix_caching = enable_prefix_caching
        self.index = PrefixIndex()
        self.eviction = eviction or EvictionConfig()
        self.pool = BlockPool(num_blocks, on_evict=self._on_evict, policy=make_policy(self.eviction, block_size))
        self._seqs: dict[str, _Seq] = {}
        self._pending: dict[bytes, str] = {}  # block hash -> seq that will compute it
        self._num_published = 0
        self.clock = clock
        self.ttl_seconds = {**TTL_SECONDS, **(ttl_seconds or {})}
        self.max_protected_blocks = num_blocks // 2 if max_protected_blocks is None else max_protected_blocks
        # NOTE: a protected block holds one extra reference (its pin), so it is never evicted; expire()
        # drops the reference once the TTL has passed since the block's last use.
        self._pins: dict[int, _Pin] = {}
        self._next_expiry = float("inf")
        self._num_refused_writes = 0
        self._num_forced_expiries = 0
        self.store = store
        self._num_loaded = 0
        self._loads: dict[int, list[int]] = {}  # reservation id -> reserved blocks (one reference each)
        self._next_load_id = 0
        self._module_blocks: set[bytes] = set()  # hashes of module blocks in the pool now
        self._modules: dict[bytes, tuple[bytes, ...]] = {}  # last block hash -> a module's hashes (stats)
        self.events = events

    def set_event_sink(self, events: KVEventSink | None) -> None:
        """Attach (or detach) a KV event sink; the blocks already in the pool are its starting set."""
        if events is not None:
            events.seed(h for h, _ in self.index.items())
        self.events = events

    def _on_evict(self, block: Block) -> None:
        assert block.block_hash is not None
        self.index.remove(block.block_hash, block.block_id)
        self._module_blocks.discard(block.block_hash)
        if self.events is not None:
            self.events.removed(block.block_hash)

    # -- lifecycle -------------------------------------------------------------------------------
    def open(self, seq_id: str, token_ids: Sequence[int], namespace: str) -> int:
        """Start tracking a sequence; share its longest cached prefix. Returns the cached token count.

        NOTE: at most len(token_ids) - 1 tokens are matched, so at least one token is computed for logits.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} is already open")
        self.expire()
        seq = _Seq(root=root_hash(self.model_id, self.kv_layout, namespace))
        extend_hashes(seq.hashes, seq.root, token_ids, self.block_size)
        self._seqs[seq_id] = seq
        num_cached = self._match_more(seq_id, seq, len(token_ids))
        if self.enable_prefix_caching:
            for h in seq.hashes[len(seq.block_ids):]:
                if self.index.get(h) is None:
                    self._pending.setdefault(h, seq_id)
        return num_cached

    def extend_match(self, seq_id: str, num_tokens: int) -> int:
        """Share blocks published since open() (by concurrent requests). Returns the cached token count.

        Only while the sequence has computed nothing itself; afterwards it returns the current count.
        """
        return self._match_more(seq_id, self._seqs[seq_id], num_tokens)

    def _match_more(self, seq_id: str, seq: _Seq, num_tokens: int) -> int:
        if self.enable_prefix_caching and seq.matching:
            max_blocks = (num_tokens - 1) // self.block_size
            for block_id in self.index.longest_prefix(seq.hashes, len(seq.block_ids), max_blocks):
                self.pool.touch(block_id)
                self._refresh_pins((block_id,))  # a hit refreshes the TTL
                seq.block_ids.append(block_id)
            for h in seq.hashes[seq.num_published:len(seq.block_ids)]:
                if self._pending.get(h) == seq_id:
                    del self._pending[h]
            seq.num_published = len(seq.block_ids)
            seq.num_tokens = max(seq.num_tokens, seq.num_published * self.block_size)
        return seq.num_published * self.block_size

    def waits_for_other(self, seq_id: str, num_computed: int) -> bool:
        """True if the next block this sequence would compute is being computed by another sequence."""
        seq = self._seqs[seq_id]
        if not seq.matching or num_computed % self.block_size:
            return False
        j = num_computed // self.block_size
        return j < len(seq.hashes) and self._pending.get(seq.hashes[j], seq_id) != seq_id

    def allocate(self, seq_id: str, num_tokens: int, *, last_resort: bool = False) -> bool:
        """Make the block table cover num_tokens tokens. False (nothing changed) if the pool is short.

        last_resort: the caller has nothing else that could free blocks, so TTL protections closest to
        expiry end (force_expire) rather than leave this sequence waiting forever.
        """
        seq = self._seqs[seq_id]
        need = -(-num_tokens // self.block_size) - len(seq.block_ids)
        if need <= 0:
            return True
        self.expire()
        if last_resort and self.pool.num_available < need:
            self.force_expire(need)
        new = self.pool.allocate(need)
        if new is None:
            return False
        seq.block_ids.extend(new)
        return True

    def commit(self, seq_id: str, token_ids: Sequence[int], num_computed: int) -> None:
        """Record that the first num_computed tokens' K/V are in the pool; publish newly full blocks."""
        seq = self._seqs[seq_id]
        seq.matching = False
        seq.num_tokens = max(seq.num_tokens, num_computed)
        extend_hashes(seq.hashes, seq.root, token_ids, self.block_size)
        num_full = num_computed // self.block_size
        if seq.max_published is not None:
            num_full = min(num_full, seq.max_published)
        for j in range(seq.num_published, num_full):
            h = seq.hashes[j]
            if self.enable_prefix_caching and self.index.insert(h, seq.block_ids[j]):
                self.pool.set_hash(seq.block_ids[j], h)
                if self.events is not None:
                    self.events.stored(h)
                self._num_published += 1
                if self.store is not None:
                    self.store.save(seq.block_ids[j], h, None)
            if self._pending.get(h) == seq_id:
                del self._pending[h]
        seq.num_published = max(seq.num_published, num_full)

    def fork(self, seq_id: str, child_id: str, num_tokens: int) -> ForkResult | None:
        """Open child_id holding the same K/V as seq_id's first num_tokens tokens (n > 1 samples of one
        prompt): full blocks are shared by reference; a partial last block gets a fresh block of the child's
        own, whose K/V the caller copies (ForkResult.copy). None (nothing changed) if the pool is short.

            parent: [ b0 ][ b1 ][ b2: 5 of 16 tokens ]
            child:  [ b0 ][ b1 ][ b7 ] <- caller copies the 5 slots of b2 into b7
        """
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id!r} is already open")
        seq = self._seqs[seq_id]
        num_full, partial = divmod(num_tokens, self.block_size)
        if len(seq.block_ids) < num_full + (partial > 0):
            raise ValueError(f"sequence {seq_id!r} holds fewer than {num_tokens} tokens")
        copy: tuple[int, int] | None = None
        if partial:
            new = self.pool.allocate(1)
            if new is None:
                return None
            copy = (seq.block_ids[num_full], new[0])
        shared = seq.block_ids[:num_full]
        for block_id in shared:
            self.pool.touch(block_id)
        child = _Seq(root=seq.root, block_ids=shared + ([copy[1]] if copy else []), hashes=list(seq.hashes),
                     num_published=min(seq.num_published, num_full), matching=False,
                     max_published=seq.max_published)
        self._seqs[child_id] = child
        return ForkResult(copy)

    def close(self, seq_id: str, *, turn_ended: bool = True) -> None:
        """Release a finished, aborted or preempted sequence: tail blocks become evictable first.

        turn_ended: the sequence's turn is over (not a preemption), so the eviction policy hears of it."""
        seq = self._seqs.pop(seq_id)
        for h in seq.hashes:
            if self._pending.get(h) == seq_id:
                del self._pending[h]
        if turn_ended:
            blocks = self.pool.blocks
            published = [b for b in seq.block_ids[:seq.num_published] if blocks[b].block_hash is not None]
            self.pool.policy.note_sequence(published, seq.num_tokens)
        self.pool.release(reversed(seq.block_ids))
        self.pool.release(seq.held)

    # -- modules ---------------------------------------------------------------------------------
    # NOTE: a module's blocks are published under module hashes (hashing.module_hashes), never under a
    # prompt's prefix hashes. A sequence that assembles modules holds approximate K/V from its first module
    # on, so limit_publish stops it publishing those blocks as an exact prefix.
    def module_hashes(self, token_ids: Sequence[int], namespace: str) -> tuple[bytes, ...]:
        return tuple(module_hashes(module_root_hash(self.model_id, self.kv_layout, namespace), token_ids,
                                   self.block_size))

    def limit_publish(self, seq_id: str, num_tokens: int) -> None:
        """Publish no block of this sequence beyond its first num_tokens tokens (stop matching, too)."""
        seq = self._seqs[seq_id]
        seq.matching = False
        seq.max_published = num_tokens // self.block_size
        for h in seq.hashes[seq.max_published:]:
            if self._pending.get(h) == seq_id:
                del self._pending[h]

    def hold_module(self, seq_id: str, hashes: Sequence[bytes], ttl_class: str | None = None) -> tuple[int, ...] | None:
        """If every block of a module is in the pool, hold them for this sequence (released by release_held or
        close) and return their ids; else None. A hit refreshes TTL protection; ttl_class protects them."""
        block_ids = [self.index.get(h) for h in hashes]
        if any(b is None for b in block_ids):
            return None
        seq = self._seqs[seq_id]
        for block_id in block_ids:
            assert block_id is not None
            self.pool.touch(block_id)
            seq.held.append(block_id)
        self._refresh_pins(block_ids)  # type: ignore[arg-type]
        if ttl_class is not None:
            self.protect_blocks(block_ids, hashes, ttl_class)  # type: ignore[arg-type]
        return tuple(block_ids)  # type: ignore[arg-type]

    def release_held(self, seq_id: str) -> None:
        seq = self._seqs[seq_id]
        self.pool.release(seq.held)
        seq.held = []

    def allocate_module(self, num_blocks: int) -> list[int] | None:
        """Fresh blocks (referenced, unpublished) to copy a computed module into; None if the pool is short."""
        self.expire()
        return self.pool.allocate(num_blocks)

    def publish_module(self, hashes: Sequence[bytes], block_ids: Sequence[int], ttl_class: str | None = None) -> int:
        """Publish a module's filled blocks under its hashes (and write them to the tiers), then drop the
        caller's references. A block another request published first keeps its place; the copy is freed.
        Returns blocks published."""
        num_published = 0
        for h, block_id in zip(hashes, block_ids, strict=True):
            if self.index.insert(h, block_id):
                self.pool.set_hash(block_id, h)
                if self.events is not None:
                    self.events.stored(h)
                self._module_blocks.add(h)
                num_published += 1
                if self.store is not None:
                    self.store.save(block_id, h, None)
        self._num_published += num_published
        self._modules[hashes[-1]] = tuple(hashes)
        published = [self.index.get(h) for h in hashes]
        if ttl_class is not None and all(b is not None for b in published):
            self.protect_blocks(published, hashes, ttl_class)  # type: ignore[arg-type]
        self.pool.release(reversed(block_ids))
        return num_published

    def plan_module_load(self, hashes: Sequence[bytes]) -> LoadPlan | None:
        """The blocks of a module beyond those in the pool; None if it is all in the pool."""
        if not self.enable_prefix_caching:
            return None
        start = len(self.index.longest_prefix(list(hashes), 0, len(hashes)))
        return LoadPlan(tuple(hashes), start) if start < len(hashes) else None

    def note_module(self, hashes: Sequence[bytes]) -> None:
        """Count a module loaded from a tier among the pool's modules (stats)."""
        self._modules[hashes[-1]] = tuple(hashes)

    def module_block_counts(self) -> tuple[int, int]:
        """(modules whose blocks are all in the pool, module blocks in the pool)."""
        for key in [k for k, hs in self._modules.items() if any(self.index.get(h) is None for h in hs)]:
            del self._modules[key]
        return len(self._modules), len(self._module_blocks)

    def _refresh_pins(self, block_ids: Sequence[int]) -> None:
        for block_id in block_ids:
            if (pin := self._pins.get(block_id)) is not None:
                pin.expires_at = self.clock() + self.ttl_seconds[pin.ttl_class]

    def protect_blocks(self, block_ids: Sequence[int], hashes: Sequence[bytes], ttl_class: str) -> bool:
        """Protect published blocks from eviction for a TTL class (as protect(), for a module's blocks).
        False (nothing changed) if that would exceed max_protected_blocks."""
        if ttl_class not in self.ttl_seconds:
            raise ValueError(f"unknown TTL class {ttl_class!r}")
        if not self._may_pin(block_ids):
            return False
        now = self.clock()
        for block_id, h in zip(block_ids, hashes, strict=True):
            self._pin(block_id, h, ttl_class, now)
        return True

    def _may_pin(self, block_ids: Sequence[int]) -> bool:
        """Whether pinning these blocks stays within max_protected_blocks (counts a refused write if not)."""
        new = [b for b in dict.fromkeys(block_ids) if b not in self._pins]
        if len(self._pins) + len(new) > self.max_protected_blocks:
            self._num_refused_writes += 1
            return False
        return True

    def _pin(self, block_id: int, block_hash: bytes, ttl_class: str, now: float) -> str:
        """Protect one published block (a pinned one keeps the longer class; its TTL restarts); returns its class.
        Long classes are written to the tiers with their expiry too."""
        pin = self._pins.get(block_id)
        if pin is None:
            self.pool.touch(block_id)
            pin = self._pins[block_id] = _Pin(ttl_class, now)
        elif self.ttl_seconds[ttl_class] > self.ttl_seconds[pin.ttl_class]:
            pin.ttl_class = ttl_class
        pin.expires_at = max(pin.expires_at, now + self.ttl_seconds[pin.ttl_class])
        self._next_expiry = min(self._next_expiry, pin.expires_at)
        if self.store is not None and pin.ttl_class != "5m":
            self.store.save(block_id, block_hash, pin.ttl_class)
        return pin.ttl_class

    # -- TTL protection --------------------------------------------------------------------------
    def protect(self, seq_id: str, breakpoints: Sequence[tuple[int, str]]) -> ProtectResult:
        """Protect the published blocks of a sequence's prefix from eviction, each for its TTL class.

        breakpoints: (prefix_len, ttl_class) pairs; a block belongs to the first breakpoint that covers it
        whole, so only full blocks inside a prefix are protected. A block already protected keeps the longer
        class, and its TTL restarts. All or nothing: if new protections would exceed max_protected_blocks,
        nothing changes and the write counts as refused.
        """
        seq = self._seqs[seq_id]
        if not self.enable_prefix_caching:
            return ProtectResult((), refused=False)
        classes: list[str] = []
        for prefix_len, ttl_class in sorted(breakpoints):
            if ttl_class not in self.ttl_seconds:
                raise ValueError(f"unknown TTL class {ttl_class!r}")
            classes.extend([ttl_class] * max(0, prefix_len // self.block_size - len(classes)))
        classes = classes[:seq.num_published]
        for j in range(len(classes)):  # a duplicate copy of a block is unpublished: protect up to it
            if self.pool.blocks[seq.block_ids[j]].block_hash is None:
                classes = classes[:j]
                break
        if not self._may_pin(seq.block_ids[:len(classes)]):
            return ProtectResult((), refused=True)
        now = self.clock()
        result = [self._pin(seq.block_ids[j], seq.hashes[j], ttl_class, now) for j, ttl_class in enumerate(classes)]
        return ProtectResult(tuple(result), refused=False)

    def expire(self) -> int:
        """End protections whose TTL has passed (their blocks become evictable). Returns how many ended."""
        now = self.clock()
        if now < self._next_expiry:
            return 0
        done = sorted((p.expires_at, b) for b, p in self._pins.items() if p.expires_at <= now)
        for _, block_id in done:
            del self._pins[block_id]
        self.pool.release(block_id for _, block_id in done)
        self._next_expiry = min((p.expires_at for p in self._pins.values()), default=float("inf"))
        return len(done)

    def force_expire(self, num_blocks: int) -> int:
        """Last resort when a request cannot fit otherwise: end the protections closest to expiry until
        `num_blocks` blocks are available. Returns how many protections ended."""
        ended = 0
        for _, block_id in sorted((p.expires_at, b) for b, p in self._pins.items()):
            if self.pool.num_available >= num_blocks:
                break
            del self._pins[block_id]
            self.pool.release([block_id])
            ended += 1
        self._num_forced_expiries += ended
        return ended

    def locate(self, token_ids: Sequence[int], namespace: str) -> PrefixLocation:
        """Where the prefix's last full block is now, and its TTL class if protected. Never touches a tier."""
        hashes: list[bytes] = []
        extend_hashes(hashes, root_hash(self.model_id, self.kv_layout, namespace), token_ids, self.block_size)
        if not hashes:
            return PrefixLocation(None, None, None)
        block_id = self.index.get(hashes[-1])
        if block_id is not None:
            pin = self._pins.get(block_id)
            return PrefixLocation("pool", None if pin is None else pin.ttl_class, hashes[-1])
        return PrefixLocation(None, None, hashes[-1])

    # -- loads from the tiers --------------------------------------------------------------------
    # NOTE: the engine calls plan_load and reserve_load under its lock, reads the tiers into the reserved
    # blocks without it, then calls finish_load under the lock again. Reserved blocks are referenced and
    # unpublished: nothing can match, evict or reuse them meanwhile.
    def plan_load(self, token_ids: Sequence[int], namespace: str) -> LoadPlan | None:
        """The blocks of a prompt beyond its pool match (up to prompt_len - 1 tokens); None if there are none."""
        if not self.enable_prefix_caching:
            return None
        hashes: list[bytes] = []
        extend_hashes(hashes, root_hash(self.model_id, self.kv_layout, namespace), token_ids, self.block_size)
        max_blocks = (len(token_ids) - 1) // self.block_size
        start = len(self.index.longest_prefix(hashes, 0, max_blocks))
        return LoadPlan(tuple(hashes[:max_blocks]), start) if start < max_blocks else None

    def reserve_load(self, plan: LoadPlan, num_blocks: int) -> LoadReservation | None:
        """Reserve pool blocks for the next num_blocks blocks of a plan that are still not in the pool.

        The plan's pool prefix is held too (so making room cannot evict it). None if the prefix has left
        the pool, there is nothing left to load, or the pool cannot spare the blocks now.
        """
        head = self.index.longest_prefix(plan.hashes, 0, plan.start)
        if len(head) < plan.start:
            return None
        items = []
        for h in plan.hashes[plan.start:plan.start + num_blocks]:
            if self.index.get(h) is not None:
                break
            items.append(h)
        if not items:
            return None
        self.expire()
        for block_id in head:
            self.pool.touch(block_id)
        block_ids = self.pool.allocate(len(items))
        if block_ids is None:
            self.pool.release(reversed(head))
            return None
        load_id = self._next_load_id
        self._next_load_id += 1
        self._loads[load_id] = head + block_ids
        return LoadReservation(load_id, tuple(zip(items, block_ids, strict=True)))

    def finish_load(self, reservation: LoadReservation, num_loaded: int, *, module: bool = False) -> int:
        """Publish the first num_loaded reserved blocks (now filled) and release the reservation.

        Loaded blocks become cached blocks, tail first in the LRU order; a block published meanwhile by a
        request that computed it keeps its place and the loaded copy is freed. Returns blocks published.
        """
        block_ids = self._loads.pop(reservation.load_id)
        num_published = 0
        for h, block_id in reservation.items[:num_loaded]:
            if self.index.insert(h, block_id):
                self.pool.set_hash(block_id, h)
                if self.events is not None:
                    self.events.stored(h)
                num_published += 1
                if module:
                    self._module_blocks.add(h)
        self.pool.release(reversed(block_ids))
        self._num_loaded += num_published
        self._num_published += num_published
        return num_published

    def protected_blocks(self) -> dict[str, int]:
        counts = dict.fromkeys(self.ttl_seconds, 0)
        for pin in self._pins.values():
            counts[pin.ttl_class] += 1
        return counts

    # -- queries ---------------------------------------------------------------------------------
    def prefix_hashes(self, token_ids: Sequence[int], namespace: str) -> list[bytes]:
        """The block hashes of a prompt's full blocks (for cached_prefix_len; compute once per prompt)."""
        hashes: list[bytes] = []
        extend_hashes(hashes, root_hash(self.model_id, self.kv_layout, namespace), token_ids, self.block_size)
        return hashes

    def cached_prefix_len(self, hashes: Sequence[bytes]) -> int:
        """Tokens of a prompt's prefix in the pool now (its hashes from prefix_hashes). Changes nothing."""
        if not self.enable_prefix_caching:
            return 0
        return len(self.index.longest_prefix(hashes)) * self.block_size

    def note_admission(self, prompt_len: int, num_cached: int) -> None:
        """A request was admitted (first time only) with num_cached of its prompt tokens from the cache."""
        self.pool.policy.note_request(prompt_len, num_cached)

    def set_prefill_rate(self, tokens_per_s: float) -> None:
        """The engine's measured prefill speed (the tlru policy turns its TTFT target into tokens with it)."""
        self.pool.policy.set_prefill_rate(tokens_per_s)

    def block_table(self, seq_id: str) -> list[int]:
        return self._seqs[seq_id].block_ids

    def blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        """New blocks allocate(seq_id, num_tokens) would take."""
        return max(0, -(-num_tokens // self.block_size) - len(self._seqs[seq_id].block_ids))

    @property
    def num_pool_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    def stats(self) -> CacheStats:
        self.expire()
        return CacheStats(self.pool.num_evictions, self._num_published, self.pool.usage(), self.protected_blocks(),
                          self._num_refused_writes, self._num_forced_expiries, self._num_loaded, self.block_size)

    def check_integrity(self) -> None:
        """Raise AssertionError unless pool states, ref counts and the index agree."""
        self.pool.check()
        refs = [0] * self.pool.num_blocks
        for seq in self._seqs.values():
            for block_id in seq.block_ids + seq.held:
                refs[block_id] += 1
        for block_id in self._pins:
            refs[block_id] += 1
        for block_ids in self._loads.values():
            for block_id in block_ids:
                refs[block_id] += 1
        for block in self.pool.blocks:
            assert block.ref_count == refs[block.block_id], (
                f"block {block.block_id}: ref_count {block.ref_count} but {refs[block.block_id]} holders"
            )
        for h, block_id in self.index.items():
            assert self.pool.blocks[block_id].block_hash == h, f"index entry for block {block_id} is stale"
        num_hashed = sum(1 for b in self.pool.blocks if b.block_hash is not None)
        assert num_hashed == len(self.index), f"{num_hashed} hashed blocks but {len(self.index)} index entries"
