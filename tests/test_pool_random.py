"""Acceptance: 1,000 random requests (shared and unshared prefixes, aborts, evictions under a small pool)
leave the integrity check passing and no block leaked; ref counts and eviction order checked explicitly.

Two levels: a CacheManager simulation that checks every pool transition against an explicit model of
ref counts and LRU order, and the Engine with a tiny model, whose greedy outputs under churn must equal
the outputs of the same prompts run alone without the cache."""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
from conftest import tiny_engine

from promptstash.cache.eviction import EVICTION_POLICIES, EvictionConfig
from promptstash.cache.manager import CacheManager
from promptstash.engine.sampling import SamplingParams

NUM_REQUESTS = 1000
SIM_SEED = 20240607
ENGINE_SEED = 7


# -- CacheManager level ----------------------------------------------------------------------------
@dataclass
class SimSeq:
    seq_id: str
    namespace: str
    tokens: list[int]
    prompt_len: int
    max_new: int
    computed: int = 0


@dataclass
class Counts:
    hits: int = 0  # tokens served from the cache
    waits: int = 0
    aborts: int = 0
    alloc_failures: int = 0
    completed: int = 0
    extended: int = 0  # blocks picked up by extend_match after open
    ops: int = 0
    contents: dict[int, tuple[str, tuple[int, ...]]] = field(default_factory=dict)


