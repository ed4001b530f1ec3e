"""TTL protection in the cache manager (cache_control breakpoints): protected blocks survive eviction
pressure until their TTL has passed since their last use; the cap refuses writes; integrity holds."""

from __future__ import annotations

from server_helpers import FakeClock
from test_block_pool import LAYOUT, MODEL, NS, B, close, prefill, toks

from promptstash.cache.manager import CacheManager


def manager(num_blocks: int = 8, max_protected: int | None = None) -> tuple[CacheManager, FakeClock]:
    clock = FakeClock()
    return CacheManager(num_blocks, B, MODEL, LAYOUT, clock=clock, max_protected_blocks=max_protected), clock


def fill_pool(mgr: CacheManager, tag: int) -> None:
    """Run distinct prompts that need every evictable block."""
    num = mgr.pool.num_available
    prefill(mgr, f"flood{tag}", toks(num * B, start=100 + tag))
    close(mgr, f"flood{tag}")


def test_protected_blocks_survive_eviction_until_the_ttl_passes() -> None:
    mgr, clock = manager()
    prefill(mgr, "a", toks(12))
    result = mgr.protect("a", [(12, "5m")])
    assert result.block_classes == ("5m", "5m", "5m") and not result.refused
    close(mgr, "a")
    fill_pool(mgr, 1)
    assert mgr.open("again", toks(12) + [7], NS) == 12  # all three blocks survived
    close(mgr, "again")
    clock.advance(301)
    assert mgr.expire() == 3
    mgr.check_integrity()
    fill_pool(mgr, 2)
    assert mgr.open("late", toks(12) + [7], NS) == 0


def test_a_hit_refreshes_the_ttl() -> None:
    mgr, clock = manager()
    prefill(mgr, "a", toks(8))
    mgr.protect("a", [(8, "5m")])
    close(mgr, "a")
    clock.advance(250)
    assert mgr.open("hit", toks(8) + [1], NS) == 8
    close(mgr, "hit")
    clock.advance(250)  # 500 s after the write, 250 s after the hit
    assert mgr.expire() == 0 and mgr.protected_blocks()["5m"] == 2
    clock.advance(51)
    assert mgr.expire() == 2


def test_only_whole_blocks_inside_each_prefix_are_protected_with_the_longer_class_kept() -> None:
    mgr, _ = manager()
    prefill(mgr, "a", toks(15))
    result = mgr.protect("a", [(5, "1h"), (14, "5m")])  # block 0 (tokens 0-3) under 1h; blocks 1-2 under 5m
    assert result.block_classes == ("1h", "5m", "5m")
    assert mgr.protect("a", [(12, "1h")]).block_classes == ("1h", "1h", "1h")
    assert mgr.protected_blocks() == {"5m": 0, "1h": 3, "24h": 0}
    close(mgr, "a")
    mgr.check_integrity()


def test_write_beyond_the_cap_is_refused_and_changes_nothing() -> None:
    mgr, _ = manager(num_blocks=8, max_protected=2)
    prefill(mgr, "a", toks(12))
    result = mgr.protect("a", [(12, "1h")])
    assert result.refused and result.block_classes == ()
    assert mgr.protected_blocks()["1h"] == 0 and mgr.stats().num_refused_writes == 1
    close(mgr, "a")
    mgr.check_integrity()


def test_force_expire_frees_blocks_when_nothing_else_can() -> None:
    mgr, _ = manager(num_blocks=8, max_protected=8)
    prefill(mgr, "a", toks(24))
    mgr.protect("a", [(24, "1h")])
    close(mgr, "a")
    assert mgr.pool.num_available == 2
    assert mgr.force_expire(5) == 3
    assert mgr.pool.num_available == 5 and mgr.stats().num_forced_expiries == 3
    mgr.check_integrity()


def test_protect_does_nothing_with_caching_off() -> None:
    mgr = CacheManager(8, B, MODEL, LAYOUT, enable_prefix_caching=False)
    prefill(mgr, "a", toks(8))
    assert mgr.protect("a", [(8, "5m")]).block_classes == ()
    close(mgr, "a")
    assert mgr.pool.usage().num_free == 8


def test_engine_request_that_cannot_fit_otherwise_ends_protections_and_runs() -> None:
    from conftest import tiny_engine

    from promptstash.engine.sampling import SamplingParams

    engine = tiny_engine(kv_cache_tokens=256, max_protected_fraction=1.0)  # 16 blocks of 16 tokens
    rid = engine.add_request(toks(160), SamplingParams(max_tokens=1), cache_breakpoints=[(160, "1h")])
    first = engine.run_until_done([rid])[0]
    assert first.usage.cache_write_tokens == {"1h": 160}
    assert engine.stats().cache.num_protected_blocks["1h"] == 10
    out = engine.generate(toks(200, start=50), max_tokens=8, ignore_eos=True)
    assert out.usage.completion_tokens == 8
    assert engine.stats().cache.num_forced_expiries > 0
    engine.check_integrity()
