"""The Redis tier on a real Redis Cluster (3 masters on loopback, started by the tests): sharing between engines,
keys spread over every master, a master killed mid-run (requests keep succeeding, nothing damaged is served), and a
clear error at start for an unreachable or slot-less cluster."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import our_model, tiny_hf_model
from redis_helpers import RedisClusterServers
from test_tiers import PROMPT

from promptstash.cache.tiers.redis_tier import RedisClusterConfigError, RedisTier, parse_cluster_url
from promptstash.config import EngineConfig
from promptstash.engine.engine import Engine

OTHER = [(i * 13 + 5) % 256 for i in range(200)]


@pytest.fixture(scope="module")
def weights():
    return our_model(tiny_hf_model("qwen2"))


@pytest.fixture(scope="module")
def expected(weights):
    """Caching off: the logits of PROMPT and the greedy tokens of PROMPT and OTHER."""
    config = EngineConfig(dtype="float32", max_prefill_tokens=64, enable_prefix_caching=False)
    engine = Engine(weights, None, config, model_id="tiny-qwen2@test")
    result = {"logits": engine.prompt_logits(PROMPT).logits,
              "tokens": {name: engine.generate(p, max_tokens=6).token_ids
                         for name, p in (("prompt", PROMPT), ("other", OTHER))}}
    engine.close()
    return result


@pytest.fixture
def cluster(tmp_path):
    with RedisClusterServers(tmp_path / "cluster") as servers:
        yield servers


def cluster_engine(model, url: str) -> Engine:
    config = EngineConfig(dtype="float32", max_prefill_tokens=64, kv_cache_tokens=1024, redis_url=url)
    return Engine(model, None, config, model_id="tiny-qwen2@test")


def redis_tier(engine: Engine) -> RedisTier:
    return next(t for t in engine.kv_store.chain.tiers if t.name == "redis")


def test_cluster_urls_are_parsed_and_bad_ones_named() -> None:
    assert parse_cluster_url("redis+cluster://u:pw@10.0.0.1:7000,10.0.0.2:7001/0") == (
        [("10.0.0.1", 7000), ("10.0.0.2", 7001)], "u", "pw", False)
    assert parse_cluster_url("rediss+cluster://:pw@[::1]:7000") == ([("::1", 7000)], None, "pw", True)
    with pytest.raises(RedisClusterConfigError, match="only database 0"):
        parse_cluster_url("redis+cluster://127.0.0.1:7000/2")
    with pytest.raises(RedisClusterConfigError, match="HOST:PORT"):
        parse_cluster_url("redis+cluster://127.0.0.1:7000,nohost")


@pytest.mark.slow
def test_blocks_written_by_one_engine_are_read_by_another_exactly_and_spread_over_all_masters(
        weights, expected, cluster) -> None:
    first = cluster_engine(weights, cluster.url)
    assert first.generate(PROMPT, max_tokens=6).token_ids == expected["tokens"]["prompt"]
    first.generate(OTHER, max_tokens=1)
    assert first.flush_tiers()
    written = redis_tier(first).stats().num_writes
    first.close()
    per_node = [cluster.client(i).dbsize() for i in range(3)]
    assert written >= 18 + 12 and sum(per_node) == written, (written, per_node)  # 288/16 + 192/16 prompt blocks
    assert all(n >= written // 6 for n in per_node), per_node  # every master holds a fair share
    for i in range(3):  # every key is `promptstash:kv:{<block hash>}`: the whole entry is in its hash tag's slot
        for key in cluster.client(i).scan_iter():
            assert re.fullmatch(rb"promptstash:kv:\{[0-9a-f]+\}", key), key
    second = cluster_engine(weights, cluster.url)
    logits = second.prompt_logits(PROMPT)
    assert logits.num_cached_tokens == 288
    assert {t.name: t.num_loaded_blocks for t in second.stats().tiers} == {"redis": 18}
    torch.testing.assert_close(logits.logits, expected["logits"][288:], atol=1e-4, rtol=0)
    out = second.generate(OTHER, max_tokens=6)
    assert out.usage.cached_tokens == 192 and out.token_ids == expected["tokens"]["other"]
    second.check_integrity()
    second.close()


@pytest.mark.slow
def test_a_master_killed_mid_run_keeps_requests_succeeding_and_serves_nothing_damaged(
        weights, expected, cluster) -> None:
    writer = cluster_engine(weights, cluster.url)
    writer.generate(PROMPT, max_tokens=1)
    writer.generate(OTHER, max_tokens=1)
    assert writer.flush_tiers()
    writer.close()
    engine = cluster_engine(weights, cluster.url)
    tier = redis_tier(engine)
    tier.retry_interval_s = 0.05  # (5 s by default): probe the cluster often, so lost and live slots both get asked
    assert engine.generate(PROMPT[:128], max_tokens=1).usage.cached_tokens == 112  # the cluster serves
    lost = cluster.client(1).dbsize()
    assert lost > 0
    cluster.kill(1)
    for round_ in range(3):
        for name, prompt in (("prompt", PROMPT), ("other", OTHER)):
            out = engine.generate(prompt, max_tokens=6)
            assert out.token_ids == expected["tokens"][name], (round_, name)
        new = [round_ + 1] + OTHER[:100]  # new blocks: written to the live masters, dropped for the lost slots
        assert engine.generate(new, max_tokens=1).usage.completion_tokens == 1
        assert engine.flush_tiers()
    logits = engine.prompt_logits(PROMPT)  # whatever came from the pool or the live masters: exact
    torch.testing.assert_close(logits.logits, expected["logits"][logits.num_cached_tokens:], atol=1e-4, rtol=0)
    stats = redis_tier(engine).stats()
    assert stats.num_failed_reads + stats.num_failed_writes >= 1 and stats.num_corrupt == 0
    engine.check_integrity()
    engine.close()
    # a fresh engine on the damaged cluster: starts (the live nodes still report every slot assigned) and recomputes
    fresh = cluster_engine(weights, cluster.url)
    redis_tier(fresh).retry_interval_s = 0.05
    out = fresh.generate(PROMPT, max_tokens=6)
    assert out.token_ids == expected["tokens"]["prompt"] and out.usage.cached_tokens < 288
    assert redis_tier(fresh).stats().num_corrupt == 0
    fresh.check_integrity()
    fresh.close()


def test_an_unreachable_cluster_is_a_clear_error_at_start(weights) -> None:
    with pytest.raises(RedisClusterConfigError, match=r"127\.0\.0\.1:1,127\.0\.0\.1:2 cannot be used.*reachable"):
        cluster_engine(weights, "redis+cluster://127.0.0.1:1,127.0.0.1:2")  # nothing listens on ports 1, 2


@pytest.mark.slow
def test_a_cluster_with_missing_slots_is_a_clear_error_at_start(weights, tmp_path) -> None:
    with RedisClusterServers(tmp_path / "no-slots", create=False) as servers:  # cluster-enabled, never created
        with pytest.raises(RedisClusterConfigError, match=r"slots.*0 of 16384"):
            cluster_engine(weights, servers.url)
    with RedisClusterServers(tmp_path / "some-slots") as servers:
        servers.client(0).execute_command("CLUSTER", "DELSLOTSRANGE", "0", "99")  # slots 0-99 owned by no one
        with pytest.raises(RedisClusterConfigError, match=r"slots"):
            cluster_engine(weights, servers.url)
