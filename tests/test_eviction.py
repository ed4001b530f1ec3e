"""Eviction policies (cache/eviction.py): each checked op by op against a naive reference model of the pool,
plus the behaviour each policy exists for, and TTL protection under every policy."""

from __future__ import annotations

import random

import pytest

from promptstash.cache.block_pool import BlockPool
from promptstash.cache.eviction import (
    EVICTION_POLICIES,
    CostAwarePolicy,
    EvictionConfig,
    LRUPolicy,
    TailOptimizedLRUPolicy,
    make_policy,
)
from promptstash.cache.manager import CacheManager
from promptstash.config import EngineConfig
from promptstash.errors import InvalidRequestError

BS = 4


# -- reference models: O(n) lists, written without the policies' data structures ----------------------
class RefLRU:
    def __init__(self) -> None:
        self.queue: list[int] = []

    def add(self, b: int) -> None:
        self.queue.append(b)

    def remove(self, b: int) -> None:
        self.queue.remove(b)

    def order(self) -> list[int]:
        return list(self.queue)

    def pop(self) -> int:
        return self.queue.pop(0)

    def note(self, blocks: list[int], seq_len: int) -> None:
        pass


class RefTLRU(RefLRU):
    """Safe blocks first in release order, then the others in release order; safe = in the tail of the last
    sequence that closed holding it, beyond what keeps budget - next_turn tokens."""

    def __init__(self, budget_tokens: float, next_turn_tokens: int) -> None:
        super().__init__()
        self.spare = budget_tokens - next_turn_tokens
        self.safe: set[int] = set()
        self.needed: set[int] = set()  # once outside some sequence's safe tail, never safe until evicted

    def order(self) -> list[int]:
        return [b for b in self.queue if b in self.safe] + [b for b in self.queue if b not in self.safe]

    def pop(self) -> int:
        b = self.order()[0]
        self.queue.remove(b)
        self.safe.discard(b)
        self.needed.discard(b)
        return b

    def note(self, blocks: list[int], seq_len: int) -> None:
        for j, b in enumerate(blocks):
            tokens_kept = j * BS  # keeping blocks [0, j) leaves seq_len - tokens_kept to recompute
            if seq_len - tokens_kept > self.spare:
                self.needed.add(b)
            if b in self.needed:
                self.safe.discard(b)
            else:
                self.safe.add(b)


class RefCost(RefLRU):
    """Lowest (L + uses * cost) first, ties in release order; L = the last victim's priority."""

    def __init__(self, attention_tokens: int) -> None:
        super().__init__()
        self.attention_tokens = attention_tokens
        self.level = 0.0
        self.priority: dict[int, float] = {}
        self.cost: dict[int, float] = {}
        self.uses: dict[int, int] = {}

    def add(self, b: int) -> None:
        super().add(b)
        self.priority[b] = self.level + self.uses.get(b, 1) * self.cost.get(b, 1.0)

    def order(self) -> list[int]:
        return sorted(self.queue, key=lambda b: (self.priority[b], self.queue.index(b)))

    def pop(self) -> int:
        b = self.order()[0]
        self.queue.remove(b)
        self.level = self.priority.pop(b)
        self.cost.pop(b, None)
        self.uses.pop(b, None)
        return b

    def note(self, blocks: list[int], seq_len: int) -> None:
        n = len(blocks)
        for j, b in enumerate(blocks):
            cost = sum(1 + (k + 0.5) * BS / self.attention_tokens for k in range(j, n))
            self.cost[b] = max(self.cost.get(b, 0.0), cost)
            self.uses[b] = self.uses.get(b, 0) + 1


def _pair(policy: str):
    if policy == "lru":
        return LRUPolicy(), RefLRU()
    if policy == "tlru":  # budget 40 tokens, 12 of them for the next turn: the last 28 tokens are safe
        return TailOptimizedLRUPolicy(BS, ttft_slo_s=2.0, prefill_tokens_per_s=20.0, next_turn_tokens=12), \
            RefTLRU(40.0, 12)
    return CostAwarePolicy(BS, attention_tokens=16), RefCost(16)


