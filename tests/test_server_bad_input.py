"""Bad input against a live server (real HTTP): every case gets the right status and the error shape of its
route (OpenAI or Anthropic), never a 500, and the server keeps serving with its KV pool intact afterwards.

    OpenAI routes:  {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}
    /v1/messages:   {"type": "error", "error": {"type": str, "message": str}}
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from server_helpers import LiveServer, no_errors_logged, tiny_chat_engine

from promptstash.config import ServerConfig

MODEL = "tiny-chat"
CHAT, TEXT, MESSAGES = "/v1/chat/completions", "/v1/completions", "/v1/messages"
ALL_ROUTES = (CHAT, TEXT, MESSAGES)
CHAT_ROUTES = (CHAT, MESSAGES)  # the two routes that take a messages list
DROP = object()  # an override that removes the field

OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                   405: "invalid_request_error", 413: "request_too_large", 503: "overloaded_error",
                   529: "overloaded_error"}
LONG_BLOCK = "a long cacheable block of hello world text, " * 6  # > min_cacheable_tokens=16 on its own


# ---------------------------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = tiny_chat_engine(tmp_path_factory.mktemp("tok"))
    with LiveServer(engine, ServerConfig(min_cacheable_tokens=16)) as srv:
        yield srv


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 256-token context window and a 4096-byte body limit."""
    engine = tiny_chat_engine(tmp_path_factory.mktemp("tok"), max_model_len=256)
    with LiveServer(engine, ServerConfig(max_body_bytes=4096)) as srv:
        yield srv


@pytest.fixture(scope="module")
def authed(tmp_path_factory):
    engine = tiny_chat_engine(tmp_path_factory.mktemp("tok"))
    with LiveServer(engine, ServerConfig(api_keys={"key-a": "a"})) as srv:
        yield srv


@pytest.fixture(scope="module")
def queued(tmp_path_factory):
    engine = tiny_chat_engine(tmp_path_factory.mktemp("tok"))
    with LiveServer(engine, ServerConfig(max_queued_requests=1)) as srv:
        yield srv


@pytest.fixture(autouse=True)
def no_internal_errors():
    """No test may make the server log an error (a 500, an exception escaping the app, a failed step)."""
    with no_errors_logged("promptstash.server", "uvicorn.error") as handler:
        yield handler


# ---------------------------------------------------------------------------------------------- helpers


def valid_body(path: str, **overrides: Any) -> dict[str, Any]:
    """A request that succeeds on `path`, with fields replaced (or removed with DROP)."""
    if path == TEXT:
        body: dict[str, Any] = {"model": MODEL, "prompt": "hello world", "max_tokens": 4}
    else:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 4}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not DROP}


