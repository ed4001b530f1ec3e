"""Replicas sharing a Redis: the weight format is part of the KV identity, a replica of another model is refused at
start (the model claim, cache/tiers/claim.py), and every response names the replica that answered."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from conftest import our_model, tiny_hf_model
from fastapi.testclient import TestClient
from redis_helpers import RedisClusterServers, RedisServer, free_port
from server_helpers import LiveServer, tiny_chat_engine
from test_hf_directory import _save_tiny_checkpoint
from test_tiers import PROMPT

from promptstash.cache.hashing import root_hash
from promptstash.cache.tiers.claim import CLAIM_KEY, ModelClaim, ModelMismatchError
from promptstash.config import EngineConfig, ServerConfig
from promptstash.engine.engine import DEFAULT_NAMESPACE, Engine
from promptstash.errors import PromptstashError
from promptstash.models.loader import resolve_model
from promptstash.server.app import REPLICA_HEADER, create_app

UNREACHABLE = "redis://127.0.0.1:1/0"  # nothing listens on port 1


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model("qwen2")


@pytest.fixture(scope="module")
def weights(hf_model):
    return our_model(hf_model)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


def engine_for(model, url: str | None, model_id: str = "tiny-qwen2@test", dtype: str = "float32",
               **options) -> Engine:
    config = EngineConfig(dtype=dtype, max_prefill_tokens=64, kv_cache_tokens=1024, redis_url=url, **options)
    return Engine(model, None, config, model_id=model_id)


def held_claim(server: RedisServer) -> dict:
    return json.loads(server.client().get(CLAIM_KEY))


# -- the weight format in the KV identity ----------------------------------------------------------------------

def test_int4_and_bfloat16_weights_of_one_model_have_other_hashes_and_share_nothing_through_redis(
        hf_model, redis_server) -> None:
    models = {w: our_model(hf_model, dtype=torch.bfloat16, weights=w) for w in ("bfloat16", "int4")}
    engines = {w: engine_for(m, redis_server.url, dtype="bfloat16") for w, m in models.items()}
    assert {w: e.cache.kv_layout for w, e in engines.items()} == {"bfloat16": "bs16/bfloat16",
                                                                  "int4": "bs16/bfloat16/int4"}
    roots = {root_hash(e.model_id, e.cache.kv_layout, DEFAULT_NAMESPACE) for e in engines.values()}
    assert len(roots) == 2
    engines["bfloat16"].generate(PROMPT, max_tokens=1)
    engines["bfloat16"].close()
    assert engines["int4"].prompt_logits(PROMPT).num_cached_tokens == 0  # the bfloat16 blocks are in Redis
    assert all(t.num_hits == 0 for t in engines["int4"].stats().tiers)
    engines["int4"].close()
    again = engine_for(models["bfloat16"], redis_server.url, dtype="bfloat16")
    assert again.prompt_logits(PROMPT).num_cached_tokens == len(PROMPT) // 16 * 16  # the same weights do share
    again.close()


# -- the model claim -------------------------------------------------------------------------------------------

def test_replicas_of_one_model_share_a_redis_and_the_claim_names_the_last_one(weights, redis_server) -> None:
    create_app(engine_for(weights, redis_server.url), ServerConfig(replica_id="a"))
    assert held_claim(redis_server) == {"model_id": "tiny-qwen2@test", "kv_layout": "bs16/float32", "replica": "a",
                                        "ttl_s": 30.0}
    create_app(engine_for(weights, redis_server.url), ServerConfig(replica_id="b"))
    assert held_claim(redis_server)["replica"] == "b"
    assert 0 < redis_server.client().pttl(CLAIM_KEY) <= 30_000


def test_a_replica_of_another_model_is_refused_at_start_naming_both_models_the_holder_and_the_redis(
        weights, redis_server) -> None:
    create_app(engine_for(weights, redis_server.url), ServerConfig(replica_id="node-1:8000"))
    with pytest.raises(ModelMismatchError) as info:
        create_app(engine_for(weights, redis_server.url, model_id="tiny-llama@other"),
                   ServerConfig(replica_id="node-2:8000"))
    message = str(info.value)
    assert isinstance(info.value, PromptstashError) and isinstance(info.value, ValueError)
    assert "\n" not in message
    assert message == (
        f"the shared Redis at 127.0.0.1:{redis_server.port}/0 is claimed by replica 'node-1:8000' for model "
        "'tiny-qwen2@test' (KV layout bs16/float32), but this replica (node-2:8000) serves model 'tiny-llama@other' "
        "(KV layout bs16/float32); replicas sharing a Redis must serve the same model with the same KV layout. "
        "Point this replica at another Redis or another database of this one (e.g. redis://HOST:PORT/1) with "
        "--redis-url, or stop the other replicas: their claim expires 30 s after the last of them stops")
    assert held_claim(redis_server)["model_id"] == "tiny-qwen2@test"  # the refused replica left the claim alone
    other_db = redis_server.url.removesuffix("/0") + "/1"
    create_app(engine_for(weights, other_db, model_id="tiny-llama@other"))  # the advice works


def test_the_same_model_with_another_kv_layout_is_refused_too(weights, redis_server) -> None:
    create_app(engine_for(weights, redis_server.url))
    with pytest.raises(ModelMismatchError, match=r"KV layout bs16/float32\).*\(KV layout bs32/float32\)"):
        create_app(engine_for(weights, redis_server.url, block_size=32))


def test_without_prefix_caching_there_is_no_claim(weights, redis_server) -> None:
    create_app(engine_for(weights, redis_server.url, enable_prefix_caching=False))
    assert redis_server.client().get(CLAIM_KEY) is None


def test_an_unreachable_redis_does_not_stop_the_server_and_warns_once(weights, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="promptstash.tiers"):
        create_app(engine_for(weights, UNREACHABLE), ServerConfig(replica_id="a"))
    warnings = [r.getMessage() for r in caplog.records if "model claim" in r.getMessage()]
    assert len(warnings) == 1 and "127.0.0.1:1/0 is unavailable" in warnings[0], warnings


def wait_for(condition, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_the_claim_outlives_its_replicas_by_its_ttl_while_refreshed(redis_server) -> None:
    first = ModelClaim(redis_server.url, "model-a", "bs16/float32", "a", ttl_s=1.0)
    other = ModelClaim(redis_server.url, "model-b", "bs16/float32", "b", ttl_s=1.0)
    assert first.claim()
    first.start()  # refreshes every 1/3 s
    try:
        time.sleep(2.5)
        with pytest.raises(ModelMismatchError, match="expires 1 s after the last of them stops"):
            other.claim()
    finally:
        first.stop()
    assert not any(t.name == "promptstash-model-claim" for t in threading.enumerate())
    with pytest.raises(ModelMismatchError):  # stopping does not release the claim: it expires
        other.claim()

    def other_claims() -> bool:
        try:
            return other.claim()
        except ModelMismatchError:
            return False

    wait_for(other_claims, "the claim did not expire")
    assert held_claim(redis_server)["model_id"] == "model-b"
    other.stop()


def test_a_mismatch_found_by_the_refresh_thread_is_logged_once_as_an_error(redis_server, caplog) -> None:
    mine = ModelClaim(redis_server.url, "model-a", "bs16/float32", "a", ttl_s=0.3)
    assert mine.claim()
    raw = redis_server.client()
    raw.set(CLAIM_KEY, json.dumps({"model_id": "model-b", "kv_layout": "bs16/float32", "replica": "b"}), px=60_000)

    def errors() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]

    with caplog.at_level(logging.INFO, logger="promptstash.tiers"):
        mine.start()
        try:
            wait_for(errors, "the refresh thread logged no mismatch")
            time.sleep(0.5)  # several more refreshes: still one error
            raw.delete(CLAIM_KEY)
            wait_for(lambda: raw.get(CLAIM_KEY) is not None, "the refresh thread did not claim the free key")
        finally:
            mine.stop()
    assert len(errors()) == 1 and "'model-b'" in errors()[0] and "expires a while after" in errors()[0], errors()
    assert any("is model-a's again" in r.getMessage() for r in caplog.records)
    assert held_claim(redis_server)["model_id"] == "model-a"


def test_the_refresh_thread_claims_a_redis_that_comes_up_later(tmp_path, caplog) -> None:
    server = RedisServer(tmp_path / "redis", start=False)
    claim = ModelClaim(server.url, "model-a", "bs16/float32", "a", ttl_s=0.3)
    try:
        with caplog.at_level(logging.INFO, logger="promptstash.tiers"):
            assert not claim.claim()
            claim.start()
            time.sleep(0.3)
            server.start()
            wait_for(lambda: server.client().get(CLAIM_KEY) is not None, "the claim was not made once Redis came up")
        messages = [r.getMessage() for r in caplog.records]
        assert sum("is unavailable" in m for m in messages) == 1, messages
        assert any("answers again" in m for m in messages), messages
    finally:
        claim.stop()
        server.close()


@pytest.mark.slow  # a 3-master cluster
def test_a_replica_of_another_model_is_refused_on_a_redis_cluster(tmp_path) -> None:
    with RedisClusterServers(tmp_path / "cluster") as cluster:
        first = ModelClaim(cluster.url, "model-a", "bs16/float32", "a")
        assert first.claim() and first.claim()
        other = ModelClaim(cluster.url, "model-b", "bs16/float32", "b")
        with pytest.raises(ModelMismatchError, match=r"Redis at cluster 127\.0\.0\.1:\d+,.*'model-a'.*'model-b'.*"
                                                     r"another Redis Cluster \(a cluster has only database 0\)"):
            other.claim()
        first.stop()
        other.stop()


def test_a_live_server_refreshes_its_claim_and_stops_refreshing_at_shutdown(weights, redis_server) -> None:
    engine = engine_for(weights, redis_server.url)
    with LiveServer(engine, ServerConfig(replica_id="live")) as live:
        assert httpx.get(live.url + "/health", timeout=10).status_code == 200
        assert any(t.name == "promptstash-model-claim" for t in threading.enumerate())
    assert not any(t.name == "promptstash-model-claim" for t in threading.enumerate())
    assert held_claim(redis_server)["replica"] == "live"


@pytest.mark.slow  # a server subprocess loading a model
def test_serve_exits_with_one_error_line_naming_both_models_when_another_model_holds_the_redis(
        tmp_path, redis_server) -> None:
    model_dir = tmp_path / "tiny-model"
    _save_tiny_checkpoint("qwen2", model_dir)
    model_id = resolve_model(str(model_dir)).model_id
    holder = {"model_id": "other-model@0123456789ab", "kv_layout": "bs16/float32", "replica": "node-9:8000",
              "ttl_s": 30.0}
    redis_server.client().set(CLAIM_KEY, json.dumps(holder), px=120_000)
    out = subprocess.run(
        [sys.executable, "-m", "promptstash.cli", "serve", "--model", str(model_dir), "--port", str(free_port()),
         "--dtype", "float32", "--kv-cache-tokens", "4096", "--cache-dir", str(tmp_path / "kv"),
         "--redis-url", redis_server.url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and out.stderr.rstrip().endswith(errors[0]), out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert "'other-model@0123456789ab'" in errors[0] and f"'{model_id}'" in errors[0]
    assert "replica 'node-9:8000'" in errors[0] and f"127.0.0.1:{redis_server.port}/0" in errors[0]


# -- the replica header ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    engine = tiny_chat_engine(tmp_path_factory.mktemp("tokenizer"))
    with LiveServer(engine, ServerConfig(replica_id="replica-7")) as live:
        yield live


def test_json_streamed_and_error_responses_name_the_replica(chat_server) -> None:
    url = chat_server.url
    assert httpx.get(url + "/health", timeout=10).headers[REPLICA_HEADER] == "replica-7"
    summary = httpx.get(url + "/v1/cache/blocks/summary", timeout=10)
    assert summary.headers[REPLICA_HEADER] == summary.json()["replica"] == "replica-7"
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as stream:
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers[REPLICA_HEADER] == "replica-7"
        assert "[DONE]" in "".join(stream.iter_text())
    bad = httpx.post(url + "/v1/chat/completions", json={"model": "default"}, timeout=10)
    missing = httpx.get(url + "/no/such/route", timeout=10)
    anthropic_bad = httpx.post(url + "/v1/messages", json={"model": "default"}, timeout=10)
    assert [(r.status_code, r.headers[REPLICA_HEADER]) for r in (bad, missing, anthropic_bad)] == [
        (400, "replica-7"), (404, "replica-7"), (400, "replica-7")]


def test_an_internal_error_names_the_replica_too(chat_server, monkeypatch) -> None:
    def broken(*args: object) -> dict:
        raise RuntimeError("boom")

    monkeypatch.setattr(chat_server.state.stats, "snapshot", broken)
    logging.getLogger("promptstash.server").disabled = True  # the 500 is the point: no traceback in the output
    try:
        response = httpx.get(chat_server.url + "/v1/cache/stats", timeout=10)
    finally:
        logging.getLogger("promptstash.server").disabled = False
    assert response.status_code == 500 and response.headers[REPLICA_HEADER] == "replica-7"


def test_the_replica_name_defaults_to_hostname_and_port(weights) -> None:
    app = create_app(engine_for(weights, None), ServerConfig(port=8123))
    with TestClient(app) as client:
        assert client.get("/health").headers[REPLICA_HEADER] == f"{socket.gethostname()}:8123"
