"""RedisTier against a real redis-server: storage, server-side expiry, sharing between instances, and a Redis
that is down at start or goes away and comes back (calls fail softly, one warning per outage, no network while
backing off, automatic reconnection)."""

from __future__ import annotations

import logging
import time

import pytest
from redis_helpers import RedisServer, free_port

from promptstash.cache.tiers.base import Tier
from promptstash.cache.tiers.redis_tier import RedisTier

H1 = bytes.fromhex("00" * 15 + "01")
H2 = bytes.fromhex("ab" * 16)
ENTRY = bytes(range(256)) * 64  # opaque, not UTF-8


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server(tmp_path):
    s = RedisServer(tmp_path / "redis")
    yield s
    s.close()


@pytest.fixture
def raw(server):
    client = server.client()
    yield client
    client.close()


def count_network_calls(tier: RedisTier, monkeypatch) -> list[int]:
    """Count connection checkouts of the tier's pool: every Redis command makes one."""
    calls = [0]
    pool = tier._client.connection_pool
    original = pool.get_connection

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(pool, "get_connection", counting)
    return calls


def warnings_of(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "promptstash.tiers" and r.levelno == logging.WARNING]


def test_redis_tier_satisfies_the_tier_protocol_and_constructs_without_connecting() -> None:
    tier: Tier = RedisTier(f"redis://127.0.0.1:{free_port()}/0")
    assert tier.name == "redis" and tier.stats().num_failed_reads == 0
    tier.close()


def test_put_then_get_returns_the_same_bytes_under_a_hash_tagged_key(server, raw) -> None:
    tier = RedisTier(server.url)
    assert tier.get(H1) is None
    assert tier.put(H1, ENTRY, ttl_s=60) is True
    assert tier.get(H1) == ENTRY
    assert raw.keys("*") == [b"promptstash:kv:{" + H1.hex().encode() + b"}"]
    s = tier.stats()
    assert (s.num_hits, s.num_misses, s.num_writes, s.num_failed_reads, s.num_failed_writes) == (1, 1, 1, 0, 0)
    assert s.load_seconds > 0
    assert (s.num_entries, s.num_bytes) == (1, len(ENTRY))  # the local estimate
    tier.close()


def test_put_replaces_an_existing_entry(server) -> None:
    tier = RedisTier(server.url)
    tier.put(H1, b"old", ttl_s=None)
    tier.put(H1, b"new", ttl_s=None)
    assert tier.get(H1) == b"new"
    tier.close()


def test_contains_and_delete(server) -> None:
    tier = RedisTier(server.url)
    assert tier.contains(H1) is False
    tier.put(H1, ENTRY, ttl_s=60)
    assert tier.contains(H1) is True and tier.contains(H2) is False
    tier.delete(H1)
    tier.delete(H2)  # deleting a missing entry is fine
    assert tier.contains(H1) is False and tier.get(H1) is None
    s = tier.stats()
    assert (s.num_entries, s.num_bytes, s.num_failed_writes) == (0, 0, 0)
    tier.close()


def test_put_sets_a_server_side_expiry_from_ttl_s_or_the_default(server, raw) -> None:
    tier = RedisTier(server.url, default_ttl_s=120.0)
    tier.put(H1, ENTRY, ttl_s=30.0)
    tier.put(H2, ENTRY, ttl_s=None)  # falls back to default_ttl_s
    assert 0 < raw.pttl(tier._key(H1)) <= 30_000
    assert 30_000 < raw.pttl(tier._key(H2)) <= 120_000
    tier.close()


def test_default_ttl_none_means_no_expiry(server, raw) -> None:
    tier = RedisTier(server.url, default_ttl_s=None)
    tier.put(H1, ENTRY, ttl_s=None)
    assert raw.pttl(tier._key(H1)) == -1
    tier.close()


def test_redis_drops_an_expired_entry_and_get_misses(server) -> None:
    tier = RedisTier(server.url)
    tier.put(H1, ENTRY, ttl_s=0.05)
    assert tier.put(H2, ENTRY, ttl_s=0) is False  # already expired: not stored
    time.sleep(0.15)
    assert tier.get(H1) is None and tier.contains(H2) is False
    assert tier.stats().num_refused_writes == 1
    tier.close()