def post(srv: LiveServer, path: str, body: Any = None, *, raw: bytes | None = None,
         headers: dict[str, str] | None = None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(srv.url + path, content=content, timeout=30,
                      headers={"content-type": "application/json", **(headers or {})})


def assert_error(response: httpx.Response, path: str, status: int, *mentions: str,
                 param: str | None = None, code: str | None = None) -> str:
    """The status, and exactly the error shape of `path`'s API flavour; returns the message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    if path.startswith("/v1/messages"):
        assert set(body) == {"type", "error"}, body
        assert body["type"] == "error"
        error = body["error"]
        assert set(error) == {"type", "message"}, body
        assert error["type"] == ANTHROPIC_TYPES[status], body
    else:
        assert set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, body
        assert error["type"] == OPENAI_TYPES[status], body
        assert error["param"] is None or isinstance(error["param"], str)
        assert error["code"] is None or isinstance(error["code"], str)
        if param is not None:
            assert error["param"] == param, body
        if code is not None:
            assert error["code"] == code, body
    message = error["message"]
    assert isinstance(message, str) and message
    for word in mentions:
        assert word in message, (word, message)
    return message


def assert_ok(response: httpx.Response, path: str) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body = response.json()
    if path == MESSAGES:
        assert body["type"] == "message" and body["stop_reason"] in ("max_tokens", "end_turn")
    else:
        assert body["choices"][0]["finish_reason"] in ("length", "stop")
    return body


def held_by_requests(srv: LiveServer) -> int:
    """Blocks in use beyond the pins of TTL protection (cache_control / 24h retention hold one reference each)."""
    cache = srv.engine.stats().cache
    return cache.usage.num_in_use - sum(cache.num_protected_blocks.values())


def wait_idle(srv: LiveServer, timeout: float = 10.0) -> None:
    """Every request released and no KV block held by a request."""
    engine = srv.engine
    deadline = time.monotonic() + timeout
    while srv.state.loop.num_active or engine.num_unfinished() or held_by_requests(srv):
        assert time.monotonic() < deadline, "requests or blocks still held"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------ bodies that aren't


@pytest.mark.parametrize("path", ALL_ROUTES)
@pytest.mark.parametrize("raw", [
    pytest.param(b'{"model": "tiny-chat", ', id="truncated"),
    pytest.param(b"model=tiny-chat", id="form-encoded"),
    pytest.param(b"", id="empty"),
    pytest.param(b'{"model": "tiny-chat",}', id="trailing-comma"),
    pytest.param(b'\xff\xfe{"model": 1}', id="not-utf8"),
    pytest.param(b'{"model": "tiny-chat", "prompt": "\xed\xa0\x80"}', id="utf8-encoded-surrogate"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nested-too-deep"),
    pytest.param(b'{"max_tokens": ' + b"9" * 5000 + b"}", id="int-over-4300-digits"),
])
def test_malformed_json_body_is_400_in_the_routes_format(server, path, raw) -> None:
    assert_error(post(server, path, raw=raw), path, 400, "not valid JSON")


@pytest.mark.parametrize("path", ALL_ROUTES)
@pytest.mark.parametrize("payload", [[{"model": MODEL}], "hello", 42, None, True], ids=str)
def test_json_that_is_not_an_object_is_400(server, path, payload) -> None:
    assert_error(post(server, path, payload), path, 400, "must be a JSON object")


@pytest.mark.parametrize("path", ALL_ROUTES)
def test_unpaired_surrogate_escape_is_400_not_a_tokenizer_crash(server, path) -> None:
    text = "hello \ud800 world"  # json.dumps writes the lone surrogate as the escape \ud800
    body = valid_body(path, prompt=text) if path == TEXT else valid_body(path, messages=[
        {"role": "user", "content": text}])
    raw = json.dumps(body).encode()
    assert b"\\ud800" in raw
    assert_error(post(server, path, raw=raw), path, 400, "surrogate")
    # a correctly paired surrogate escape (an emoji) is fine
    paired = json.dumps(valid_body(path, stop=["\U0001F600"]) if path != MESSAGES else
                        valid_body(path, stop_sequences=["\U0001F600"])).encode()
    assert b"\\ud83d\\ude00" in paired
    assert_ok(post(server, path, raw=paired), path)


# -------------------------------------------------------------------------------------- missing fields


@pytest.mark.parametrize("path, field", [
    (CHAT, "model"), (CHAT, "messages"),
    (TEXT, "model"), (TEXT, "prompt"),
    (MESSAGES, "model"), (MESSAGES, "messages"), (MESSAGES, "max_tokens"),
])
@pytest.mark.parametrize("how", ["absent", "null"])
def test_missing_required_field_is_400_naming_the_field(server, path, field, how) -> None:
    body = valid_body(path, **{field: DROP if how == "absent" else None})
    assert_error(post(server, path, body), path, 400, field, "required", param=field)


# ------------------------------------------------------------------------------------------ wrong types

_MSG = [{"role": "user", "content": "hello"}]

WRONG = [
    # (path, overrides, words the message must contain)
    *[(p, {"max_tokens": "x"}, ("max_tokens", "integer")) for p in ALL_ROUTES],
    *[(p, {"max_tokens": 4.5}, ("max_tokens", "integer")) for p in ALL_ROUTES],
    *[(p, {"max_tokens": -1}, ("max_tokens", ">= 0")) for p in ALL_ROUTES],
    *[(p, {"temperature": "hot"}, ("temperature", "number")) for p in ALL_ROUTES],
    *[(p, {"temperature": True}, ("temperature", "number")) for p in ALL_ROUTES],
    *[(p, {"temperature": float("nan")}, ("temperature",)) for p in ALL_ROUTES],
    *[(p, {"temperature": 2.5}, ("temperature", "<=")) for p in ALL_ROUTES],
    *[(p, {"top_p": "x"}, ("top_p",)) for p in ALL_ROUTES],
    *[(p, {"top_k": 1.5}, ("top_k", "integer")) for p in ALL_ROUTES],
    *[(p, {"stream": "yes"}, ("stream", "boolean")) for p in ALL_ROUTES],
    *[(p, {"stream": 1}, ("stream", "boolean")) for p in ALL_ROUTES],
    *[(p, {"model": 7}, ("model", "string")) for p in ALL_ROUTES],
    *[(p, {"messages": "hello"}, ("messages", "array")) for p in CHAT_ROUTES],
    *[(p, {"messages": {"role": "user", "content": "hi"}}, ("messages", "array")) for p in CHAT_ROUTES],
    *[(p, {"messages": ["hello"]}, ("messages[0]", "object")) for p in CHAT_ROUTES],
    *[(p, {"messages": [{"role": "user", "content": 5}]}, ("messages[0].content",)) for p in CHAT_ROUTES],
    *[(p, {"messages": [{"role": "wizard", "content": "hi"}]}, ("messages[0].role", "wizard")) for p in CHAT_ROUTES],
    *[(p, {"messages": [{"content": "hi"}]}, ("messages[0].role", "required")) for p in CHAT_ROUTES],
    *[(p, {"messages": [{"role": 3, "content": "hi"}]}, ("messages[0].role", "string")) for p in CHAT_ROUTES],
    *[(p, {"messages": [*_MSG, {"role": "user", "content": [{"type": "image", "source": {}}]}]},
       ("messages[1].content[0]",)) for p in CHAT_ROUTES],
    *[(p, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, ("messages[0].content[0]",))
      for p in CHAT_ROUTES],
    *[(p, {"stop": 5}, ("stop",)) for p in (CHAT, TEXT)],
    *[(p, {"stop": ["a", 5]}, ("stop",)) for p in (CHAT, TEXT)],
    *[(p, {"stop": [""]}, ("stop", "empty")) for p in (CHAT, TEXT)],
    *[(p, {"stop": ["a", "b", "c", "d", "e"]}, ("stop", "at most 4")) for p in (CHAT, TEXT)],
    *[(p, {"seed": "x"}, ("seed", "integer")) for p in (CHAT, TEXT)],
    *[(p, {"seed": 2**70}, ("seed", "<=")) for p in (CHAT, TEXT)],  # was a 500 (torch seed overflow)
    *[(p, {"stream_options": "x"}, ("stream_options", "object")) for p in (CHAT, TEXT)],
    *[(p, {"response_format": "json"}, ("response_format", "object")) for p in (CHAT, TEXT)],
    *[(p, {"max_completion_tokens": "x"}, ("max_completion_tokens", "integer")) for p in (CHAT, TEXT)],
    *[(p, {"prompt_cache_retention": 24}, ("prompt_cache_retention", "string")) for p in (CHAT, TEXT)],
    (CHAT, {"messages": [{"role": "user"}]}, ("messages[0].content",)),
    (TEXT, {"prompt": 5}, ("prompt",)),
    (TEXT, {"prompt": ""}, ("prompt", "empty")),
    (TEXT, {"prompt": []}, ("prompt",)),
    (TEXT, {"prompt": [1.5, 2]}, ("prompt",)),
    (TEXT, {"prompt": ["one", "two"]}, ("prompt", "one prompt")),
    (TEXT, {"prompt": [True, False]}, ("prompt",)),
    (TEXT, {"prompt": [-1, 5]}, ("-1", "vocabulary")),
    (TEXT, {"prompt": [10**30]}, ("vocabulary",)),
    (MESSAGES, {"stop_sequences": 5}, ("stop_sequences", "array")),
    (MESSAGES, {"stop_sequences": ["", "x"]}, ("stop_sequences",)),
    (MESSAGES, {"stop_sequences": [5]}, ("stop_sequences",)),
    (MESSAGES, {"system": 5}, ("system",)),
    (MESSAGES, {"system": [{"type": "text"}]}, ("system[0].text", "required")),
    (MESSAGES, {"metadata": "x"}, ("metadata", "object")),
    (MESSAGES, {"metadata": {"user_id": 5}}, ("metadata.user_id", "string")),
    (MESSAGES, {"temperature": 1.5}, ("temperature", "<= 1.0")),  # Anthropic's range is [0, 1]
    (MESSAGES, {"messages": [{"role": "system", "content": "hi"}]}, ("messages[0].role", "'system'")),
    (MESSAGES, {"messages": [{"role": "user", "content": []}]}, ("messages[0].content", "empty")),
    (MESSAGES, {"messages": [{"role": "user", "content": ["hi"]}]}, ("messages[0].content[0]",)),
    (MESSAGES, {"cache_salt": 5}, ("cache_salt", "string")),
]


@pytest.mark.parametrize("path, overrides, mentions", [pytest.param(*case, id=f"{case[0]}-{json.dumps(case[1])[:60]}")
                                                        for case in WRONG])
def test_wrong_type_or_value_is_400_naming_the_field(server, path, overrides, mentions) -> None:
    assert_error(post(server, path, valid_body(path, **overrides)), path, 400, *mentions)


@pytest.mark.parametrize("path, overrides, field", [
    (TEXT, {"top_logprobs": 2}, "top_logprobs"),
    (CHAT, {"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
    (TEXT, {"echo": True}, "echo"),
    (TEXT, {"suffix": "end"}, "suffix"),
    (TEXT, {"best_of": 2}, "best_of"),
    (MESSAGES, {"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
])
def test_unsupported_feature_is_400_naming_it(server, path, overrides, field) -> None:
    assert_error(post(server, path, valid_body(path, **overrides)), path, 400, field, "supported", param=field)


# ------------------------------------------------------------------------------- models, paths, methods


@pytest.mark.parametrize("path", ALL_ROUTES)
@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model_is_404_and_never_a_stream(server, path, stream) -> None:
    response = post(server, path, valid_body(path, model="gpt-17-ultra", stream=stream))
    message = assert_error(response, path, 404, "gpt-17-ultra", "tiny-chat", param="model", code="model_not_found")
    assert "not found" in message


@pytest.mark.parametrize("name", ["tiny-chat", "tiny-chat@test", "default"])
def test_served_model_aliases_are_accepted(server, name) -> None:
    for path in ALL_ROUTES:
        assert_ok(post(server, path, valid_body(path, model=name)), path)


@pytest.mark.parametrize("method, path, status", [
    ("GET", CHAT, 405), ("GET", TEXT, 405), ("GET", MESSAGES, 405), ("DELETE", "/v1/models", 405),
    ("POST", "/v1/nope", 404), ("POST", "/v1/messages/batches", 404),
])
def test_unknown_path_or_method_gets_the_routes_error_shape(server, method, path, status) -> None:
    assert_error(httpx.request(method, server.url + path, timeout=30), path, status)


# ------------------------------------------------------------------------------------- empty / too long


@pytest.mark.parametrize("path", CHAT_ROUTES)
def test_empty_messages_list_is_400(server, path) -> None:
    assert_error(post(server, path, valid_body(path, messages=[])), path, 400, "messages", "at least one",
                 param="messages")


LONG_TEXT = "hello world " * 200  # well over 256 tokens with the tiny tokenizer


@pytest.mark.parametrize("path", ALL_ROUTES)
def test_prompt_over_the_context_window_is_400_stating_both_numbers(small, path) -> None:
    engine = small.engine
    assert engine.max_model_len == 256
    if path == TEXT:
        body, n = valid_body(path, prompt=LONG_TEXT), len(engine.tokenize(LONG_TEXT))
    else:
        messages = [{"role": "user", "content": LONG_TEXT}]
        body, n = valid_body(path, messages=messages), len(engine.tokenize(messages))
    assert n > 256
    message = assert_error(post(small, path, body), path, 400, code="context_length_exceeded")
    assert f"prompt has {n} tokens" in message and "context window is 256 tokens" in message


@pytest.mark.parametrize("path", ALL_ROUTES)
def test_prompt_plus_max_tokens_over_the_window_is_400_stating_the_numbers(small, path) -> None:
    response = post(small, path, valid_body(path, max_tokens=255))
    message = assert_error(response, path, 400, "max_tokens (255)", "context window of 256",
                           code="context_length_exceeded")
    assert "prompt (" in message


@pytest.mark.parametrize("path, field", [(CHAT, "max_tokens"), (CHAT, "max_completion_tokens"),
                                         (TEXT, "max_tokens"), (MESSAGES, "max_tokens")])
def test_max_tokens_over_the_context_window_is_400(server, path, field) -> None:
    limit = server.engine.max_model_len
    body = valid_body(path, **{field: limit + 1})
    assert_error(post(server, path, body), path, 400, field, f"<= {limit}", f"{limit + 1}", param=field)
    assert_ok(post(server, path, valid_body(path, **{field: 0})), path)  # 0 is allowed (warms the cache only)


# ------------------------------------------------------------------------------------- body size (413)


@pytest.mark.parametrize("path", ALL_ROUTES)
def test_body_over_max_body_bytes_is_413_and_one_at_the_limit_is_served(small, path) -> None:
    limit = small.state.config.max_body_bytes
    base = json.dumps(valid_body(path, pad="")).encode()
    at_limit = json.dumps(valid_body(path, pad="x" * (limit - len(base)))).encode()  # an unknown field: ignored
    assert len(at_limit) == limit
    assert_ok(post(small, path, raw=at_limit), path)
    over = at_limit.replace(b'"pad": "', b'"pad": "y', 1)
    assert len(over) == limit + 1
    assert_error(post(small, path, raw=over), path, 413, str(limit + 1), str(limit))
    huge = json.dumps(valid_body(path, pad="z" * (10 * limit))).encode()
    assert_error(post(small, path, raw=huge), path, 413)


# ----------------------------------------------------------------------------- Anthropic cache_control


def _blocks(*ttls: str | None) -> list[dict[str, Any]]:
    out = []
    for i, ttl in enumerate(ttls):
        block: dict[str, Any] = {"type": "text", "text": f"block {i}: {LONG_BLOCK}"}
        if ttl is not None:
            block["cache_control"] = {"type": "ephemeral"} if ttl == "5m-default" else {"type": "ephemeral",
                                                                                          "ttl": ttl}
        out.append(block)
    return out


def _cached_request(system: list | None, user: list, top: Any = DROP) -> dict[str, Any]:
    body = valid_body(MESSAGES, messages=[{"role": "user", "content": user}], cache_control=top)
    if system is not None:
        body["system"] = system
    return body


@pytest.mark.parametrize("body, mentions", [
    pytest.param(_cached_request(None, [{"type": "text", "text": "hi", "cache_control": {"type": "persistent"}}]),
                 ("messages[0].content[0].cache_control.type", "ephemeral", "persistent"), id="type-persistent"),
    pytest.param(_cached_request(None, [{"type": "text", "text": "hi", "cache_control": {}}]),
                 ("cache_control.type", "required"), id="type-missing"),
    pytest.param(_cached_request(None, [{"type": "text", "text": "hi",
                                         "cache_control": {"type": "ephemeral", "ttl": "10m"}}]),
                 ("cache_control.ttl", "10m", "'5m', '1h'"), id="ttl-10m"),
    pytest.param(_cached_request(None, [{"type": "text", "text": "hi",
                                         "cache_control": {"type": "ephemeral", "ttl": 300}}]),
                 ("cache_control.ttl", "string"), id="ttl-number"),
    pytest.param(_cached_request(None, [{"type": "text", "text": "hi", "cache_control": "ephemeral"}]),
                 ("messages[0].content[0].cache_control", "object"), id="cache-control-string"),
    pytest.param(_cached_request([{"type": "text", "text": "sys", "cache_control": ["ephemeral"]}], _blocks(None)),
                 ("system[0].cache_control", "object"), id="system-cache-control-list"),
    pytest.param(_cached_request(None, _blocks(None), top="ephemeral"),
                 ("cache_control", "object"), id="top-level-string"),
    pytest.param(_cached_request(None, _blocks(None), top={"type": "persistent"}),
                 ("cache_control.type",), id="top-level-persistent"),
    pytest.param(_cached_request(_blocks("1h", "1h"), _blocks("5m", "5m", "5m")),
                 ("maximum of 4", "found 5"), id="five-breakpoints"),
    pytest.param(_cached_request(_blocks("1h", "5m"), _blocks("5m", "5m-default"), top={"type": "ephemeral"}),
                 ("maximum of 4", "found 5"), id="four-plus-automatic"),
    pytest.param(_cached_request(_blocks("5m"), _blocks("1h")),
                 ("ttl='1h'", "ttl='5m'"), id="1h-after-5m"),
    pytest.param(_cached_request(_blocks("1h", "5m-default", "1h"), _blocks(None)),
                 ("ttl='1h'", "ttl='5m'"), id="1h-after-default-5m"),
    pytest.param(_cached_request(None, _blocks("5m"), top={"type": "ephemeral", "ttl": "1h"}),
                 ("ttl='1h'", "ttl='5m'"), id="automatic-1h-after-5m"),
])
def test_invalid_cache_control_is_400(server, body, mentions) -> None:
    assert_error(post(server, MESSAGES, body), MESSAGES, 400, *mentions)


@pytest.mark.parametrize("body", [
    pytest.param(_cached_request(_blocks("1h"), _blocks("5m")), id="1h-before-5m"),
    pytest.param(_cached_request(_blocks("1h", "1h"), _blocks("5m", "5m")), id="four-breakpoints"),
    pytest.param(_cached_request(_blocks("1h", "5m"), _blocks("5m-default"), top={"type": "ephemeral"}),
                 id="three-plus-automatic"),
    pytest.param(_cached_request(None, _blocks(None, "5m"), top={"type": "ephemeral"}),
                 id="automatic-on-a-marked-last-block"),
    pytest.param(_cached_request(None, _blocks(None), top={"type": "ephemeral", "ttl": "1h"}), id="automatic-1h"),
    pytest.param(_cached_request(None, [{"type": "text", "text": "hi", "cache_control": None}]), id="null"),
    pytest.param(_cached_request(None, [{"type": "text", "text": "hi",
                                         "cache_control": {"type": "ephemeral", "ttl": None}}]), id="null-ttl"),
    pytest.param(_cached_request(None, [{"type": "text", "text": "hi",
                                         "cache_control": {"type": "ephemeral", "scope": "x"}}]), id="extra-key"),
])
def test_valid_cache_control_is_served(server, body) -> None:
    usage = assert_ok(post(server, MESSAGES, body), MESSAGES)["usage"]
    assert set(usage["cache_creation"]) == {"ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens"}
    server.engine.check_integrity()


# ------------------------------------------------------------------------------ OpenAI-specific fields


@pytest.mark.parametrize("path", (CHAT, TEXT))
def test_n_above_sixteen_is_400_and_n_up_to_sixteen_is_served(server, path) -> None:
    assert_error(post(server, path, valid_body(path, n=17)), path, 400, "16", param="n")
    for n in (1, 2):
        assert_ok(post(server, path, valid_body(path, n=n)), path)


@pytest.mark.parametrize("path", (CHAT, TEXT))
def test_prompt_cache_retention_accepts_only_in_memory_and_24h(server, path) -> None:
    assert_error(post(server, path, valid_body(path, prompt_cache_retention="forever")), path, 400,
                 "prompt_cache_retention", "forever", "'in_memory', '24h'", param="prompt_cache_retention")
    for retention in ("24h", "in_memory"):
        assert_ok(post(server, path, valid_body(path, prompt_cache_retention=retention)), path)


HARMLESS_OPENAI = {"logit_bias": {}, "metadata": {}, "service_tier": "auto", "parallel_tool_calls": True,
                   "store": False, "user": "u-1", "prompt_cache_key": "k-1", "tools": [], "tool_choice": "none",
                   "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": False, "response_format": {
                       "type": "text"}, "stream_options": None, "reasoning_effort": "low", "modalities": ["text"],
                   "some_future_field": {"nested": [1, 2]}}
HARMLESS_ANTHROPIC = {"metadata": {"user_id": "u-1"}, "service_tier": "auto", "top_k": 5, "tools": [],
                      "system": "", "anthropic_version": "2023-06-01", "some_future_field": [1]}


@pytest.mark.parametrize("path, extra", [(CHAT, HARMLESS_OPENAI), (TEXT, HARMLESS_OPENAI),
                                         (MESSAGES, HARMLESS_ANTHROPIC)])
def test_unknown_but_harmless_fields_are_accepted(server, path, extra) -> None:
    assert_ok(post(server, path, valid_body(path, **extra)), path)


# ---------------------------------------------------------------------------------------------- auth


@pytest.mark.parametrize("path", ALL_ROUTES)
@pytest.mark.parametrize("headers, why", [
    ({}, "missing"),
    ({"authorization": "Bearer key-b"}, "invalid"),
    ({"x-api-key": "key-b"}, "invalid"),
    ({"authorization": "Bearer"}, "missing"),
    ({"authorization": "Basic key-a"}, "missing"),
    ({"x-api-key": ""}, "missing"),
    ({"x-api-key": "key-a-but-longer"}, "invalid"),
], ids=["no-key", "wrong-bearer", "wrong-x-api-key", "bearer-without-key", "basic-scheme", "empty-x-api-key", "prefix"])
def test_missing_or_wrong_api_key_is_401_in_the_routes_format(authed, path, headers, why) -> None:
    response = post(authed, path, valid_body(path), headers=headers)
    assert_error(response, path, 401, why, code="invalid_api_key")


@pytest.mark.parametrize("path", ALL_ROUTES)
def test_auth_is_checked_before_the_body_is_read(authed, path) -> None:
    assert_error(post(authed, path, raw=b"{not json"), path, 401)
    assert_error(post(authed, path, raw=b"{not json", headers={"x-api-key": "key-a"}), path, 400, "JSON")


@pytest.mark.parametrize("path, headers", [(CHAT, {"authorization": "Bearer key-a"}),
                                           (TEXT, {"authorization": "bearer key-a"}),
                                           (MESSAGES, {"x-api-key": "key-a"})])
def test_the_right_api_key_is_served(authed, path, headers) -> None:
    assert_ok(post(authed, path, valid_body(path), headers=headers), path)


def test_models_route_needs_the_key_too(authed) -> None:
    assert_error(httpx.get(authed.url + "/v1/models", timeout=30), "/v1/models", 401)
    ok = httpx.get(authed.url + "/v1/models", headers={"authorization": "Bearer key-a"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == MODEL


# ------------------------------------------------------------------------------------- bounded queue


def test_full_queue_is_429_on_openai_and_529_on_anthropic_then_a_disconnect_frees_everything(queued) -> None:
    engine = queued.engine
    hold = {"model": MODEL, "prompt": "hello", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=queued.url, timeout=30) as client:
        with client.stream("POST", TEXT, json=hold) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # it is generating
            assert queued.state.loop.num_active == 1
            for path, status in ((CHAT, 429), (TEXT, 429), (MESSAGES, 529)):
                for stream_it in (False, True):
                    response = client.post(path, json=valid_body(path, stream=stream_it))
                    assert_error(response, path, status, "overloaded", "limit 1")
                    assert response.headers["retry-after"] == "1"
            for _ in range(5):  # the held stream is undisturbed by the refusals
                assert next(line for line in lines if line.startswith("data:"))
        # leaving the block closes the connection mid-stream
    wait_idle(queued)
    assert engine.stats().cache.usage.num_in_use == 0  # nothing is protected on this server: truly all free
    assert engine.stats().num_generated_tokens < 4000  # the disconnect stopped the generation
    engine.check_integrity()
    for path in ALL_ROUTES:
        assert_ok(httpx.post(queued.url + path, json=valid_body(path), timeout=30), path)
    wait_idle(queued)
    engine.check_integrity()


# ------------------------------------------------------------------------------------------- last


@pytest.mark.parametrize("srv_name", ["server", "small", "authed", "queued"])
def test_after_all_bad_input_every_server_still_serves_and_its_pool_is_intact(request, srv_name) -> None:
    srv: LiveServer = request.getfixturevalue(srv_name)
    headers = {"x-api-key": "key-a"} if srv_name == "authed" else {}
    for path in ALL_ROUTES:
        assert_ok(post(srv, path, valid_body(path), headers=headers), path)
        streamed = httpx.post(srv.url + path, json=valid_body(path, stream=True), headers=headers, timeout=30)
        assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
        assert streamed.text.rstrip().endswith(("[DONE]", '{"type":"message_stop"}'))
    wait_idle(srv)
    srv.engine.check_integrity()
    assert srv.state.loop.num_step_errors == 0


def test_openai_default_max_tokens_is_capped_by_what_the_window_leaves(small) -> None:
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
            "ignore_eos": True}
    data = assert_ok(post(small, "/v1/chat/completions", body), "/v1/chat/completions")
    assert data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"] <= 256
    assert data["choices"][0]["finish_reason"] == "length"


def test_completion_token_ids_written_as_integral_floats_are_token_ids(server) -> None:
    """Found by schemathesis: JSON Schema counts 147.0 as an integer, and so does every other integer field."""
    as_floats = post(server, TEXT, {"model": MODEL, "prompt": [5.0, 6.0, 7.0], "max_tokens": 2, "temperature": 0})
    as_ints = post(server, TEXT, {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0})
    assert as_floats.status_code == 200, as_floats.text
    assert as_floats.json()["choices"][0]["text"] == as_ints.json()["choices"][0]["text"]
    assert_error(post(server, TEXT, {"model": MODEL, "prompt": [5.5, 6], "max_tokens": 2}), TEXT, 400, "token ids")


def test_a_bad_max_tokens_is_refused_even_beside_max_completion_tokens(server) -> None:
    """Found by schemathesis: max_tokens went unchecked whenever max_completion_tokens was given."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0,
            "max_tokens": {"": []}}
    assert_error(post(server, CHAT, body), CHAT, 400, "max_tokens", param="max_tokens")