@pytest.mark.parametrize("policy", EVICTION_POLICIES)
def test_every_pool_operation_matches_the_reference_model(policy: str) -> None:
    """Random sequences over a small pool: allocate (evicting), publish, hit, close with the policy's hint."""
    rng = random.Random(13)
    impl, ref = _pair(policy)
    pool = BlockPool(24, policy=impl)
    seqs: list[list[int]] = []
    victims_seen = 0
    for _ in range(3000):
        op = rng.random()
        if op < 0.35 or not seqs:  # a new sequence: a few blocks, some published
            n = rng.randrange(1, 7)
            if pool.num_available < n:
                continue
            expected = [ref.pop() for _ in range(max(0, n - pool.usage().num_free))]
            before = pool.num_evictions
            ids = pool.allocate(n)
            assert ids is not None
            assert pool.num_evictions - before == len(expected)
            assert set(expected) <= set(ids), f"{policy}: evicted {set(ids) - set(expected)}, model {expected}"
            victims_seen += len(expected)
            for b in ids:
                if rng.random() < 0.8:
                    pool.set_hash(b, rng.randbytes(8))
            seqs.append(ids)
        elif op < 0.55:  # a hit on a cached block joins an open sequence
            cached = pool.eviction_order()
            if not cached:
                continue
            b = rng.choice(cached)
            pool.touch(b)
            ref.remove(b)
            rng.choice(seqs).append(b)
        else:  # a sequence closes: hint (published blocks, head first), then release tail first
            seq = seqs.pop(rng.randrange(len(seqs)))
            published = [b for b in seq if pool.blocks[b].block_hash is not None]
            seq_len = len(seq) * BS - rng.randrange(BS)
            impl.note_sequence(published, seq_len)
            ref.note(published, seq_len)
            pool.release(reversed(seq))
            for b in reversed(seq):
                if pool.blocks[b].ref_count == 0 and pool.blocks[b].block_hash is not None and b not in ref.queue:
                    ref.add(b)
        pool.check()
        assert pool.eviction_order() == ref.order(), policy
    assert victims_seen > 100


def _manager(policy: str, num_blocks: int = 64, **options) -> CacheManager:
    return CacheManager(num_blocks, BS, "m", "bs4/float32", eviction=EvictionConfig(policy, **options))


def _run(mgr: CacheManager, seq_id: str, tokens: list[int], namespace: str = "t") -> int:
    """Open, compute and close one sequence; returns its cached tokens."""
    cached = mgr.open(seq_id, tokens, namespace)
    assert mgr.allocate(seq_id, len(tokens))
    mgr.commit(seq_id, tokens, len(tokens))
    mgr.close(seq_id)
    mgr.check_integrity()
    return cached


def _blocks_of(mgr: CacheManager, tokens: list[int], namespace: str = "t") -> list[int]:
    return mgr.index.longest_prefix(mgr.prefix_hashes(tokens, namespace))


def test_tlru_puts_each_conversations_safe_tail_before_every_other_block() -> None:
    # budget 8 tokens, next turn 0: a turn's last 8 tokens (2 blocks) can be recomputed within the target
    mgr = _manager("tlru", ttft_slo_s=1.0, prefill_tokens_per_s=8.0, next_turn_tokens=0)
    a, b = list(range(100, 124)), list(range(200, 224))  # 6 blocks each
    _run(mgr, "a", a)
    _run(mgr, "b", b)
    ab, bb = _blocks_of(mgr, a), _blocks_of(mgr, b)
    assert len(ab) == len(bb) == 6
    assert mgr.pool.eviction_order() == [ab[5], ab[4], bb[5], bb[4], ab[3], ab[2], ab[1], ab[0],
                                         bb[3], bb[2], bb[1], bb[0]]
    lru = _manager("lru")
    _run(lru, "a", a)
    _run(lru, "b", b)
    assert lru.pool.eviction_order() == _blocks_of(lru, a)[::-1] + _blocks_of(lru, b)[::-1]


