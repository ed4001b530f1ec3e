"""KV events (cache/events.py): a consumer reading the Redis Stream reconstructs each replica's stored block
hash set, checked against the replica's own summary (in-process and through GET /v1/cache/blocks/summary);
a Redis that goes away drops (and counts) events, and the next batch after it returns carries the reset flag."""

from __future__ import annotations

import json
import random

import pytest
import requests
from conftest import tiny_engine
from redis_helpers import RedisServer
from server_helpers import LiveServer

from promptstash.cache.events import STREAM, KVEventSink, RedisStreamPublisher, digest, replay_events
from promptstash.cache.manager import CacheManager
from promptstash.config import ServerConfig


class ListPublisher:
    def __init__(self) -> None:
        self.entries: list[tuple[str, dict[str, str]]] = []
        self.down = False

    def publish(self, fields):
        if self.down:
            raise ConnectionError("down")
        self.entries.append((f"{len(self.entries)}-0", dict(fields)))

    def close(self) -> None:
        pass


def _prompts(n: int, length: int = 70, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 200) for _ in range(length)] for _ in range(n)]


def _check_replay(entries, sink: KVEventSink) -> None:
    state = replay_events(entries)
    summary = sink.summary(full=True)
    assert int(entries[-1][1]["seq"]) == summary.seq
    assert state[sink.replica] == set(summary.hashes)
    assert digest(state[sink.replica]) == summary.digest


def test_sink_orders_events_and_replay_reconstructs_the_set():
    pub = ListPublisher()
    sink = KVEventSink(pub, "r1", max_batch=3)
    h = [bytes([i]) * 16 for i in range(5)]
    sink.flush()  # the startup snapshot: reset, ["cleared"]
    assert pub.entries[0][1]["reset"] == "1" and json.loads(pub.entries[0][1]["events"]) == [["cleared"]]
    for x in h:
        sink.stored(x)
    sink.removed(h[1])
    sink.removed(h[3])
    sink.stored(h[1])
    assert sink.flush()
    events = [e for _, f in pub.entries[1:] for e in json.loads(f["events"])]
    assert events == [["stored", x.hex()] for x in h] + [["removed", h[1].hex()], ["removed", h[3].hex()],
                                                          ["stored", h[1].hex()]]
    assert [f["seq"] for _, f in pub.entries] == ["0", "3", "6", "8"]  # batches of at most 3 events
    assert [f["prev"] for _, f in pub.entries] == ["0", "0", "3", "6"]
    _check_replay(pub.entries, sink)
    assert replay_events(pub.entries)["r1"] == {h[0].hex(), h[1].hex(), h[2].hex(), h[4].hex()}
    with pytest.raises(ValueError, match="missing"):
        replay_events(pub.entries[:1] + pub.entries[2:])  # a gap in the chain is detected


def test_lost_events_are_counted_and_followed_by_a_snapshot():
    pub = ListPublisher()
    sink = KVEventSink(pub, "r1", max_buffer=4)
    sink.flush()
    sink.stored(b"a" * 16)
    pub.down = True
    assert not sink.flush(timeout_s=0.05)
    sink.stored(b"b" * 16)
    sink.removed(b"a" * 16)
    assert sink.num_dropped == 3 and sink.num_failed_batches >= 1
    pub.down = False
    assert sink.flush()
    last = pub.entries[-1][1]
    assert last["reset"] == "1" and json.loads(last["events"]) == [["cleared"], ["stored", (b"b" * 16).hex()]]
    _check_replay(pub.entries, sink)
    for i in range(6):  # buffer overflow: dropped, then a snapshot
        sink.stored(bytes([i]) * 16)
    assert sink.num_dropped == 3 + 6  # 4 buffered + the 5th overflow it; the 6th waits for the snapshot
    assert sink.flush()
    assert pub.entries[-1][1]["reset"] == "1"
    _check_replay(pub.entries, sink)
    sink.close()
    assert replay_events(pub.entries)["r1"] == set()  # closing tells consumers the blocks are gone


