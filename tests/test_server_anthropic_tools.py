"""Anthropic /v1/messages tools, tool_choice, tool history, output_config, prefill and the fields we refuse,
through the official anthropic SDK against a live server (tiny random-weight model).

Constrained JSON has no free whitespace and tool schemas here have one enum property each, so a forced call
always finishes within MAX_TOKENS; parallel calls are off unless disable_parallel_tool_use is false.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest
from server_helpers import LiveServer, no_errors_logged, tiny_chat_engine, twin_engine

from promptstash.config import ServerConfig
from promptstash.server.anthropic_api import _BlockEvents
from promptstash.tools import ArgsDelta, CallEnd, CallStart, TextDelta

pytestmark = pytest.mark.timeout(100)

MAX_TOKENS = 300
WEATHER = {"name": "get_weather", "description": "The weather in a city today.",
           "input_schema": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}},
                            "required": ["city"], "additionalProperties": False}}
UNITS = {"name": "set_units", "description": "Choose the units.",
         "input_schema": {"type": "object", "properties": {"metric": {"type": "boolean"}}, "required": ["metric"],
                          "additionalProperties": False}}
TOOLS = [WEATHER, UNITS]
SCHEMAS = {t["name"]: t["input_schema"] for t in TOOLS}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = tiny_chat_engine(tmp_path_factory.mktemp("tok"))
    with LiveServer(engine, ServerConfig(min_cacheable_tokens=16)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


@pytest.fixture(autouse=True)
def no_internal_errors():
    with no_errors_logged("promptstash.server", "uvicorn.error"):
        yield


def create(server, client: anthropic.Anthropic, **kw: Any):
    kw.setdefault("max_tokens", MAX_TOKENS)
    kw.setdefault("messages", USER)
    return client.messages.create(model=server.state.model_name, **kw)


def check_tool_uses(message, single: bool) -> list:
    uses = [b for b in message.content if b.type == "tool_use"]
    assert uses and message.stop_reason == "tool_use", message
    if single:
        assert len(uses) == 1
    for use in uses:
        assert use.id.startswith("toolu_") and use.name in SCHEMAS
        jsonschema.validate(use.input, SCHEMAS[use.name])
    assert len({use.id for use in uses}) == len(uses)
    return uses


# -- tool calls ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("choice", [{"type": "any", "disable_parallel_tool_use": True},
                                    {"type": "tool", "name": "set_units", "disable_parallel_tool_use": True}])
def test_forced_tool_choice_returns_a_tool_use_whose_input_fits_the_schema(server, client, choice) -> None:
    message = create(server, client, tools=TOOLS, tool_choice=choice)
    [use] = check_tool_uses(message, single=True)
    if choice["type"] == "tool":
        assert use.name == "set_units" and isinstance(use.input["metric"], bool)
    assert all(b.type == "tool_use" for b in message.content)  # forced: no text before the call


def test_parallel_calls_only_when_asked_for_and_never_repeated(server, client) -> None:
    for _ in range(3):
        check_tool_uses(create(server, client, tools=TOOLS, tool_choice={"type": "any"}), single=True)
        message = create(server, client, tools=TOOLS, tool_choice={"type": "any", "disable_parallel_tool_use": False})
        uses = check_tool_uses(message, single=False)
        calls = [(use.name, use.input) for use in uses]
        assert all(calls.count(call) == 1 for call in calls), calls  # a repeat ends the output, dropped


def _block(block) -> tuple:
    return (block.type, block.text) if block.type == "text" else (block.type, block.name, block.input)


def test_tools_with_output_config(server, client) -> None:
    """tool_choice auto with an output format: tool_use blocks or JSON text in the format; any: a tool_use."""
    body = {"output_config": {"format": {"type": "json_schema", "schema": OUTPUT_SCHEMA}}}
    for temperature in (0.0, 1.0, 1.0, 1.0):
        message = create(server, client, tools=TOOLS, extra_body={**body, "temperature": temperature})
        if message.stop_reason == "tool_use":
            check_tool_uses(message, single=True)
            assert all(b.type == "tool_use" for b in message.content)
        else:
            [block] = message.content
            assert block.type == "text" and message.stop_reason == "end_turn", message
            jsonschema.validate(json.loads(block.text), OUTPUT_SCHEMA)
        if temperature == 0.0:
            with client.messages.stream(model=server.state.model_name, max_tokens=MAX_TOKENS, messages=USER,
                                        tools=TOOLS, extra_body={**body, "temperature": 0.0}) as stream:
                final = stream.get_final_message()
            assert [_block(b) for b in final.content] == [_block(b) for b in message.content]
    forced = create(server, client, tools=TOOLS, extra_body=body, tool_choice={"type": "any"})
    check_tool_uses(forced, single=True)


def test_streamed_tool_use_events(server, client) -> None:
    events = list(create(server, client, tools=TOOLS, stream=True,
                         tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-2:] == ["message_delta", "message_stop"]
    start = events[1]
    assert start.index == 0 and start.content_block.type == "tool_use"
    assert start.content_block.name == "get_weather" and start.content_block.input == {}
    assert start.content_block.id.startswith("toolu_")
    deltas = events[2:-3]
    assert deltas and all(e.type == "content_block_delta" and e.index == 0 for e in deltas)
    assert all(e.delta.type == "input_json_delta" for e in deltas)
    assert events[-3].type == "content_block_stop" and events[-3].index == 0
    arguments = json.loads("".join(e.delta.partial_json for e in deltas))
    jsonschema.validate(arguments, WEATHER["input_schema"])
    assert events[-2].delta.stop_reason == "tool_use"
    with client.messages.stream(model=server.state.model_name, max_tokens=MAX_TOKENS, messages=USER, tools=TOOLS,
                                tool_choice={"type": "any", "disable_parallel_tool_use": True}) as stream:
        final = stream.get_final_message()
    check_tool_uses(final, single=True)


def test_block_indexes_after_a_text_block() -> None:
    blocks = _BlockEvents()
    events = blocks.events([TextDelta("Let me check."), CallStart(0, "call_1", "get_weather"),
                            ArgsDelta(0, '{"city": '), ArgsDelta(0, '"Paris"}'), CallEnd(0),
                            CallStart(1, "call_2", "set_units"), ArgsDelta(1, "{}"), CallEnd(1)]) + blocks.close()
    parsed = [json.loads(e.split("data: ", 1)[1]) for e in events]
    assert [(p["type"], p.get("index")) for p in parsed] == [
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_delta", 1),
        ("content_block_stop", 1), ("content_block_start", 2), ("content_block_delta", 2),
        ("content_block_stop", 2)]
    assert parsed[3]["content_block"]["type"] == "tool_use" and parsed[3]["content_block"]["input"] == {}
    assert parsed[4]["delta"] == {"type": "input_json_delta", "partial_json": '{"city": '}
    assert blocks.num_calls == 2


def test_tool_choice_none_renders_tools_but_returns_text(server, client) -> None:
    message = create(server, client, tools=TOOLS, tool_choice={"type": "none"}, max_tokens=8)
    assert [b.type for b in message.content] == ["text"] and message.stop_reason != "tool_use"
    with_tools = client.messages.count_tokens(model=server.state.model_name, messages=USER, tools=TOOLS,
                                              tool_choice={"type": "none"})
    without = client.messages.count_tokens(model=server.state.model_name, messages=USER)
    assert with_tools.input_tokens > without.input_tokens + 50


def test_a_tool_history_with_cache_control_everywhere_is_served_and_counted(server, client) -> None:
    cc = {"type": "ephemeral"}
    tools = [{**WEATHER, "cache_control": {"type": "ephemeral", "ttl": "1h"}}, UNITS]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Paris"}, "cache_control": cc}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "cache_control": cc,
                                      "content": [{"type": "text", "text": "sunny, 21 C"}]},
                                     {"type": "text", "text": "And tomorrow?"}]},
    ]
    counted = client.messages.count_tokens(model=server.state.model_name, messages=messages, tools=tools,
                                           system=[{"type": "text", "text": "Be brief.", "cache_control": cc}])
    positions = [b["prefix_tokens"] for b in counted.model_extra["cache_breakpoints"]]
    # prompt order: system text, tool definitions (the 1h one raises the system's 5m: its prefix), call, result
    assert [b["ttl"] for b in counted.model_extra["cache_breakpoints"]] == ["1h", "1h", "5m", "5m"]
    assert len(positions) == 4 and positions == sorted(positions) and positions[-1] < counted.input_tokens
    plain = client.messages.count_tokens(model=server.state.model_name, messages=USER)
    assert counted.input_tokens > plain.input_tokens
    message = create(server, client, messages=messages, tools=tools, max_tokens=4, tool_choice={"type": "none"},
                     system=[{"type": "text", "text": "Be brief.", "cache_control": cc}])
    usage = message.usage
    assert usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens == \
        counted.input_tokens


def test_cache_control_on_a_tool_writes_then_reads_the_cache(server, client) -> None:
    long_tool = {"name": "lookup", "description": "Look a word up in the dictionary. " * 20,
                 "input_schema": {"type": "object", "properties": {"word": {"enum": ["fox", "dog"]}}},
                 "cache_control": {"type": "ephemeral"}}
    kw = {"tools": [long_tool], "tool_choice": {"type": "none"}, "max_tokens": 1, "cache_salt": "tools-cc"}
    first = create(server, client, messages=[{"role": "user", "content": "first question"}], extra_body=kw)
    assert first.usage.cache_creation_input_tokens > 0 and first.usage.cache_read_input_tokens == 0
    second = create(server, client, messages=[{"role": "user", "content": "another one"}], extra_body=kw)
    assert second.usage.cache_read_input_tokens >= first.usage.cache_creation_input_tokens - 16


# -- structured output and prefill ---------------------------------------------------------------------------

OUTPUT_SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
                 "additionalProperties": False}


@pytest.mark.parametrize("field", ["output_config", "output_format"])
def test_output_config_json_schema_constrains_the_text(server, client, field) -> None:
    value = {"type": "json_schema", "schema": OUTPUT_SCHEMA}
    body = {"output_config": {"format": value}} if field == "output_config" else {"output_format": value}
    message = create(server, client, extra_body=body)
    [block] = message.content
    assert block.type == "text" and message.stop_reason == "end_turn"
    jsonschema.validate(json.loads(block.text), OUTPUT_SCHEMA)


def test_assistant_prefill_is_continued(server, client) -> None:
    prefill = "hello world"
    messages = [{"role": "user", "content": "say hello"}, {"role": "assistant", "content": prefill}]
    counted = client.messages.count_tokens(model=server.state.model_name, messages=messages)
    tokenizer = server.engine.tokenizer
    expected = tokenizer.encode("<|im_start|>user\nsay hello<|im_end|>\n<|im_start|>assistant\nhello world")
    assert counted.input_tokens == len(expected)
    message = create(server, client, messages=messages, max_tokens=5, extra_body={"temperature": 0})
    again = twin_engine(server.engine).generate(expected, max_tokens=5)
    assert message.content[0].text == again.text  # only the new text, continuing the prefill


def test_thinking_disabled_is_accepted(server, client) -> None:
    assert create(server, client, max_tokens=1, thinking={"type": "disabled"}).content is not None


# -- bad input -----------------------------------------------------------------------------------------------

def tool_use(call_id: str = "toolu_1", **kw: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": call_id, "name": "get_weather", "input": {"city": "Paris"}, **kw}


HISTORY = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [tool_use()]}]
BAD = [
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking is not supported"),
    ({"thinking": {"type": "adaptive"}}, "thinking is not supported"),
    ({"container": "c1"}, "container"),
    ({"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]}, "mcp_servers"),
    ({"context_management": {"edits": []}}, "context_management"),
    ({"output_config": {"effort": "low"}}, "output_config.effort"),
    ({"output_config": {"format": {"type": "json_object"}}}, "output_config.format.type"),
    ({"output_config": {"format": {"type": "json_schema"}}}, "output_config.format.schema"),
    ({"output_config": {"format": {"type": "json_schema", "schema": {"type": "object", "properties": {
        "a": {"type": "nonsense"}}}}}}, "cannot be compiled into a grammar"),
    ({"output_config": {"format": {"type": "json_schema", "schema": {"type": "object", "properties": {
        "a": {"type": "nonsense"}}}}}, "tools": TOOLS}, "output_config.format.schema: cannot be compiled"),
    ({"tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"}}, "no tool named 'nope'"),
    ({"tool_choice": {"type": "any"}}, "needs tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
    ({"tools": TOOLS, "tool_choice": {"type": "tool"}}, "tool_choice.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "any", "name": "get_weather"}}, "tool_choice.name"),
    ({"tools": [{**WEATHER, "name": "bad name!"}]}, "tools[0].name"),
    ({"tools": [WEATHER, WEATHER]}, "duplicate tool name"),
    ({"tools": [{"name": "f"}]}, "tools[0].input_schema"),
    ({"tools": [{"name": "f", "input_schema": {"type": "array"}}]}, "tools[0].input_schema"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
    ({"tools": [{**WEATHER, "defer_loading": True}]}, "tools[0].defer_loading"),
    ({"tools": [{**WEATHER, "cache_control": {"type": "permanent"}}]}, "tools[0].cache_control.type"),
    ({"tools": [{"name": "f", "input_schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}]},
     "cannot be compiled into a grammar"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9",
                                                 "content": "x"}]}]}, "matches no tool call"),
    ({"messages": HISTORY + [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2"}]}]},
     "messages[2].content[0].tool_use_id"),
    ({"messages": [{"role": "user", "content": [tool_use()]}]}, "belong in assistant messages"),
    ({"messages": HISTORY + [{"role": "user", "content": "ok"},
                             {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "toolu_1"}]},
                             {"role": "user", "content": "?"}]}, "belong in user messages"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather"}]}, {"role": "user", "content": "?"}]},
     "messages[1].content[0].input: field required"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [tool_use(), tool_use()]},
                   {"role": "user", "content": "?"}]}, "duplicate tool_use id"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [tool_use("bad id!")]},
                   {"role": "user", "content": "?"}]}, "messages[1].content[0].id"),
    ({"messages": HISTORY}, "prefill"),
    ({"messages": USER + [{"role": "assistant", "content": [{"type": "text", "text": "hello world", "module": True}]}]},
     "prefill cannot end with a module"),
    ({"messages": HISTORY + [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                           "content": [{"type": "image", "source": {}}]}]}]},
     "messages[2].content[0].content[0].type"),
    ({"messages": HISTORY + [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                           "is_error": "yes"}]}]}, "is_error"),
    ({"tools": [{**WEATHER, "cache_control": {"type": "ephemeral", "ttl": "5m"}}],
      "system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]},
     "longer TTLs must come first"),
    ({"tools": [{**WEATHER, "cache_control": {"type": "ephemeral"}}, {**UNITS, "cache_control": {"type": "ephemeral"}}],
      "system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}],
      "messages": HISTORY[:1] + [{"role": "assistant", "content": [tool_use(cache_control={"type": "ephemeral"})]},
                                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                               "cache_control": {"type": "ephemeral"}}]}]},
     "a maximum of 4 blocks with cache_control"),
]


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
@pytest.mark.parametrize("extra,mentions", BAD, ids=[m for _, m in BAD])
def test_bad_tool_input_is_a_400_naming_the_problem(server, path, extra, mentions) -> None:
    body = {"model": server.state.model_name, "max_tokens": 4, "messages": USER, **extra}
    response = httpx.post(server.url + path, json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert mentions in error["error"]["message"], error


def test_the_sdk_raises_bad_request_for_an_unknown_tool_choice_name(server, client) -> None:
    with pytest.raises(anthropic.BadRequestError, match="no tool named"):
        create(server, client, tools=TOOLS, tool_choice={"type": "tool", "name": "missing"})
