"""Unit tests of BlockPool (ref counts, free/cached/in-use states, LRU eviction) and CacheManager
(prefix matching, publishing, eviction <-> index, waiting for concurrent computation). No model involved."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Sequence

import pytest

from promptstash.cache.block_pool import BlockPool
from promptstash.cache.hashing import block_hash, extend_hashes, root_hash
from promptstash.cache.manager import CacheManager

B = 4  # block size used throughout
MODEL = "tiny-qwen2"
LAYOUT = "bs4/float32"
NS = "default"


# -- helpers -------------------------------------------------------------------------------------
def make_manager(num_blocks: int = 8, enable_prefix_caching: bool = True, model_id: str = MODEL) -> CacheManager:
    mgr = CacheManager(num_blocks, B, model_id, LAYOUT, enable_prefix_caching)
    mgr.check_integrity()
    return mgr


def toks(n: int, start: int = 0) -> list[int]:
    return [(start + i) % 256 for i in range(n)]


def hashes_of(token_ids: Sequence[int], namespace: str = NS, model_id: str = MODEL) -> list[bytes]:
    out: list[bytes] = []
    extend_hashes(out, root_hash(model_id, LAYOUT, namespace), token_ids, B)
    return out


def prefill(mgr: CacheManager, seq_id: str, token_ids: Sequence[int], namespace: str = NS) -> int:
    """open + allocate + commit a whole prompt, checking integrity after each op; returns the cached count."""
    cached = mgr.open(seq_id, token_ids, namespace)
    mgr.check_integrity()
    assert mgr.allocate(seq_id, len(token_ids))
    mgr.check_integrity()
    mgr.commit(seq_id, token_ids, len(token_ids))
    mgr.check_integrity()
    return cached


def close(mgr: CacheManager, seq_id: str) -> None:
    mgr.close(seq_id)
    mgr.check_integrity()


def pool_snapshot(pool: BlockPool) -> tuple:
    return (pool.usage(), pool.eviction_order(), [(b.ref_count, b.block_hash) for b in pool.blocks],
            pool.num_evictions, sorted(pool._free))


def cached_pool(num_blocks: int, release_order: Sequence[int]) -> BlockPool:
    """A pool whose blocks in release_order are cached (hash set, unreferenced), released in that order."""
    pool = BlockPool(num_blocks)
    ids = pool.allocate(num_blocks)
    assert ids == list(range(num_blocks))
    for i in ids:
        pool.set_hash(i, bytes([i]) * 16)
    pool.release(release_order)
    pool.check()
    return pool


# -- BlockPool -----------------------------------------------------------------------------------
def test_pool_needs_at_least_one_block() -> None:
    with pytest.raises(ValueError):
        BlockPool(0)


def test_fresh_pool_is_all_free_and_hands_out_lowest_ids_first() -> None:
    pool = BlockPool(4)
    assert pool.usage().num_free == 4 and pool.usage().num_in_use == 0
    assert pool.allocate(2) == [0, 1]
    assert [b.ref_count for b in pool.blocks] == [1, 1, 0, 0]
    pool.check()


def test_allocate_takes_free_blocks_before_evicting_cached_ones() -> None:
    pool = BlockPool(4)
    evicted: list[int] = []
    pool._on_evict = lambda block: evicted.append(block.block_id)
    ids = pool.allocate(2)
    assert ids == [0, 1]
    for i in ids:
        pool.set_hash(i, bytes([i]) * 16)
    pool.release(ids)
    assert pool.usage().num_cached == 2 and pool.usage().num_free == 2
    assert pool.allocate(2) == [2, 3]  # the free ones, although cached ones are available too
    assert pool.num_evictions == 0 and evicted == []
    assert pool.blocks[0].block_hash is not None and pool.blocks[1].block_hash is not None
    pool.check()
    assert pool.allocate(1) == [0]  # now only cached blocks are left: the least recently released goes
    assert pool.num_evictions == 1 and evicted == [0]
    assert pool.blocks[0].block_hash is None and pool.blocks[0].ref_count == 1
    assert pool.eviction_order() == [1]
    pool.check()


def test_released_cached_blocks_become_evictable_in_the_given_order() -> None:
    pool = cached_pool(4, release_order=[2, 0, 3, 1])
    assert pool.eviction_order() == [2, 0, 3, 1]
    assert pool.usage().num_cached == 4 and pool.usage().num_free == 0
    assert pool.allocate(1) == [2]
    assert pool.allocate(2) == [0, 3]
    assert pool.eviction_order() == [1]
    assert pool.num_evictions == 3
    pool.check()


def test_released_blocks_without_hash_go_to_the_free_list_not_the_eviction_queue() -> None:
    pool = BlockPool(3)
    ids = pool.allocate(3)
    assert ids is not None
    pool.set_hash(ids[1], b"x" * 16)
    pool.release(ids)
    assert pool.eviction_order() == [1]
    assert pool.usage().num_free == 2 and pool.usage().num_cached == 1
    pool.check()


def test_touched_block_leaves_eviction_queue_and_returns_at_the_end_when_released() -> None:
    pool = cached_pool(4, release_order=[0, 1, 2, 3])
    pool.touch(1)  # a cache hit on block 1
    assert pool.blocks[1].ref_count == 1
    assert pool.eviction_order() == [0, 2, 3]
    pool.check()
    pool.release([1])
    assert pool.eviction_order() == [0, 2, 3, 1]  # most recently used: evicted last
    assert pool.allocate(3) == [0, 2, 3]
    assert pool.eviction_order() == [1]
    pool.check()


def test_touching_an_in_use_block_adds_a_reference() -> None:
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.set_hash(b, b"h" * 16)
    pool.touch(b)
    assert pool.blocks[b].ref_count == 2
    pool.release([b])
    assert pool.blocks[b].ref_count == 1 and pool.eviction_order() == []
    pool.release([b])
    assert pool.eviction_order() == [b]
    pool.check()


def test_touching_a_free_block_raises() -> None:
    pool = BlockPool(2)
    with pytest.raises(ValueError):
        pool.touch(0)
    pool.check()


def test_allocate_returns_none_and_changes_nothing_when_short() -> None:
    pool = cached_pool(4, release_order=[3, 1])  # blocks 0 and 2 stay in use
    before = pool_snapshot(pool)
    assert pool.num_available == 2
    assert pool.allocate(3) is None
    assert pool_snapshot(pool) == before
    pool.check()
    assert pool.allocate(2) == [3, 1]
    assert pool.allocate(1) is None
    pool.check()


def test_releasing_more_often_than_referenced_raises() -> None:
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.release([b])
    with pytest.raises(ValueError):
        pool.release([b])
    with pytest.raises(ValueError):
        pool.release([1])  # never allocated
    pool.check()


def test_publishing_requires_an_in_use_block() -> None:
    pool = BlockPool(2)
    with pytest.raises(ValueError):
        pool.set_hash(0, b"h" * 16)
    assert pool.blocks[0].block_hash is None


def test_pool_check_detects_a_corrupted_partition() -> None:
    pool = cached_pool(3, release_order=[0])
    pool.check()
    pool.blocks[1].ref_count = 0  # in use by nobody, yet in neither list: leaked
    with pytest.raises(AssertionError):
        pool.check()


# -- CacheManager: ref counts, LRU order, eviction -------------------------------------------------
def test_two_sequences_sharing_a_prefix_count_two_references_on_shared_blocks_only() -> None:
    mgr = make_manager(16)
    prefix = toks(8)
    a_tokens = prefix + toks(6, start=100)  # 3 full blocks + 2 tokens
    b_tokens = prefix + toks(5, start=200)
    assert prefill(mgr, "a", a_tokens) == 0
    assert prefill(mgr, "b", b_tokens) == 8
    a_table, b_table = mgr.block_table("a"), mgr.block_table("b")
    assert len(a_table) == 4 and len(b_table) == 4
    assert a_table[:2] == b_table[:2]
    assert not set(a_table[2:]) & set(b_table[2:])
    refs = [mgr.pool.blocks[i].ref_count for i in range(16)]
    for i in a_table[:2]:
        assert refs[i] == 2
    for i in a_table[2:] + b_table[2:]:
        assert refs[i] == 1
    assert sum(refs) == 2 * 2 + 2 + 2
    close(mgr, "a")
    for i in a_table[:2]:
        assert mgr.pool.blocks[i].ref_count == 1
    # a's third block was full and published -> cached; its partial last block is free
    assert mgr.pool.eviction_order() == [a_table[2]]
    assert mgr.pool.blocks[a_table[3]].block_hash is None
    close(mgr, "b")
    assert mgr.pool.usage().num_in_use == 0


def test_closing_a_sequence_makes_its_tail_blocks_evictable_before_its_head() -> None:
    mgr = make_manager(8)
    tokens = toks(13)  # 3 full blocks + 1 partial
    prefill(mgr, "a", tokens)
    table = list(mgr.block_table("a"))
    assert len(table) == 4
    close(mgr, "a")
    assert mgr.pool.eviction_order() == [table[2], table[1], table[0]]
    assert mgr.pool.usage().num_free == 8 - 3  # the partial block has no hash: free
    # take every free block, then one more: the tail block is the one evicted
    assert mgr.open("filler", toks(40, start=50), NS) == 0
    assert mgr.allocate("filler", 6 * B)
    mgr.check_integrity()
    evicted = mgr.pool.blocks[table[2]]
    assert evicted.ref_count == 1 and evicted.block_hash is None
    assert mgr.pool.eviction_order() == [table[1], table[0]]
    close(mgr, "filler")
    # the head of the prompt is still cached: a rerun hits 2 blocks, not 3
    assert mgr.open("again", tokens, NS) == 2 * B
    mgr.check_integrity()


def test_a_cache_hit_moves_blocks_to_the_most_recently_used_end() -> None:
    mgr = make_manager(16)
    prefill(mgr, "x", toks(9, start=10))  # 2 published blocks
    x = list(mgr.block_table("x"))
    prefill(mgr, "y", toks(9, start=90))
    y = list(mgr.block_table("y"))
    close(mgr, "x")
    close(mgr, "y")
    assert mgr.pool.eviction_order() == [x[1], x[0], y[1], y[0]]
    assert mgr.open("x2", toks(9, start=10), NS) == 8  # hit on x's blocks: they leave the queue
    mgr.check_integrity()
    assert mgr.pool.eviction_order() == [y[1], y[0]]
    close(mgr, "x2")
    assert mgr.pool.eviction_order() == [y[1], y[0], x[1], x[0]]  # true LRU: x now used last


def test_blocks_of_an_open_sequence_are_never_evicted() -> None:
    mgr = make_manager(8)
    keep = toks(12, start=1)
    prefill(mgr, "keep", keep)  # 3 published blocks, kept open
    kept = list(mgr.block_table("keep"))
    kept_hashes = [mgr.pool.blocks[i].block_hash for i in kept]
    prefill(mgr, "gone", toks(8, start=60))  # 2 more, then released: cached
    close(mgr, "gone")
    assert mgr.pool.usage().num_cached == 2
    mgr.open("hog", toks(64, start=120), NS)
    mgr.check_integrity()
    n = 0
    while mgr.allocate("hog", (n + 1) * B):
        n += 1
        mgr.check_integrity()
    assert n == 8 - 3  # every block except the open sequence's ones
    assert mgr.pool.num_evictions == 2
    for i, h in zip(kept, kept_hashes, strict=True):
        block = mgr.pool.blocks[i]
        assert block.ref_count == 1 and block.block_hash == h
        assert mgr.index.get(h) == i
    assert not set(kept) & set(mgr.block_table("hog"))
    close(mgr, "hog")
    close(mgr, "keep")
    assert mgr.pool.usage().num_in_use == 0


def test_manager_allocate_returns_false_and_changes_nothing_when_short() -> None:
    mgr = make_manager(4)
    prefill(mgr, "a", toks(8))
    mgr.open("b", toks(20, start=30), NS)
    before = (list(mgr.block_table("b")), pool_snapshot(mgr.pool), mgr.index.items())
    assert mgr.blocks_needed("b", 20) == 5
    assert not mgr.allocate("b", 20)
    assert (list(mgr.block_table("b")), pool_snapshot(mgr.pool), mgr.index.items()) == before
    assert mgr.allocate("b", 8)
    mgr.check_integrity()


def test_manager_close_of_unknown_sequence_raises_and_releases_nothing_twice() -> None:
    mgr = make_manager(4)
    prefill(mgr, "a", toks(8))
    close(mgr, "a")
    with pytest.raises(KeyError):
        mgr.close("a")
    mgr.check_integrity()


def test_opening_the_same_sequence_twice_raises() -> None:
    mgr = make_manager(4)
    mgr.open("a", toks(5), NS)
    with pytest.raises(ValueError):
        mgr.open("a", toks(5), NS)
    mgr.check_integrity()


def test_a_cached_hash_leaves_the_index_only_when_its_block_is_reused() -> None:
    mgr = make_manager(4)
    tokens = toks(4)  # exactly one block; prompt_len - 1 cap means a rerun must use 5+ tokens to hit it
    prefill(mgr, "a", tokens)
    (block,) = mgr.block_table("a")
    h = hashes_of(tokens)[0]
    assert mgr.index.get(h) == block and mgr.pool.blocks[block].block_hash == h
    close(mgr, "a")
    assert mgr.index.get(h) == block  # released but not reused: still published
    mgr.open("b", toks(12, start=50), NS)
    assert mgr.allocate("b", 12)  # three free blocks are enough: nothing evicted
    mgr.check_integrity()
    assert mgr.pool.num_evictions == 0 and mgr.index.get(h) == block
    close(mgr, "b")
    mgr.open("c", toks(16, start=80), NS)
    assert mgr.allocate("c", 16)  # needs all four: the cached block is reused
    mgr.check_integrity()
    assert mgr.pool.num_evictions >= 1
    assert mgr.index.get(h) is None
    assert mgr.pool.blocks[block].block_hash is None
    close(mgr, "c")
    assert mgr.open("d", tokens + [7], NS) == 0  # evicted: no longer a hit


# -- CacheManager: matching ------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_longest_prefix_match_leaves_at_least_one_token_to_compute(k: int) -> None:
    mgr = make_manager(16)
    base = toks(4 * B + 3, start=5)
    prefill(mgr, "base", base)  # 4 published blocks
    close(mgr, "base")
    assert mgr.open("exact", base[:k * B], NS) == (k - 1) * B  # k*B tokens -> k-1 blocks
    mgr.check_integrity()
    assert mgr.open("plus1", base[:k * B + 1], NS) == k * B  # k*B + 1 tokens -> k blocks
    mgr.check_integrity()
    assert len(mgr.block_table("exact")) == k - 1 and len(mgr.block_table("plus1")) == k
    assert mgr.open("one", base[:1], NS) == 0
    close(mgr, "exact")
    close(mgr, "plus1")
    close(mgr, "one")


def test_match_stops_at_the_first_differing_block() -> None:
    mgr = make_manager(16)
    base = toks(16, start=3)
    prefill(mgr, "base", base)
    close(mgr, "base")
    other = base[:4] + [255] + base[5:] + [1]  # block 1 differs, blocks 2-3 equal as tokens
    assert mgr.open("o", other, NS) == B  # chained hashes: nothing after the first miss matches
    mgr.check_integrity()


def test_same_tokens_in_another_namespace_do_not_match() -> None:
    mgr = make_manager(16)
    tokens = toks(13, start=9)
    prefill(mgr, "a", tokens, namespace="tenant-a")
    close(mgr, "a")
    assert mgr.open("b", tokens, "tenant-b") == 0
    assert mgr.open("a2", tokens, "tenant-a") == 3 * B
    mgr.check_integrity()


def test_hashes_differ_by_namespace_model_id_and_kv_layout() -> None:
    tokens = toks(8)
    base = hashes_of(tokens)
    assert base != hashes_of(tokens, namespace="other")
    assert base != hashes_of(tokens, model_id="another-model")
    other_layout: list[bytes] = []
    extend_hashes(other_layout, root_hash(MODEL, "bs4/bfloat16", NS), tokens, B)
    assert base != other_layout
    assert len(set(base) | set(hashes_of(tokens, namespace="other"))) == 4
    # the parts are length-prefixed: moving characters between parts changes the root
    assert root_hash("ab", "c", NS) != root_hash("a", "bc", NS)


def test_hash_chain_follows_the_documented_construction() -> None:
    tokens = toks(10, start=7)

    def h(*chunks: bytes) -> bytes:
        d = hashlib.blake2b(digest_size=16)
        for c in chunks:
            d.update(c)
        return d.digest()

    parts = [p.encode() for p in ("promptstash-block-v1", MODEL, LAYOUT, NS)]
    root = h(*(len(p).to_bytes(4, "little") + p for p in parts))
    assert root_hash(MODEL, LAYOUT, NS) == root
    le = [b"".join(t.to_bytes(4, "little") for t in tokens[j * B:(j + 1) * B]) for j in range(2)]
    h0 = h(root, le[0])
    h1 = h(h0, le[1])
    assert hashes_of(tokens) == [h0, h1]
    assert block_hash(root, tokens[:4]) == h0


def test_module_hashes_follow_the_documented_construction() -> None:
    from promptstash.cache.hashing import module_hashes, module_root_hash

    tokens = toks(10, start=7)

    def h(*chunks: bytes) -> bytes:
        d = hashlib.blake2b(digest_size=16)
        for c in chunks:
            d.update(c)
        return d.digest()

    parts = [p.encode() for p in ("promptstash-block-v1", MODEL, LAYOUT, NS, "module")]
    root = h(*(len(p).to_bytes(4, "little") + p for p in parts))
    assert module_root_hash(MODEL, LAYOUT, NS) == root != root_hash(MODEL, LAYOUT, NS)
    le = [b"".join(t.to_bytes(4, "little") for t in tokens[j * B:(j + 1) * B]) for j in range(3)]
    h0 = h(root, le[0])
    h1 = h(h0, le[1])
    tail = h(h1, le[2])  # the last 2 tokens: a partial block, hashed over its own tokens only
    assert module_hashes(root, tokens, B) == [h0, h1, tail]
    assert module_hashes(root, tokens[:8], B) == [h0, h1]  # no tail when the module fills its blocks
    assert tail != h(h1, le[2] + b"\0" * 8)  # a tail never equals a full block of the same tokens + padding
    assert module_root_hash(MODEL, LAYOUT, "other") != root


EXPECTED_ROOT = "0dd6c19bd4f1aaa8d9cfe340a5034311"  # root_hash("tiny-qwen2", "bs4/float32", "default")
EXPECTED_BLOCKS = ["f005a26d2b185df050aab81c81e20a60", "7e257186f775ea06a6a2a8a0afd996c0"]  # tokens 0..9


def test_block_hashes_are_stable_literals() -> None:
    assert root_hash("tiny-qwen2", "bs4/float32", "default").hex() == EXPECTED_ROOT
    assert [x.hex() for x in hashes_of(list(range(10)))] == EXPECTED_BLOCKS


def test_block_hashes_are_the_same_in_a_fresh_process() -> None:
    code = ("from promptstash.cache.hashing import extend_hashes, root_hash\n"
            "r = root_hash('tiny-qwen2', 'bs4/float32', 'default'); hs = []\n"
            "extend_hashes(hs, r, list(range(10)), 4); print(r.hex(), *[h.hex() for h in hs])\n")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == [EXPECTED_ROOT, *EXPECTED_BLOCKS]
    assert out.stdout.split() == [root_hash(MODEL, LAYOUT, NS).hex(), *[x.hex() for x in hashes_of(list(range(10)))]]


def test_disabled_prefix_caching_matches_nothing_and_publishes_nothing() -> None:
    mgr = make_manager(8, enable_prefix_caching=False)
    tokens = toks(13)
    assert prefill(mgr, "a", tokens) == 0
    assert len(mgr.index) == 0
    assert all(b.block_hash is None for b in mgr.pool.blocks)
    assert mgr.stats().num_published_blocks == 0
    assert prefill(mgr, "b", tokens) == 0
    assert not mgr.waits_for_other("b", 0)
    close(mgr, "a")
    close(mgr, "b")
    assert mgr.pool.eviction_order() == [] and mgr.pool.usage().num_free == 8
    assert mgr.open("c", tokens, NS) == 0
    assert mgr.extend_match("c", len(tokens)) == 0


def test_commit_publishes_only_full_computed_blocks() -> None:
    mgr = make_manager(8)
    tokens = toks(11)
    mgr.open("a", tokens, NS)
    assert mgr.allocate("a", 6)
    mgr.commit("a", tokens, 6)  # block 0 full, block 1 half computed
    mgr.check_integrity()
    hs = hashes_of(tokens)
    table = mgr.block_table("a")
    assert mgr.index.get(hs[0]) == table[0]
    assert mgr.index.get(hs[1]) is None and mgr.pool.blocks[table[1]].block_hash is None
    assert mgr.allocate("a", 11)
    mgr.commit("a", tokens, 11)
    mgr.check_integrity()
    assert mgr.index.get(hs[1]) == table[1]
    assert len(mgr.index) == 2 and mgr.stats().num_published_blocks == 2  # the partial block 2 is not published
    tokens.append(99)  # a generated token fills block 2
    assert mgr.allocate("a", 12)
    mgr.commit("a", tokens, 12)
    mgr.check_integrity()
    assert mgr.index.get(hashes_of(tokens)[2]) == table[2]


def test_duplicate_computation_keeps_the_first_published_block_and_frees_the_copy() -> None:
    mgr = make_manager(8)
    tokens = toks(9)
    mgr.open("a", tokens, NS)
    mgr.open("b", tokens, NS)  # b ignores the wait and computes the same blocks itself
    for sid in ("a", "b"):
        assert mgr.allocate(sid, 9)
        mgr.check_integrity()
    mgr.commit("a", tokens, 9)
    mgr.commit("b", tokens, 9)
    mgr.check_integrity()
    a, b = mgr.block_table("a"), mgr.block_table("b")
    hs = hashes_of(tokens)
    assert [mgr.index.get(h) for h in hs] == a[:2]
    assert all(mgr.pool.blocks[i].block_hash is None for i in b)
    close(mgr, "b")
    assert mgr.pool.eviction_order() == []  # b's copies had no hash: straight to the free list
    close(mgr, "a")
    assert mgr.pool.eviction_order() == [a[1], a[0]]


# -- CacheManager: waiting for a concurrent sequence's blocks -------------------------------------
def test_second_sequence_waits_for_blocks_the_first_is_computing_then_shares_them() -> None:
    mgr = make_manager(16)
    prompt = toks(13, start=40)  # 3 full blocks
    assert mgr.open("a", prompt, NS) == 0
    assert not mgr.waits_for_other("a", 0)  # a owns the pending blocks
    b_prompt = prompt[:12] + toks(3, start=200)  # same 3 full blocks, different tail
    assert mgr.open("b", b_prompt, NS) == 0
    mgr.check_integrity()
    assert mgr.waits_for_other("b", 0)
    # a computes its first block only
    assert mgr.allocate("a", 4)
    mgr.commit("a", prompt, 4)
    mgr.check_integrity()
    assert mgr.extend_match("b", len(b_prompt)) == B
    assert mgr.block_table("b") == mgr.block_table("a")[:1]
    assert mgr.pool.blocks[mgr.block_table("a")[0]].ref_count == 2
    assert mgr.waits_for_other("b", B)  # block 1 is still being computed by a
    assert not mgr.waits_for_other("b", B + 1)  # only block starts can wait
    # a finishes its prompt
    assert mgr.allocate("a", 13)
    mgr.commit("a", prompt, 13)
    mgr.check_integrity()
    assert mgr.extend_match("b", len(b_prompt)) == 3 * B
    assert mgr.block_table("b") == mgr.block_table("a")[:3]
    assert not mgr.waits_for_other("b", 3 * B)  # b's own tail block: nobody else computes it
    for i in mgr.block_table("a")[:3]:
        assert mgr.pool.blocks[i].ref_count == 2
    assert mgr.allocate("b", len(b_prompt))
    mgr.commit("b", b_prompt, len(b_prompt))
    mgr.check_integrity()
    table = list(mgr.block_table("b"))
    mgr.extend_match("b", len(b_prompt))  # after computing, matching no longer changes the table
    assert mgr.block_table("b") == table
    close(mgr, "a")
    close(mgr, "b")
    assert mgr.pool.usage().num_in_use == 0


def test_waiting_sequence_stops_waiting_when_the_owner_aborts_before_committing() -> None:
    mgr = make_manager(16)
    prompt = toks(9, start=70)
    mgr.open("a", prompt, NS)
    assert mgr.allocate("a", 9)  # allocated but never committed
    mgr.open("b", prompt, NS)
    assert mgr.waits_for_other("b", 0)
    close(mgr, "a")  # abort
    assert not mgr.waits_for_other("b", 0)
    assert mgr.extend_match("b", len(prompt)) == 0  # nothing was published
    assert len(mgr.index) == 0
    assert mgr.pool.usage().num_in_use == 0 and mgr.pool.usage().num_cached == 0
    # b now computes the blocks itself, and a later sequence waits for b
    mgr.open("c", prompt, NS)
    assert not mgr.waits_for_other("c", 0)  # b registered nothing while a owned the blocks
    assert mgr.allocate("b", 9)
    mgr.commit("b", prompt, 9)
    mgr.check_integrity()
    assert mgr.extend_match("c", len(prompt)) == 2 * B


def test_waiting_sequence_stops_waiting_after_owner_aborts_midway() -> None:
    mgr = make_manager(16)
    prompt = toks(13, start=11)
    mgr.open("a", prompt, NS)
    mgr.open("b", prompt, NS)
    assert mgr.allocate("a", 4)
    mgr.commit("a", prompt, 4)  # block 0 published, blocks 1-2 still pending on a
    assert mgr.extend_match("b", 13) == B
    assert mgr.waits_for_other("b", B)
    close(mgr, "a")
    assert not mgr.waits_for_other("b", B)
    assert mgr.extend_match("b", 13) == B  # block 0 stays shared (b holds it), nothing more
    assert mgr.pool.blocks[mgr.block_table("b")[0]].ref_count == 1
    mgr.check_integrity()


def test_sequence_opened_after_publication_hits_instead_of_waiting() -> None:
    mgr = make_manager(16)
    prompt = toks(9, start=33)
    prefill(mgr, "a", prompt)
    assert mgr.open("b", prompt, NS) == 2 * B
    assert not mgr.waits_for_other("b", 2 * B)
    mgr.check_integrity()


def test_sequence_that_computed_its_own_blocks_no_longer_picks_up_published_ones() -> None:
    mgr = make_manager(16)
    prompt = toks(13, start=21)
    mgr.open("a", prompt, NS)
    mgr.open("b", prompt, NS)
    assert mgr.allocate("b", 4)
    mgr.commit("b", prompt, 4)  # b ignored the wait and computed block 0 itself
    assert mgr.allocate("a", 13)
    mgr.commit("a", prompt, 13)  # a publishes blocks 1 and 2 (block 0 was published by b first)
    mgr.check_integrity()
    b_table = list(mgr.block_table("b"))
    assert mgr.extend_match("b", 13) == B
    assert mgr.block_table("b") == b_table
    assert not mgr.waits_for_other("b", B)
    for i in mgr.block_table("a")[1:3]:
        assert mgr.pool.blocks[i].ref_count == 1
    mgr.check_integrity()