def test_manager_reports_every_stored_and_removed_block():
    """A small pool that evicts: the replayed events equal the prefix index at the end."""
    pub = ListPublisher()
    sink = KVEventSink(pub, "m")
    cache = CacheManager(8, 4, "m", "bs4", events=sink)
    rng = random.Random(1)
    for i in range(40):
        tokens = [rng.randrange(3) for _ in range(rng.randrange(5, 20))]
        cache.open(f"s{i}", tokens, "ns")
        if cache.allocate(f"s{i}", len(tokens)):
            cache.commit(f"s{i}", tokens, len(tokens))
        cache.close(f"s{i}")
        if i % 7 == 0:
            sink.flush()
    assert sink.flush()
    assert cache.pool.num_evictions > 0
    _check_replay(pub.entries, sink)
    assert replay_events(pub.entries)["m"] == {h.hex() for h, _ in cache.index.items()}


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis")
    yield server
    server.close()


@pytest.mark.slow
def test_engine_events_through_redis_match_the_summary(redis_server):
    engine = tiny_engine(kv_cache_tokens=256)  # 16 blocks: the prompts below evict each other
    sink = KVEventSink(RedisStreamPublisher(redis_server.url), "replica-a")
    engine.set_kv_events(sink)
    for prompt in _prompts(6):
        engine.generate(prompt, max_tokens=2)
    assert engine.stats().cache.num_evictions > 0
    assert sink.flush()
    entries = redis_server.client().xrange(STREAM)
    state = replay_events(entries)
    summary = engine.kv_blocks_summary("replica-a", full=True)
    assert summary.num_blocks > 0 and int(entries[-1][1][b"seq"]) == summary.seq
    assert state["replica-a"] == set(summary.hashes)
    assert digest(state["replica-a"]) == summary.digest
    assert b"tenant" not in b"".join(f[b"events"] for _, f in entries)  # hashes only
    sink.close()
    engine.close()


@pytest.mark.slow
def test_summary_route_and_redis_going_away(redis_server):
    engine = tiny_engine(kv_cache_tokens=256)
    config = ServerConfig(kv_events_url=redis_server.url, replica_id="replica-b")
    client = redis_server.client()
    with LiveServer(engine, config) as server:
        sink = engine.cache.events
        sink.interval_s = sink.retry_s = 0.02
        for prompt in _prompts(3, seed=2):
            r = requests.post(server.url + "/v1/completions", json={"model": "default", "prompt": prompt,
                                                                    "max_tokens": 2}, timeout=30)
            assert r.status_code == 200, r.text
        assert sink.flush()
        body = requests.get(server.url + "/v1/cache/blocks/summary", timeout=10).json()
        assert body["replica"] == "replica-b" and body["num_blocks"] > 0 and "hashes" not in body
        state = replay_events(client.xrange(STREAM))
        assert digest(state["replica-b"]) == body["digest"]
        full = requests.get(server.url + "/v1/cache/blocks/summary?full=1", timeout=10).json()
        assert set(full["hashes"]) == state["replica-b"] and full["digest"] == body["digest"]

        redis_server.stop()  # requests still succeed; events are dropped and counted
        for prompt in _prompts(3, seed=3):
            r = requests.post(server.url + "/v1/completions", json={"model": "default", "prompt": prompt,
                                                                    "max_tokens": 2}, timeout=30)
            assert r.status_code == 200, r.text
        sink.flush(timeout_s=0.5)
        assert sink.num_dropped > 0
        redis_server.start()  # empty again (no persistence): the next batch is a snapshot with reset
        assert sink.flush(timeout_s=10)
        entries = client.xrange(STREAM)
        assert entries[0][1][b"reset"] == b"1"
        body = requests.get(server.url + "/v1/cache/blocks/summary", timeout=10).json()
        assert body["events"]["num_dropped"] == sink.num_dropped
        assert digest(replay_events(entries)["replica-b"]) == body["digest"]
    assert replay_events(client.xrange(STREAM))["replica-b"] == set()  # shutdown: ["cleared"]


@pytest.mark.slow
def test_summary_needs_an_admin_key():
    engine = tiny_engine(kv_cache_tokens=256)
    config = ServerConfig(api_keys={"k1": "alice"}, admin_keys=("adm",), replica_id="r")
    with LiveServer(engine, config) as server:
        r = requests.get(server.url + "/v1/cache/blocks/summary", headers={"x-api-key": "k1"}, timeout=10)
        assert r.status_code == 403
        r = requests.get(server.url + "/v1/cache/blocks/summary", headers={"x-api-key": "adm"}, timeout=10)
        assert r.status_code == 200 and r.json()["seq"] == 0 and r.json()["events"] is None