class CheckedManager:
    """Wraps a CacheManager: every op is checked against the explicit ref-count / LRU model of the pool,
    block contents are tracked so every cache hit is verified to hold exactly the requested tokens,
    and check_integrity() runs after every op."""

    def __init__(self, mgr: CacheManager, counts: Counts) -> None:
        self.mgr = mgr
        self.pool = mgr.pool
        self.c = counts
        self.bs = mgr.block_size
        # NOTE: the exact eviction order is modelled for LRU only; other policies' order is checked against
        # their own reference models in test_eviction.py, here only as a set
        self.lru = mgr.eviction.policy == "lru"

    def _order_is(self, expected: list[int]) -> None:
        order = self.pool.eviction_order()
        if self.lru:
            assert order == expected
        else:
            assert sorted(order) == sorted(expected)

    def _refs(self) -> list[int]:
        return [b.ref_count for b in self.pool.blocks]

    def _done(self) -> None:
        self.c.ops += 1
        self.mgr.check_integrity()
        usage = self.pool.usage()
        assert usage.num_free + usage.num_cached + usage.num_in_use == usage.num_blocks

    def _took_shared(self, s: SimSeq, old_len: int, order: list[int], refs: list[int]) -> None:
        """Blocks appended to the table by a match: one more reference each, out of the eviction queue."""
        table = self.mgr.block_table(s.seq_id)
        new = table[old_len:]
        for j, block_id in enumerate(new, start=old_len):
            assert refs[block_id] + 1 == self.pool.blocks[block_id].ref_count
            # the shared block holds exactly this sequence's tokens (same namespace) up to its end
            assert self.c.contents.get(block_id) == (s.namespace, tuple(s.tokens[:(j + 1) * self.bs])), (
                f"block {block_id} shared for the wrong content"
            )
        others = set(range(self.pool.num_blocks)) - set(new)
        assert all(self.pool.blocks[i].ref_count == refs[i] for i in others)
        gone = set(new)
        self._order_is([b for b in order if b not in gone])
        self.c.hits += len(new) * self.bs

    def open(self, s: SimSeq) -> None:
        order, refs = self.pool.eviction_order(), self._refs()
        cached = self.mgr.open(s.seq_id, s.tokens, s.namespace)
        assert cached % self.bs == 0 and cached <= len(s.tokens) - 1
        assert cached == len(self.mgr.block_table(s.seq_id)) * self.bs
        self._took_shared(s, 0, order, refs)
        s.computed = cached
        self._done()

    def extend_match(self, s: SimSeq) -> None:
        old_len = len(self.mgr.block_table(s.seq_id))
        order, refs = self.pool.eviction_order(), self._refs()
        cached = self.mgr.extend_match(s.seq_id, len(s.tokens))
        if cached > s.computed:
            assert s.computed == old_len * self.bs  # only a sequence that computed nothing picks up blocks
            assert cached <= len(s.tokens) - 1
            self._took_shared(s, old_len, order, refs)
            self.c.extended += len(self.mgr.block_table(s.seq_id)) - old_len
            s.computed = cached
        else:
            assert len(self.mgr.block_table(s.seq_id)) == old_len
            self._order_is(order)
            assert self._refs() == refs
        self._done()

    def allocate(self, s: SimSeq, end: int) -> bool:
        order, refs = self.pool.eviction_order(), self._refs()
        hashes = [b.block_hash for b in self.pool.blocks]
        usage, evictions = self.pool.usage(), self.pool.num_evictions
        table = list(self.mgr.block_table(s.seq_id))
        need = self.mgr.blocks_needed(s.seq_id, end)
        ok = self.mgr.allocate(s.seq_id, end)
        if not ok:
            assert need > usage.num_free + usage.num_cached
            assert self.mgr.block_table(s.seq_id) == table
            self._order_is(order)
            assert self._refs() == refs and self.pool.usage() == usage
            assert [b.block_hash for b in self.pool.blocks] == hashes
            self.c.alloc_failures += 1
            self._done()
            return False
        new = self.mgr.block_table(s.seq_id)[len(table):]
        assert len(new) == need
        n_evict = max(0, need - usage.num_free)
        evicted = order[:n_evict]  # the policy's first victims (LRU: the least recently used)
        assert self.pool.num_evictions == evictions + n_evict
        if self.lru:
            assert self.pool.eviction_order() == order[n_evict:]
        else:  # the policy's order before is its order of eviction
            assert self.pool.eviction_order() == order[n_evict:] or sorted(self.pool.eviction_order()) == sorted(
                order[n_evict:])
        assert set(evicted) <= set(new)
        for block_id in new:
            assert refs[block_id] == 0 and self.pool.blocks[block_id].ref_count == 1
            assert self.pool.blocks[block_id].block_hash is None
        for block_id in evicted:
            old = hashes[block_id]
            assert old is not None and self.mgr.index.get(old) is None  # its hash left the index with it
        for block_id in set(range(self.pool.num_blocks)) - set(new):
            assert self.pool.blocks[block_id].block_hash == hashes[block_id]  # nothing else lost its hash
        self._done()
        return True

    def commit(self, s: SimSeq, end: int) -> None:
        table = self.mgr.block_table(s.seq_id)
        order, refs = self.pool.eviction_order(), self._refs()
        for j in range(s.computed // self.bs, -(-end // self.bs)):
            block_id = table[j]
            assert self.pool.blocks[block_id].ref_count == 1, "writing K/V into a shared block"
            self.c.contents[block_id] = (s.namespace, tuple(s.tokens[:min(end, (j + 1) * self.bs)]))
        self.mgr.commit(s.seq_id, s.tokens, end)
        s.computed = end
        self._order_is(order)
        assert self._refs() == refs
        for j in range(end // self.bs):  # full blocks: published under their own hash, or a copy of a published one
            h = self.mgr._seqs[s.seq_id].hashes[j]
            own, holder = table[j], self.mgr.index.get(h)
            if self.pool.blocks[own].block_hash is not None:
                assert self.pool.blocks[own].block_hash == h and holder == own
            else:  # another block published this content first (it may have been evicted since)
                assert holder != own
            if holder is not None:
                assert self.c.contents[holder] == (s.namespace, tuple(s.tokens[:(j + 1) * self.bs]))
        self._done()

    def close(self, s: SimSeq) -> None:
        table = list(self.mgr.block_table(s.seq_id))
        order, refs = self.pool.eviction_order(), self._refs()
        usage = self.pool.usage()
        self.mgr.close(s.seq_id)
        assert len(set(table)) == len(table)
        for block_id in table:
            assert self.pool.blocks[block_id].ref_count == refs[block_id] - 1
        # blocks dropping to 0 references with a hash join the end of the queue, tail first
        newly = [b for b in reversed(table) if refs[b] == 1 and self.pool.blocks[b].block_hash is not None]
        self._order_is(order + newly)
        freed = sum(1 for b in table if refs[b] == 1 and self.pool.blocks[b].block_hash is None)
        assert self.pool.usage().num_free == usage.num_free + freed
        self._done()


def _chunk(rng: random.Random, s: SimSeq, bs: int) -> int:
    """The end of the next prompt chunk: block aligned unless it reaches the prompt's end."""
    left = s.prompt_len - s.computed
    end = s.computed + rng.choice([1, 2, 3, 4, 8]) * bs
    return s.prompt_len if end >= s.prompt_len or left <= bs else end


@pytest.mark.slow
@pytest.mark.parametrize("policy", EVICTION_POLICIES)
def test_cache_manager_1000_random_requests_keep_integrity_and_leak_no_block(policy: str) -> None:
    t0 = time.perf_counter()
    rng = random.Random(SIM_SEED)
    num_blocks, bs, max_open = 64, 4, 12
    counts = Counts()
    mgr = CacheManager(num_blocks, bs, "tiny-sim", "bs4/float32",
                       eviction=EvictionConfig(policy, ttft_slo_s=1.0, prefill_tokens_per_s=24.0))
    cm = CheckedManager(mgr, counts)
    prefixes = [[rng.randrange(256) for _ in range(n)] for n in (8, 12, 16, 20, 24, 5)]
    namespaces = ["default", "default", "default", "tenant-b"]
    open_seqs: dict[str, SimSeq] = {}
    started = 0
    stuck = 0

    def new_seq() -> SimSeq:
        r = rng.random()
        if r < 0.7:
            prompt = list(rng.choice(prefixes)) + [rng.randrange(256) for _ in range(rng.randrange(0, 16))]
        elif r < 0.8 and started:
            prompt = list(rng.choice(prefixes)[:rng.randrange(1, 5) * bs])  # exactly k blocks long
        else:
            prompt = [rng.randrange(256) for _ in range(rng.randrange(1, 48))]
        return SimSeq(f"s{started}", rng.choice(namespaces), prompt, len(prompt), rng.randrange(0, 5))

    def abort(s: SimSeq) -> None:
        cm.close(s)
        del open_seqs[s.seq_id]
        counts.aborts += 1

    while started < NUM_REQUESTS or open_seqs:
        if started < NUM_REQUESTS and (not open_seqs or (len(open_seqs) < max_open and rng.random() < 0.3)):
            s = new_seq()
            started += 1
            open_seqs[s.seq_id] = s
            cm.open(s)
            continue
        s = open_seqs[rng.choice(list(open_seqs))]
        if rng.random() < 0.03:
            abort(s)
            continue
        if s.computed < s.prompt_len:  # prefill
            cm.extend_match(s)
            if mgr.waits_for_other(s.seq_id, s.computed):
                counts.waits += 1
                stuck += 1
                assert stuck < 10_000, "every open sequence waits for another: deadlock"
                continue
            end = _chunk(rng, s, bs)
            if not cm.allocate(s, end):
                abort(s)  # the pool is short: give the blocks back
                continue
            cm.commit(s, end)
        elif len(s.tokens) - s.prompt_len < s.max_new:  # decode: a new token, then its K/V
            s.tokens.append(rng.randrange(256))
            if not cm.allocate(s, len(s.tokens)):
                abort(s)
                continue
            cm.commit(s, len(s.tokens))
        else:
            cm.close(s)
            del open_seqs[s.seq_id]
            counts.completed += 1
        stuck = 0

    usage = mgr.pool.usage()
    assert usage.num_in_use == 0, f"{usage.num_in_use} blocks leaked"
    assert usage.num_free + usage.num_cached == num_blocks
    assert all(b.ref_count == 0 for b in mgr.pool.blocks)
    cached = mgr.pool.eviction_order()
    assert len(cached) == usage.num_cached
    for block_id in cached:
        h = mgr.pool.blocks[block_id].block_hash
        assert h is not None and mgr.index.get(h) == block_id
    assert len(mgr.index) == len(cached)
    assert mgr._pending == {}
    assert counts.completed + counts.aborts == NUM_REQUESTS
    assert mgr.pool.num_evictions > 0
    assert counts.hits > 0 and counts.extended > 0 and counts.waits > 0
    assert counts.aborts > 0 and counts.alloc_failures > 0 and counts.completed > NUM_REQUESTS // 2
    assert time.perf_counter() - t0 < 30


# -- Engine level ----------------------------------------------------------------------------------
ENGINE_OPTIONS = dict(block_size=4, kv_cache_tokens=256, max_num_seqs=4, max_prefill_tokens=16)


@pytest.mark.slow
@pytest.mark.timeout(300)  # ~40 s on 2 busy cores for 1,000 requests
@pytest.mark.parametrize(("eviction", "schedule", "num_requests"),
                         [("lru", "fcfs", NUM_REQUESTS), ("tlru", "lpm", 250), ("cost", "lpm", 250),
                          ("lru", "lpm", 250)])
def test_engine_1000_random_requests_with_aborts_keep_integrity_and_match_uncached_outputs(
        eviction: str, schedule: str, num_requests: int) -> None:
    """Every eviction policy and schedule (the default with 1,000 requests, the others with 250)."""
    NUM_REQUESTS = num_requests  # noqa: N806
    rng = random.Random(ENGINE_SEED)
    engine = tiny_engine("qwen2", **ENGINE_OPTIONS, eviction=eviction, schedule=schedule, ttft_slo_ms=50.0)
    prefixes = [[rng.randrange(256) for _ in range(n)] for n in (4, 8, 16, 32, 56)]
    prompts: dict[str, tuple[list[int], int]] = {}
    in_flight: list[str] = []
    done: dict[str, tuple[int, ...]] = {}
    reasons: Counter[str] = Counter()
    cached_tokens: dict[str, int] = {}
    submitted = idle = 0

    def collect(rid: str) -> None:
        c = engine.completion(rid)
        in_flight.remove(rid)
        reasons[c.finish_reason] += 1
        if c.finish_reason != "abort":
            assert len(c.token_ids) <= prompts[rid][1]
            done[rid] = c.token_ids
            cached_tokens[rid] = c.usage.cached_tokens

    while submitted < NUM_REQUESTS or in_flight:
        if submitted < NUM_REQUESTS and len(in_flight) < 8:
            for _ in range(min(rng.randint(1, 4), NUM_REQUESTS - submitted)):
                if rng.random() < 0.75:
                    prompt = list(rng.choice(prefixes)) + [rng.randrange(256) for _ in range(rng.randrange(0, 16))]
                else:
                    prompt = [rng.randrange(256) for _ in range(rng.randrange(1, 72))]
                max_tokens = rng.randrange(0, 5)
                rid = engine.add_request(prompt, SamplingParams(max_tokens=max_tokens))
                prompts[rid] = (prompt, max_tokens)
                in_flight.append(rid)
                submitted += 1
        steps = engine.stats().num_steps
        updates = engine.step()
        engine.check_integrity()
        idle = 0 if engine.stats().num_steps > steps else idle + 1
        assert idle < 100, "the engine stopped making progress"
        for u in updates:
            if u.finished:
                collect(u.request_id)
        if in_flight and rng.random() < 0.08:
            rid = rng.choice(in_flight)
            engine.abort(rid)
            engine.check_integrity()
            collect(rid)

    assert not engine.has_unfinished()
    assert engine.unfinished_ids() == set() and engine.num_unfinished() == 0
    stats = engine.stats()
    assert stats.cache.usage.num_in_use == 0
    assert stats.cache.usage.num_free + stats.cache.usage.num_cached == stats.cache.usage.num_blocks
    assert stats.cache.num_evictions > 0
    assert stats.num_cached_tokens > 0
    assert reasons["abort"] > 0 and len(done) + reasons["abort"] == NUM_REQUESTS

    # exactness under churn: the same prompts alone, without any cache, give the same greedy tokens
    reference = tiny_engine("qwen2", **ENGINE_OPTIONS, enable_prefix_caching=False)
    # (every completed request that generated tokens, not just a sample: it takes about a second)
    checked = [r for r in done if prompts[r][1] > 0]
    assert len(checked) > NUM_REQUESTS // 2
    assert sum(1 for r in checked if cached_tokens[r] > 0) > len(checked) // 4  # many were partly cache hits
    for rid in checked:
        prompt, max_tokens = prompts[rid]
        alone = reference.generate(prompt, max_tokens=max_tokens)
        assert alone.usage.cached_tokens == 0 and len(done[rid]) >= 1
        assert alone.token_ids == done[rid], f"{rid}: {alone.token_ids} alone vs {done[rid]} under churn"
    reference.check_integrity()
    assert reference.stats().cache.usage.num_in_use == 0