def test_tlru_safe_tail_follows_the_measured_prefill_rate() -> None:
    mgr = _manager("tlru", ttft_slo_s=1.0, prefill_tokens_per_s=8.0, next_turn_tokens=0)
    mgr.set_prefill_rate(16.0)  # now 16 tokens fit the target: 4 safe blocks
    a, b = list(range(100, 124)), list(range(200, 224))
    _run(mgr, "a", a)
    _run(mgr, "b", b)
    ab, bb = _blocks_of(mgr, a), _blocks_of(mgr, b)
    assert mgr.pool.eviction_order()[:8] == [ab[5], ab[4], ab[3], ab[2], bb[5], bb[4], bb[3], bb[2]]


def test_tlru_marks_nothing_safe_when_the_next_turn_alone_misses_the_target() -> None:
    mgr = _manager("tlru", ttft_slo_s=1.0, prefill_tokens_per_s=8.0, next_turn_tokens=100)
    a, b = list(range(100, 124)), list(range(200, 224))
    _run(mgr, "a", a)
    _run(mgr, "b", b)
    assert mgr.pool.eviction_order() == _blocks_of(mgr, a)[::-1] + _blocks_of(mgr, b)[::-1]  # plain LRU


def test_tlru_next_turn_is_the_median_uncached_length_of_follow_up_turns() -> None:
    policy = TailOptimizedLRUPolicy(BS, 1.0, 100.0)
    policy.note_request(500, 0)  # first turns only: their median
    policy.note_request(300, 0)
    assert policy.next_turn_tokens == 400
    for prompt_len, cached in [(120, 100), (150, 120), (260, 200)]:  # follow-ups: 20, 30, 60 new tokens
        policy.note_request(prompt_len, cached)
    assert policy.next_turn_tokens == 30


def test_tlru_a_block_some_conversation_needed_is_never_safe_again_until_evicted() -> None:
    mgr = _manager("tlru", ttft_slo_s=1.0, prefill_tokens_per_s=8.0, next_turn_tokens=0)
    system = list(range(100, 116))  # 4 blocks shared by two conversations
    _run(mgr, "long", system + list(range(300, 332)))  # 12 blocks: its first 10 (the system prompt too) needed
    _run(mgr, "short", system + [7] * 4)  # 5 blocks: all in its safe tail, but the system prompt stays unsafe
    head = _blocks_of(mgr, system)
    assert set(head).isdisjoint(mgr.pool.eviction_order()[:4])


def test_tlru_a_longer_conversation_sharing_a_safe_block_makes_it_unsafe_again() -> None:
    mgr = _manager("tlru", ttft_slo_s=1.0, prefill_tokens_per_s=8.0, next_turn_tokens=0)
    turn1 = list(range(100, 116))  # 4 blocks: the last 2 safe
    _run(mgr, "t1", turn1)
    turn2 = turn1 + list(range(300, 316))  # the next turn: 8 blocks, its last 2 safe, turn 1's blocks not
    assert _run(mgr, "t2", turn2) == 16  # turn 1 was a hit
    blocks = _blocks_of(mgr, turn2)
    assert mgr.pool.eviction_order()[:2] == [blocks[7], blocks[6]]
    assert set(blocks[:6]).isdisjoint(mgr.pool.eviction_order()[:2])


def test_cost_keeps_a_long_documents_head_and_drops_a_short_one_used_later() -> None:
    long_doc, short_doc = list(range(1000, 1160)), list(range(2000, 2016))  # 40 and 4 blocks

    def run(policy: str) -> tuple[int, int]:
        mgr = _manager(policy, num_blocks=48)
        _run(mgr, "long", long_doc)
        _run(mgr, "short", short_doc)
        other = list(range(5000, 5048))  # 12 blocks: 4 free, 8 evicted
        _run(mgr, "other", other)
        return len(_blocks_of(mgr, long_doc)), len(_blocks_of(mgr, short_doc))

    assert run("lru") == (32, 4)  # LRU: the long document (used first) loses 8 tail blocks
    long_kept, short_kept = run("cost")
    assert short_kept == 0 and long_kept == 36  # cost: the cheap short document goes, the long head stays


