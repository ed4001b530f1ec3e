"""Stored responses shared through Redis (server/response_store_redis.py): the value format and its exact
ChatMessage round trip, the store against a real redis-server and a Redis Cluster (keys, expiry, tenants, damaged
entries, Redis going away and coming back), and two live servers sharing one Redis: a response stored through
one is found, continued and deleted through the other, never across tenants, and a Redis stopped mid-run costs
no request."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Any

import httpx
import pytest
from redis_helpers import RedisClusterServers, RedisServer
from server_helpers import LiveServer, tiny_chat_engine

from promptstash.config import ServerConfig
from promptstash.prompts import ChatMessage, TextBlock
from promptstash.server import app as app_module
from promptstash.server.response_store import ResponseStore, StoredResponse
from promptstash.server.response_store_redis import (
    BLOCK_FIELDS,
    CALL_FIELDS,
    ENTRY_FIELDS,
    FORMAT_VERSION,
    MESSAGE_FIELDS,
    DamagedEntry,
    RedisResponseStore,
    decode_entry,
    decode_message,
    encode_entry,
    encode_message,
)
from promptstash.tools import ToolCall

MODEL = "tiny-chat"
KEYS = {"key-alpha": "alpha", "key-beta": "beta"}
ALPHA = {"Authorization": "Bearer key-alpha"}
BETA = {"Authorization": "Bearer key-beta"}
INSTRUCTIONS = "You are a terse assistant for ACME. " * 6
CALL = ToolCall("call_0123456789abcdef01234567", "get_weather", '{"city": "Oslo", "unit": "c"}')
CONVERSATION = (
    ChatMessage("system", (TextBlock("Policy.", ttl_class="1h"), TextBlock("Shared module", module=True,
                                                                             module_id="mod_1"))),
    ChatMessage("user", (TextBlock("Weather in Oslo?"), TextBlock("\u00e6\u00f8\u00e5 \U0001f600 \x00 \ud800"))),
    ChatMessage("assistant", (TextBlock(""),), tool_calls=(CALL, ToolCall("call_2", "f", "{}")),
                tool_call_ttls=(None, "5m")),
    ChatMessage("tool", (TextBlock('{"temp": 3}'),), tool_call_id=CALL.id, name=CALL.name),
    ChatMessage("assistant", (TextBlock("It is 3 C."),)),
)
STORE_LOGGER = "promptstash.server"


# -- the value format ------------------------------------------------------------------------------------------

def test_the_format_names_every_field_of_the_dataclasses_it_stores() -> None:
    """A field added to ChatMessage, TextBlock, ToolCall or StoredResponse must be added to the format too (and
    FORMAT_VERSION raised), or conversations would lose it on the way through Redis."""
    names = {cls: {f.name for f in dataclasses.fields(cls)} for cls in (ChatMessage, TextBlock, ToolCall,
                                                                          StoredResponse)}
    assert names[ChatMessage] == MESSAGE_FIELDS and names[TextBlock] == BLOCK_FIELDS
    assert names[ToolCall] == CALL_FIELDS and names[StoredResponse] | {"v"} == ENTRY_FIELDS


def test_an_entry_round_trips_exactly() -> None:
    stored = StoredResponse("resp_1", "alpha", 1234.5, {"id": "resp_1", "output": [{"x": [1, 2.5, None]}]},
                            CONVERSATION)
    assert decode_entry(encode_entry(stored), "alpha", "resp_1") == stored
    assert json.loads(encode_entry(stored))["v"] == FORMAT_VERSION


def _entry(**changes: Any) -> bytes:
    data = json.loads(encode_entry(StoredResponse("resp_1", "alpha", 1.0, {"id": "resp_1"}, CONVERSATION)))
    data.update(changes)
    return json.dumps(data).encode()


def _message_with(**changes: Any) -> dict[str, Any]:
    return {**encode_message(CONVERSATION[2]), **changes}


@pytest.mark.parametrize("raw", [
    b"", b"garbage", b"\xff\xfe", b"[]", b"null", b"[" * 100_000, _entry()[:-7],
    _entry(v=2), _entry(v=True), _entry(tenant="beta"), _entry(id="resp_2"), _entry(created="now"),
    _entry(body=[]), _entry(messages={}), _entry(extra=1),
    _entry(messages=[_message_with(role=1)]), _entry(messages=[_message_with(blocks=[{"text": "x"}])]),
    _entry(messages=[_message_with(tool_calls=[{"id": "c", "name": "f", "arguments": {}}])]),
    _entry(messages=[_message_with(tool_call_ttls=[3])]), _entry(messages=[_message_with(unknown=None)]),
    _entry(messages=[_message_with(blocks=[{"text": "x", "ttl_class": None, "module": 0, "module_id": None}])]),
], ids=lambda raw: repr(raw[:24]))
def test_a_damaged_entry_is_refused(raw: bytes) -> None:
    with pytest.raises(DamagedEntry):
        decode_entry(raw, "alpha", "resp_1")


# -- the store against a real Redis ----------------------------------------------------------------------------

@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis")
    yield server
    server.close()


def _put(store: Any, tenant: str = "alpha", response_id: str = "resp_1",
         messages: tuple[ChatMessage, ...] = CONVERSATION) -> StoredResponse:
    return store.put(tenant, response_id, {"id": response_id, "tenant": tenant}, messages)


def test_two_stores_share_responses_per_tenant(redis_server) -> None:
    one, two = RedisResponseStore(redis_server.url), RedisResponseStore(redis_server.url)
    _put(one)
    got = two.get("alpha", "resp_1")
    assert got is not None and got.messages == CONVERSATION and got.body == {"id": "resp_1", "tenant": "alpha"}
    assert two.get("beta", "resp_1") is None and not two.delete("beta", "resp_1")
    assert two.delete("alpha", "resp_1")
    assert one.get("alpha", "resp_1") is None and not one.delete("alpha", "resp_1")
    assert len(one) == 0  # the memory copy went when Redis answered that the response is gone
    one.close()
    two.close()


def test_keys_carry_the_tenant_in_a_hash_tag_and_expire_after_max_age(redis_server) -> None:
    store = RedisResponseStore(redis_server.url, max_age_s=3600)
    _put(store, tenant="we/ird}{:te%nant", response_id="resp_{x}/y")
    raw = redis_server.client()
    [key] = raw.keys("*")
    assert key == b"promptstash:response:{we%2Fird%7D%7B%3Ate%25nant/resp_%7Bx%7D%2Fy}"
    assert key.count(b"{") == key.count(b"}") == 1  # the whole (tenant, id) is the hash tag
    assert 3_590_000 < raw.pttl(key) <= 3_600_000
    assert store.get("we/ird}{:te%nant", "resp_{x}/y") is not None
    assert store.get("we", "ird}{:te%nant/resp_{x}/y") is None


def test_an_expired_response_is_gone_from_redis_and_memory(redis_server) -> None:
    store = RedisResponseStore(redis_server.url, max_age_s=0.3)
    _put(store)
    assert store.get("alpha", "resp_1") is not None
    time.sleep(0.5)
    assert redis_server.client().dbsize() == 0
    assert store.get("alpha", "resp_1") is None and len(store) == 0


@pytest.mark.parametrize("damage", ["garbage", "other_tenant", "other_id"])
def test_a_damaged_redis_value_is_missing_and_logged_once(redis_server, caplog, damage: str) -> None:
    writer, reader = RedisResponseStore(redis_server.url), RedisResponseStore(redis_server.url)
    _put(writer, "alpha", "resp_1")
    _put(writer, "beta", "resp_2", CONVERSATION[:1])
    raw = redis_server.client()
    key = writer.key("alpha", "resp_1")
    value = {"garbage": b"\x00not json", "other_tenant": raw.get(writer.key("beta", "resp_2")),
             "other_id": encode_entry(StoredResponse("resp_9", "alpha", 1.0, {}, ()))}[damage]
    raw.set(key, value)
    with caplog.at_level(logging.WARNING, logger=STORE_LOGGER):
        assert reader.get("alpha", "resp_1") is None
        assert writer.get("alpha", "resp_1") is None  # its memory copy is not served over what Redis holds
        assert reader.get("alpha", "resp_1") is None
    assert reader.num_damaged == 2 and writer.num_damaged == 1
    assert [r.levelno for r in caplog.records if "damaged" in r.getMessage()] == [logging.WARNING] * 2
    assert raw.get(key) == value  # left to expire


def test_redis_down_keeps_responses_in_memory_with_one_warning_and_reconnects(redis_server, caplog) -> None:
    store = RedisResponseStore(redis_server.url, retry_interval_s=0.2)
    _put(store, response_id="resp_shared")
    redis_server.stop()
    with caplog.at_level(logging.INFO, logger=STORE_LOGGER):
        for i in range(5):
            _put(store, response_id=f"resp_local_{i}")  # never raises
            assert store.get("alpha", f"resp_local_{i}").messages == CONVERSATION
        assert store.get("alpha", "resp_shared").messages == CONVERSATION  # the memory copy
        assert store.delete("alpha", "resp_local_0") and store.get("alpha", "resp_local_0") is None
        assert store.get("beta", "resp_shared") is None
        time.sleep(0.3)  # past the back-off: the next call probes Redis (still down) again
        assert store.get("alpha", "resp_local_1") is not None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Responses API store" in warnings[0] and "unavailable" in warnings[0], warnings
    assert store.num_failed_calls >= 5
    redis_server.start()  # empty: what Redis had is gone
    time.sleep(0.3)
    with caplog.at_level(logging.INFO, logger=STORE_LOGGER):
        assert store.get("alpha", "resp_local_2") is not None  # put while down: served from memory
        assert store.get("alpha", "resp_shared") is None  # Redis answers it has none: gone for every replica
    assert any("reconnected" in r.getMessage() for r in caplog.records)
    _put(store, response_id="resp_after")
    assert RedisResponseStore(redis_server.url).get("alpha", "resp_after") is not None


def test_a_delete_while_redis_is_down_is_never_undone_on_this_replica(redis_server) -> None:
    store = RedisResponseStore(redis_server.url, retry_interval_s=0.05)
    other = RedisResponseStore(redis_server.url)
    _put(store)
    redis_server.stop()
    assert store.delete("alpha", "resp_1")
    assert store.get("alpha", "resp_1") is None
    redis_server.start()
    other.put("alpha", "resp_1", {"id": "resp_1"}, CONVERSATION)  # the Redis copy survived the outage
    time.sleep(0.1)
    assert store.get("alpha", "resp_1") is None  # the remembered delete reaches Redis now
    assert other.get("alpha", "resp_1") is None


def test_a_store_over_a_redis_cluster(tmp_path) -> None:
    with RedisClusterServers(tmp_path / "cluster") as cluster:
        one, two = RedisResponseStore(cluster.url), RedisResponseStore(cluster.url)
        for i in range(12):  # spread over the masters
            _put(one, response_id=f"resp_{i}")
        assert all(two.get("alpha", f"resp_{i}").messages == CONVERSATION for i in range(12))
        assert two.get("beta", "resp_3") is None
        assert two.delete("alpha", "resp_3") and one.get("alpha", "resp_3") is None
        one.close()
        two.close()


# -- live servers sharing one Redis ----------------------------------------------------------------------------

def _server(tmp_path, name: str, url: str | None, **engine: Any) -> LiveServer:
    return LiveServer(tiny_chat_engine(tmp_path / name, redis_url=url, **engine), ServerConfig(api_keys=KEYS))


def _create(server: LiveServer, headers: dict[str, str], **body: Any) -> httpx.Response:
    body = {"model": MODEL, "max_output_tokens": 6, "temperature": 0, **body}
    return httpx.post(server.url + "/v1/responses", json=body, headers=headers, timeout=60)


def _get(server: LiveServer, response_id: str, headers: dict[str, str], method: str = "GET") -> httpx.Response:
    return httpx.request(method, f"{server.url}/v1/responses/{response_id}", headers=headers, timeout=60)


@pytest.fixture
def pair(tmp_path, redis_server):
    with _server(tmp_path, "one", redis_server.url) as one, _server(tmp_path, "two", redis_server.url) as two:
        yield one, two


def test_the_app_uses_the_shared_store_only_with_a_redis_kv_tier(tmp_path, redis_server) -> None:
    def store(url: str | None, **engine: Any) -> Any:
        directory = tmp_path / f"{url is None}-{len(engine)}"
        return app_module.create_app(tiny_chat_engine(directory, redis_url=url, **engine)).state.responses

    assert isinstance(store(redis_server.url), RedisResponseStore)
    assert isinstance(store(None), ResponseStore)
    assert isinstance(store(redis_server.url, enable_prefix_caching=False), ResponseStore)


def test_a_response_stored_on_one_server_is_found_and_continued_on_another(pair) -> None:
    one, two = pair
    first = _create(one, ALPHA, input="What is ACME?", instructions=INSTRUCTIONS)
    assert first.status_code == 200, first.text
    got = _get(two, first.json()["id"], ALPHA)
    assert got.status_code == 200 and got.json() == first.json()
    follow = {"input": "And its motto?", "instructions": INSTRUCTIONS, "previous_response_id": first.json()["id"]}
    on_two, on_one = _create(two, ALPHA, **follow), _create(one, ALPHA, **follow)
    assert on_two.status_code == on_one.status_code == 200, (on_two.text, on_one.text)
    text = first.json()["output"][0]["content"][0]["text"]
    expected = [ChatMessage(role, (TextBlock(t),)) for role, t in (
        ("system", INSTRUCTIONS), ("user", "What is ACME?"), ("assistant", text), ("user", "And its motto?"))]
    prompt_tokens = len(two.engine.render(expected).token_ids)
    assert on_two.json()["usage"]["input_tokens"] == on_one.json()["usage"]["input_tokens"] == prompt_tokens
    assert on_two.json()["usage"]["input_tokens_details"]["cached_tokens"] > 0  # its prefix, from Redis
    third = _create(one, ALPHA, input="Thanks.", previous_response_id=on_two.json()["id"])  # back on the first
    text2 = on_two.json()["output"][0]["content"][0]["text"]
    expected = [*expected[1:], ChatMessage("assistant", (TextBlock(text2),)),
                ChatMessage("user", (TextBlock("Thanks."),))]
    assert third.json()["usage"]["input_tokens"] == len(one.engine.render(expected).token_ids)


def test_tool_calls_survive_the_trip_through_redis(pair) -> None:
    one, two = pair
    weather = {"type": "function", "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
        "additionalProperties": False}}
    first = _create(one, ALPHA, input="Weather in Oslo?", tools=[weather], tool_choice="required",
                    max_output_tokens=500)
    assert first.status_code == 200, first.text
    call = next(item for item in first.json()["output"] if item["type"] == "function_call")
    follow = {"input": [{"type": "function_call_output", "call_id": call["call_id"], "output": '{"temp": 3}'}],
              "tools": [weather], "tool_choice": "none", "previous_response_id": first.json()["id"]}
    on_two, on_one = _create(two, ALPHA, **follow), _create(one, ALPHA, **follow)
    assert on_two.status_code == on_one.status_code == 200, on_two.text
    assert on_two.json()["usage"]["input_tokens"] == on_one.json()["usage"]["input_tokens"]


def test_tenants_stay_apart_across_servers(pair) -> None:
    one, two = pair
    r = _create(one, ALPHA, input="alpha's secret plan " * 4).json()
    for answer in (_get(two, r["id"], BETA), _get(two, r["id"], BETA, "DELETE"),
                   _create(two, BETA, input="go on", previous_response_id=r["id"])):
        assert answer.status_code == 404 and "secret" not in answer.text
    assert _get(two, r["id"], ALPHA).status_code == 200


def test_a_delete_on_one_server_removes_the_response_for_the_other(pair) -> None:
    one, two = pair
    r = _create(one, ALPHA, input="Remember me.").json()
    assert _get(two, r["id"], ALPHA, "DELETE").json() == {"id": r["id"], "object": "response", "deleted": True}
    for server in (one, two):
        assert _get(server, r["id"], ALPHA).status_code == 404
        assert _create(server, ALPHA, input="again", previous_response_id=r["id"]).status_code == 404
    assert _get(one, r["id"], ALPHA, "DELETE").status_code == 404


@pytest.mark.parametrize("damage", ["garbage", "other_tenant"])
def test_a_damaged_entry_is_a_404_on_every_server(pair, redis_server, damage: str) -> None:
    one, two = pair
    mine = _create(one, ALPHA, input="Mine.").json()["id"]
    theirs = _create(one, BETA, input="Theirs.").json()["id"]
    store = one.app.state.responses
    raw = redis_server.client()
    raw.set(store.key("alpha", mine), b"{not json" if damage == "garbage" else raw.get(store.key("beta", theirs)))
    for server in (one, two):
        assert _get(server, mine, ALPHA).status_code == 404
        answer = _create(server, ALPHA, input="go on", previous_response_id=mine)
        assert answer.status_code == 404 and "Theirs" not in answer.text
    assert _get(two, theirs, BETA).status_code == 200


def test_redis_stopped_mid_run_costs_no_request_and_logs_one_warning(tmp_path, redis_server, caplog) -> None:
    with _server(tmp_path, "solo", redis_server.url) as server, caplog.at_level(logging.WARNING):
        before = _create(server, ALPHA, input="Before the outage.").json()["id"]
        redis_server.stop()
        during = _create(server, ALPHA, input="During the outage.", stream=True)
        assert during.status_code == 200 and ("response.completed" in during.text
                                              or "response.incomplete" in during.text), during.text
        during_id = next(json.loads(line[6:])["response"]["id"] for line in during.text.splitlines()
                         if line.startswith("data: ") and '"response.created"' in line)
        for previous in (before, during_id):
            follow = _create(server, ALPHA, input="Go on.", previous_response_id=previous)
            assert follow.status_code == 200, follow.text
            assert _get(server, follow.json()["id"], ALPHA).status_code == 200
        assert _get(server, during_id, ALPHA, "DELETE").status_code == 200
        assert _get(server, during_id, ALPHA).status_code == 404
    mine = [r for r in caplog.records if "Responses API store" in r.getMessage()]
    assert [r.levelno for r in mine] == [logging.WARNING], [r.getMessage() for r in mine]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_the_store_is_never_called_on_the_event_loop(tmp_path, monkeypatch) -> None:
    calls: list[str] = []

    class Spy(ResponseStore):
        def _check(self, what: str) -> None:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                calls.append(what)
            else:
                calls.append(what + " ON THE EVENT LOOP")

        def put(self, *args: Any) -> StoredResponse:
            self._check("put")
            return super().put(*args)

        def get(self, *args: Any) -> StoredResponse | None:
            self._check("get")
            return super().get(*args)

        def delete(self, *args: Any) -> bool:
            self._check("delete")
            return super().delete(*args)

    monkeypatch.setattr(app_module, "response_store_for", lambda engine: Spy())
    with _server(tmp_path, "spy", None) as server:
        first = _create(server, ALPHA, input="Hello.").json()["id"]
        _create(server, ALPHA, input="Hi.", stream=True)
        _create(server, ALPHA, input="More.", previous_response_id=first)
        _get(server, first, ALPHA)
        _get(server, first, ALPHA, "DELETE")
    assert sorted(set(calls)) == ["delete", "get", "put"], calls


# -- property: any ChatMessage round-trips exactly -------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_text = st.text(st.characters(exclude_categories=()), max_size=40)  # any code point, lone surrogates and NUL too
_opt = st.none() | _text
_blocks = st.builds(TextBlock, _text, _opt, st.booleans(), _opt)
_calls = st.builds(ToolCall, _text, _text, _text)
_messages = st.builds(ChatMessage, st.sampled_from(["system", "user", "assistant", "tool"]) | _text,
                      st.lists(_blocks, max_size=4).map(tuple), st.lists(_calls, max_size=3).map(tuple), _opt, _opt,
                      st.lists(_opt, max_size=3).map(tuple))


@settings(max_examples=300, deadline=None)
@given(st.lists(_messages, max_size=5).map(tuple), _text, _text)
def test_any_conversation_round_trips_exactly(messages: tuple[ChatMessage, ...], tenant: str, rid: str) -> None:
    for m in messages:
        assert decode_message(json.loads(json.dumps(encode_message(m)))) == m
    stored = StoredResponse(rid, tenant, 1.5, {"id": rid}, messages)
    assert decode_entry(encode_entry(stored), tenant, rid) == stored
