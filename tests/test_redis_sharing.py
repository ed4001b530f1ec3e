"""The Redis tier behind the engine and between real server processes: sharing, tenant isolation,
damaged entries, and a Redis that is down or goes away (requests keep succeeding)."""

from __future__ import annotations

import time

import pytest
import redis
import torch
from conftest import our_model, tiny_hf_model
from redis_helpers import RedisServer
from test_hf_directory import _save_tiny_checkpoint
from test_server_processes import ServerProcess
from test_tiers import PROMPT

from promptstash.cache.hashing import extend_hashes, root_hash
from promptstash.config import EngineConfig
from promptstash.engine.engine import DEFAULT_NAMESPACE, Engine


@pytest.fixture(scope="module")
def weights():
    return our_model(tiny_hf_model("qwen2"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    _save_tiny_checkpoint("qwen2", path)
    return path


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


def redis_engine(model, url: str, disk_dir=None, **options) -> Engine:
    config = EngineConfig(dtype="float32", max_prefill_tokens=64, kv_cache_tokens=1024, redis_url=url,
                          kv_disk_dir=None if disk_dir is None else str(disk_dir), **options)
    return Engine(model, None, config, model_id="tiny-qwen2@test")


def reference(model, prompt) -> torch.Tensor:
    config = EngineConfig(dtype="float32", max_prefill_tokens=64, enable_prefix_caching=False)
    return Engine(model, None, config, model_id="tiny-qwen2@test").prompt_logits(prompt).logits


def test_a_prefix_computed_by_one_engine_is_loaded_from_redis_by_another_exactly(weights, redis_server) -> None:
    first = redis_engine(weights, redis_server.url)
    first.generate(PROMPT, max_tokens=1)
    first.close()
    second = redis_engine(weights, redis_server.url)
    logits = second.prompt_logits(PROMPT)
    assert logits.num_cached_tokens == 288
    assert {t.name: t.num_loaded_blocks for t in second.stats().tiers} == {"redis": 18}
    torch.testing.assert_close(logits.logits, reference(weights, PROMPT)[288:], atol=1e-4, rtol=0)
    second.check_integrity()
    second.close()


def test_tenants_never_load_each_others_blocks_from_redis(weights, redis_server) -> None:
    a = redis_engine(weights, redis_server.url)
    a.generate(PROMPT, max_tokens=1, namespace="tenant=a")
    a.close()
    b = redis_engine(weights, redis_server.url)
    assert b.generate(PROMPT, max_tokens=1, namespace="tenant=b").usage.cached_tokens == 0
    assert all(t.num_loaded_blocks == 0 for t in b.stats().tiers)
    b.close()


@pytest.mark.parametrize("damage", ["garbage", "truncate", "bit_flip"])
def test_damaged_redis_entry_is_deleted_and_recomputed_exactly(weights, redis_server, damage: str) -> None:
    first = redis_engine(weights, redis_server.url)
    first.generate(PROMPT, max_tokens=1)
    first.close()
    hashes: list[bytes] = []
    extend_hashes(hashes, root_hash(first.model_id, first.cache.kv_layout, DEFAULT_NAMESPACE), PROMPT, 16)
    raw = redis.Redis.from_url(redis_server.url)
    key = next(k for k in raw.scan_iter(match=f"*{hashes[3].hex()}*"))
    data = bytearray(raw.get(key))
    if damage == "garbage":
        data = bytearray(b"not an entry")
    elif damage == "truncate":
        data = data[:1000]
    else:
        data[-5] ^= 0x40
    raw.set(key, bytes(data))
    second = redis_engine(weights, redis_server.url)
    logits = second.prompt_logits(PROMPT)
    assert logits.num_cached_tokens == 3 * 16 and second.stats().tiers[0].num_corrupt == 1
    torch.testing.assert_close(logits.logits, reference(weights, PROMPT)[48:], atol=1e-4, rtol=0)
    second.flush_tiers()
    assert raw.get(key) != bytes(data)  # the damaged entry was deleted (and the recomputed block rewritten)
    second.close()


def test_unreachable_redis_at_start_costs_nothing_but_a_counted_failure(weights, tmp_path) -> None:
    engine = redis_engine(weights, "redis://127.0.0.1:1/0", disk_dir=tmp_path)  # nothing listens on port 1
    out = engine.generate(PROMPT, max_tokens=4)
    engine.flush_tiers()
    again = engine.generate(PROMPT, max_tokens=4)
    assert again.token_ids == out.token_ids and again.usage.cached_tokens == 288
    redis_stats = next(t for t in engine.stats().tiers if t.name == "redis")
    assert redis_stats.num_failed_writes + redis_stats.num_failed_reads >= 1
    engine.close()


@pytest.mark.slow  # waits out real reconnect back-offs
def test_redis_going_away_mid_run_keeps_requests_succeeding_and_it_reconnects(weights, redis_server, tmp_path) -> None:
    engine = redis_engine(weights, redis_server.url, disk_dir=tmp_path)
    engine.generate(PROMPT, max_tokens=1)
    redis_server.stop()
    other = [(i * 13 + 5) % 256 for i in range(200)]
    out = engine.generate(other, max_tokens=2)  # written through to disk; Redis writes fail softly
    engine.flush_tiers()
    assert out.usage.completion_tokens == 2
    redis_stats = next(t for t in engine.stats().tiers if t.name == "redis")
    assert redis_stats.num_failed_writes >= 1
    redis_tier = next(t for t in engine.kv_store.chain.tiers if t.name == "redis")
    redis_tier.retry_interval_s = 0.2  # (5 s by default)
    redis_server.start()
    deadline = time.monotonic() + 15
    attempt = 0
    while True:  # the tier retries after its back-off and reaches the restarted server
        attempt += 1
        engine.generate([attempt % 256] + [(i * 17 + 9) % 256 for i in range(64)], max_tokens=1)  # new blocks
        engine.flush_tiers()
        if redis.Redis.from_url(redis_server.url).dbsize() > 0:
            break
        assert time.monotonic() < deadline, "the Redis tier did not reconnect"
        time.sleep(0.5)
    engine.check_integrity()
    engine.close()


@pytest.mark.slow  # two server subprocesses
def test_two_server_processes_share_prefixes_through_redis(model_dir, redis_server, tmp_path) -> None:
    one = ServerProcess(model_dir, tmp_path / "kv1", "--redis-url", redis_server.url)
    two = ServerProcess(model_dir, tmp_path / "kv2", "--redis-url", redis_server.url)
    try:
        first = one.complete()
        second = two.complete()
        stats = two.stats()
    finally:
        one.stop()
        two.stop()
    prompt_len = first["usage"]["prompt_tokens"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == (prompt_len - 1) // 16 * 16
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    assert next(t for t in stats["tiers"] if t["name"] == "redis")["num_loaded_blocks"] == (prompt_len - 1) // 16