def test_cost_a_block_used_by_more_sequences_outlives_an_equal_one_used_once() -> None:
    mgr = _manager("cost", num_blocks=12)
    shared, lone = list(range(100, 108)), list(range(200, 208))  # 2 blocks each
    _run(mgr, "lone", lone)
    for i in range(3):
        _run(mgr, f"s{i}", shared + [900 + i] * 5)  # 3 uses of the shared head
    order = mgr.pool.eviction_order()
    assert order.index(_blocks_of(mgr, lone)[0]) < order.index(_blocks_of(mgr, shared)[0])


def test_cost_priority_ages_so_an_idle_block_is_eventually_evicted() -> None:
    policy = CostAwarePolicy(BS, attention_tokens=8192)
    pool = BlockPool(3, policy=policy)
    [old] = pool.allocate(1)
    pool.set_hash(old, b"old")
    policy.note_sequence([old], 4)
    policy.note_sequence([old], 4)  # two uses: priority 2
    pool.release([old])
    for i in range(6):  # single-use blocks come and go; each eviction raises L
        ids = pool.allocate(2)
        assert ids is not None
        for b in ids:
            pool.set_hash(b, f"n{i}{b}".encode())
        pool.release(ids)
        if pool.blocks[old].block_hash != b"old":
            break
    else:
        pytest.fail("the idle block was never evicted")


@pytest.mark.parametrize("policy", EVICTION_POLICIES)
def test_ttl_protected_blocks_are_never_evicted_under_any_policy(policy: str) -> None:
    now = [0.0]
    mgr = CacheManager(16, BS, "m", "bs4/float32", clock=lambda: now[0], max_protected_blocks=8,
                       eviction=EvictionConfig(policy, ttft_slo_s=1.0, prefill_tokens_per_s=1000.0,
                                               next_turn_tokens=0))
    system = list(range(100, 116))  # 4 blocks, every one of them "safe" for tlru
    mgr.open("p", system + [1], "t")
    assert mgr.allocate("p", 17)
    mgr.commit("p", system + [1], 17)
    assert not mgr.protect("p", [(16, "5m")]).refused
    mgr.close("p")
    for i in range(10):  # fill the rest of the pool again and again
        _run(mgr, f"o{i}", list(range(1000 * (i + 1), 1000 * (i + 1) + 44)))
        assert len(_blocks_of(mgr, system)) == 4, f"{policy}: a protected block was evicted"
    assert mgr.pool.num_evictions > 0
    now[0] = 301.0  # the TTL passed: the blocks are ordinary cached blocks again
    mgr.expire()
    _run(mgr, "last", list(range(9000, 9056)))  # 14 blocks: more than the 12 unprotected ones
    assert len(_blocks_of(mgr, system)) < 4


def test_a_preempted_sequence_gives_the_policy_no_hint() -> None:
    mgr = _manager("tlru", ttft_slo_s=1.0, prefill_tokens_per_s=8.0, next_turn_tokens=0)
    tokens = list(range(100, 124))
    mgr.open("a", tokens, "t")
    assert mgr.allocate("a", 24)
    mgr.commit("a", tokens, 24)
    mgr.close("a", turn_ended=False)
    assert mgr.pool.eviction_order() == _blocks_of(mgr, tokens)[::-1]  # LRU order: nothing marked safe


def test_make_policy_builds_each_named_policy() -> None:
    for name in EVICTION_POLICIES:
        assert make_policy(EvictionConfig(name), BS).name == name


@pytest.mark.parametrize("options", [dict(eviction="lfu"), dict(schedule="sjf"), dict(ttft_slo_ms=0),
                                     dict(max_wait_ms=-1), dict(ttft_slo_ms="fast")])
def test_unknown_policy_or_bad_target_is_a_clear_error(options: dict) -> None:
    with pytest.raises(InvalidRequestError) as err:
        EngineConfig(**options)
    assert next(iter(options)) in str(err.value)
    with pytest.raises(ValueError):
        EvictionConfig("lfu")