def test_unreachable_redis_at_start_misses_softly_counts_failures_and_warns_once(caplog, monkeypatch) -> None:
    clock = Clock()
    caplog.set_level(logging.INFO, logger="promptstash.tiers")
    tier = RedisTier(f"redis://127.0.0.1:{free_port()}/0", retry_interval_s=5.0, clock=clock)  # nothing listens
    calls = count_network_calls(tier, monkeypatch)
    assert tier.get(H1) is None
    assert tier.put(H1, ENTRY, ttl_s=60) is False
    assert tier.contains(H1) is False
    tier.delete(H1)
    assert calls[0] == 1  # after the first failure, nothing touches the network during the back-off
    clock.now += 5.0
    assert tier.get(H1) is None
    assert calls[0] == 2  # the back-off passed: one probe, which fails again
    s = tier.stats()
    assert (s.num_failed_reads, s.num_failed_writes, s.num_misses, s.num_hits, s.num_writes) == (3, 2, 2, 0, 0)
    assert len(warnings_of(caplog)) == 1  # one outage, one warning
    tier.close()


def test_redis_going_away_mid_run_fails_softly_then_the_tier_reconnects(server, caplog, monkeypatch) -> None:
    clock = Clock()
    caplog.set_level(logging.INFO, logger="promptstash.tiers")
    tier = RedisTier(server.url, retry_interval_s=0.2, clock=clock)
    assert tier.put(H1, ENTRY, ttl_s=60) is True
    server.stop()
    assert tier.get(H1) is None  # the failure is caught, not raised
    assert tier.put(H2, ENTRY, ttl_s=60) is False
    assert tier.contains(H1) is False
    s = tier.stats()
    assert (s.num_failed_reads, s.num_failed_writes) == (2, 1)
    assert len(warnings_of(caplog)) == 1

    server.start()  # same port, empty (no persistence)
    calls = count_network_calls(tier, monkeypatch)
    assert tier.put(H2, ENTRY, ttl_s=60) is False  # still backing off: Redis is up but not asked
    assert calls[0] == 0
    clock.now += 0.2
    assert tier.put(H2, ENTRY, ttl_s=60) is True
    assert tier.get(H2) == ENTRY
    assert any("reconnected" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert len(warnings_of(caplog)) == 1

    server.stop()  # a second outage warns once more
    assert tier.get(H2) is None and tier.get(H2) is None
    assert len(warnings_of(caplog)) == 2
    tier.close()


def test_redis_coming_back_is_used_again_after_a_real_retry_interval(server) -> None:
    tier = RedisTier(server.url, retry_interval_s=0.2)  # the real monotonic clock
    assert tier.put(H1, ENTRY, ttl_s=60) is True
    server.stop()
    assert tier.put(H1, ENTRY, ttl_s=60) is False
    server.start()
    time.sleep(0.25)
    assert tier.put(H1, ENTRY, ttl_s=60) is True and tier.get(H1) == ENTRY
    tier.close()


def test_a_restart_while_idle_costs_no_failure(server) -> None:
    tier = RedisTier(server.url)
    assert tier.put(H1, ENTRY, ttl_s=60) is True
    server.restart()  # the pooled connection is now stale; it is replaced at checkout
    assert tier.put(H1, ENTRY, ttl_s=60) is True
    assert tier.stats().num_failed_writes == 0
    tier.close()


def test_a_missing_redis_server_binary_skips_with_a_hint_to_make_test(monkeypatch, tmp_path) -> None:
    from promptstash.deploy import local

    monkeypatch.setattr(local, "redis_server_binary", lambda: None)
    with pytest.raises(pytest.skip.Exception, match="make test"):
        RedisServer(tmp_path)


def test_two_tiers_on_the_same_redis_share_entries_like_two_processes(server) -> None:
    one, two = RedisTier(server.url), RedisTier(server.url)
    one.put(H1, ENTRY, ttl_s=60)
    assert two.contains(H1) and two.get(H1) == ENTRY
    two.delete(H1)
    assert one.get(H1) is None
    one.close()
    two.close()


def test_key_prefix_separates_tiers_on_the_same_redis(server) -> None:
    a, b = RedisTier(server.url, key_prefix="a:"), RedisTier(server.url, key_prefix="b:")
    a.put(H1, ENTRY, ttl_s=60)
    assert b.get(H1) is None and a.get(H1) == ENTRY
    a.close()
    b.close()


def test_a_closed_tier_does_not_raise(server) -> None:
    tier = RedisTier(server.url)
    tier.put(H1, ENTRY, ttl_s=60)
    tier.close()
    tier.close()

