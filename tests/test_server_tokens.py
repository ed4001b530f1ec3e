"""Token counting without running the model: Anthropic count_tokens (with breakpoint cacheability, as the
official SDK calls it) and vLLM-shaped /tokenize and /detokenize; bad input is a clear 400."""

from __future__ import annotations

import anthropic
import httpx
import pytest
from server_helpers import LiveServer, no_errors_logged, tiny_chat_engine

from promptstash.config import ServerConfig

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = tiny_chat_engine(tmp_path_factory.mktemp("tok"))
    with LiveServer(engine, ServerConfig(min_cacheable_tokens=16)) as srv:
        yield srv


@pytest.fixture(autouse=True)
def no_internal_errors():
    with no_errors_logged("promptstash.server", "uvicorn.error"):
        yield


def model(server) -> str:
    return httpx.get(server.url + "/v1/models").json()["data"][0]["id"]


def test_count_tokens_equals_the_prompt_tokens_of_the_same_request_and_rates_each_breakpoint(server) -> None:
    client = anthropic.Anthropic(base_url=server.url, api_key="unused")
    long_doc = "hello world " * 40
    system = [{"type": "text", "text": "short", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
              {"type": "text", "text": long_doc, "cache_control": {"type": "ephemeral"}}]
    messages = [{"role": "user", "content": "def add(a, b): return a + b"}]
    counted = client.messages.count_tokens(model=model(server), system=system, messages=messages)
    sent = client.messages.create(model=model(server), system=system, messages=messages, max_tokens=1)
    assert counted.input_tokens == (sent.usage.input_tokens + sent.usage.cache_read_input_tokens
                                    + sent.usage.cache_creation_input_tokens)
    raw = httpx.post(server.url + "/v1/messages/count_tokens", json={
        "model": model(server), "system": system, "messages": messages}).json()
    first, second = raw["cache_breakpoints"]
    assert not first["cacheable"] and first["prefix_tokens"] < 16  # too short: it writes nothing
    assert second["cacheable"] and second["ttl"] == "5m" and raw["min_cacheable_tokens"] == 16
    bad = dict(system=[system[1], {**system[0], "text": "later"}], messages=messages)  # 1h after 5m: as create()
    assert httpx.post(server.url + "/v1/messages/count_tokens", json={"model": model(server), **bad}).status_code == 400


def test_tokenize_and_detokenize_round_trip_text_and_chat_messages(server) -> None:
    out = httpx.post(server.url + "/tokenize", json={"prompt": "hello world def add"}).json()
    assert out["count"] == len(out["tokens"]) > 0 and out["max_model_len"] > 0
    back = httpx.post(server.url + "/detokenize", json={"tokens": out["tokens"]}).json()
    assert back["prompt"].endswith("hello world def add")
    chat = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "hello"}]}).json()
    text = httpx.post(server.url + "/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert "<|im_start|>user" in text and "hello" in text


def test_tokenize_renders_tools_as_chat_completions_would(server) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    plain = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()
    with_tools = httpx.post(server.url + "/tokenize", json={"messages": messages, "tools": tools}).json()
    text = httpx.post(server.url + "/detokenize", json={"tokens": with_tools["tokens"]}).json()["prompt"]
    assert with_tools["count"] > plain["count"] and "get_weather" in text
    chat = httpx.post(server.url + "/v1/chat/completions", json={"model": model(server), "messages": messages,
                                                                 "tools": tools, "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == with_tools["count"]


@pytest.mark.parametrize("path,body,mentions", [
    ("/v1/messages/count_tokens", {"messages": [{"role": "user", "content": "x"}]}, "model"),
    ("/v1/messages/count_tokens", {"model": "MODEL", "messages": "nope"}, "messages"),
    ("/v1/messages/count_tokens", {"model": "MODEL", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "x", "module": "yes"}]}]}, "module"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "x", "messages": []}, "not both"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"prompt": "x", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "tools": [{"name": "f"}]}, "tools[0]"),
    ("/detokenize", {"tokens": [1, -1]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
    ("/detokenize", {"tokens": [True]}, "tokens"),
])
def test_bad_token_counting_input_is_a_clear_400_and_the_server_keeps_serving(server, path, body, mentions) -> None:
    if body.get("model") == "MODEL":
        body = {**body, "model": model(server)}
    r = httpx.post(server.url + path, json=body)
    assert r.status_code == 400, r.text
    assert mentions in r.text
    if path.startswith("/v1/messages"):
        assert r.json()["type"] == "error"  # Anthropic's error shape
    assert httpx.post(server.url + "/tokenize", json={"prompt": "ok"}).status_code == 200


@pytest.mark.parametrize("tools,status", [(None, 200), ([], 200), ({}, 400), ("", 400), (0, 400),
                                          ([{"name": "f"}], 400)])
def test_tools_must_be_an_array_of_tool_definitions(server, tools, status) -> None:
    body = {"model": model(server), "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}], "tools": tools}
    assert httpx.post(server.url + "/v1/messages", json=body).status_code == status
    chat = {"model": model(server), "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}], "tools": tools}
    assert httpx.post(server.url + "/v1/chat/completions", json=chat).status_code == status
