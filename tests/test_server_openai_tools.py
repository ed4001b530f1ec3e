"""OpenAI tool calling and structured outputs over a live server (tiny random-weight chat model), through the
official openai SDK. The model is random, so calls are forced (tool_choice required / named) and schemas are
tight (enums, bounded integers): constrained decoding must still give calls whose arguments validate against
their schema, streamed deltas that reassemble to the same call, and parsed pydantic objects."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, ConfigDict
from server_helpers import LiveServer, no_errors_logged, tiny_chat_engine

from promptstash.config import ServerConfig

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER,
                                      "strict": True}},
    {"type": "function", "function": {"name": "add", "description": "", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
MESSAGES = [{"role": "system", "content": "You call tools."}, {"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = tiny_chat_engine(tmp_path_factory.mktemp("tok"), max_model_len=2048, block_size=16)
    with LiveServer(engine, ServerConfig(min_cacheable_tokens=32)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def _brace_first(server) -> dict[str, int]:
    """logit_bias for every token starting with "{": with tool_choice auto the random model then starts its
    output with "{", which the grammar makes a bare call (or JSON text in the response_format)."""
    tokenizer = server.engine.tokenizer
    return {str(i): 100 for i in range(tokenizer.vocab_size)
            if tokenizer.decode([i], skip_special_tokens=False).startswith("{")}


def _chat(server, client, **kwargs):
    kwargs.setdefault("messages", MESSAGES)
    kwargs.setdefault("max_tokens", 300)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=server.state.model_name, **kwargs)


def _streamed(chunks) -> tuple[str, list[tuple[str, str]], list[str]]:
    """Content, (name, arguments) per call and finish reasons of a streamed chat completion."""
    calls: dict[int, dict] = {}
    reasons, content = [], ""
    for chunk in chunks:
        for c in chunk.choices:
            content += c.delta.content or ""
            for delta in c.delta.tool_calls or ():
                if delta.id is not None:
                    assert delta.index not in calls
                    calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
                    assert delta.function.arguments == "" and delta.type == "function"
                else:
                    assert delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments or ""
            if c.finish_reason is not None:
                reasons.append(c.finish_reason)
    assert all(c["id"].startswith("call_") for c in calls.values())
    return content, [(c["name"], c["arguments"]) for c in calls.values()], reasons


def _bad(call, *mentions: str, param: str | None = None) -> str:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    error = info.value.body
    for text in mentions:
        assert text in error["message"], error
    if param is not None:
        assert error["param"] == param, error
    return error["message"]


def _check_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


# -- tool calls ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("parallel", [None, True, False])
def test_required_tool_choice_gives_calls_whose_arguments_validate(server, client, parallel) -> None:
    """Parallel calls only when asked for; then never the same call twice."""
    kwargs = {} if parallel is None else {"parallel_tool_calls": parallel}
    with no_errors_logged("promptstash"):
        response = _chat(server, client, tools=TOOLS, tool_choice="required", n=3, temperature=1.0, seed=1,
                         **kwargs)
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        calls = choice.message.tool_calls
        _check_calls(calls)
        if not parallel:
            assert len(calls) == 1
        keys = [(c.function.name, json.loads(c.function.arguments)) for c in calls]
        assert all(keys.count(k) == 1 for k in keys), keys


def test_auto_takes_a_bare_call(server, client) -> None:
    """A model answering with a bare {"name", "arguments"} object (no tags) on tool_choice auto made a call."""
    kwargs = dict(tools=TOOLS, logit_bias=_brace_first(server))
    with no_errors_logged("promptstash"):
        response = _chat(server, client, **kwargs)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    _check_calls(choice.message.tool_calls)
    content, calls, reasons = _streamed(_chat(server, client, stream=True, **kwargs))
    assert content == "" and reasons == ["tool_calls"]
    assert calls == [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]


def test_tools_with_a_response_format(server, client) -> None:
    """openai-agents sends both for an agent with tools and an output type: auto gives calls or JSON text in
    the format; required forces a call."""
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "final_output", "schema": schema, "strict": True}}
    seen = set()
    with no_errors_logged("promptstash"):
        for extra in ({}, {"logit_bias": _brace_first(server)}):
            response = _chat(server, client, tools=TOOLS, response_format=fmt, n=4, temperature=1.0, seed=3,
                             **extra)
            for choice in response.choices:
                if choice.message.tool_calls:
                    assert choice.finish_reason == "tool_calls" and choice.message.content is None
                    _check_calls(choice.message.tool_calls)
                    seen.add("call")
                else:
                    assert choice.finish_reason == "stop", choice
                    jsonschema.validate(json.loads(choice.message.content), schema)
                    seen.add("text")
        assert seen == {"call", "text"}
        forced = _chat(server, client, tools=TOOLS, response_format={"type": "json_object"}, tool_choice="required")
    assert forced.choices[0].finish_reason == "tool_calls"
    _check_calls(forced.choices[0].message.tool_calls)


def test_named_tool_choice_calls_that_function(server, client) -> None:
    for name in ("add", "get_weather"):
        response = _chat(server, client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": name}})
        calls = response.choices[0].message.tool_calls
        _check_calls(calls)
        assert [c.function.name for c in calls] == [name]
        assert response.choices[0].finish_reason == "tool_calls"


def test_streamed_tool_call_deltas_reassemble_to_the_same_call(server, client) -> None:
    kwargs = dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = _chat(server, client, **kwargs).choices[0].message.tool_calls
    content, calls, reasons = _streamed(_chat(server, client, stream=True, **kwargs))
    assert content == "" and reasons == ["tool_calls"]
    assert calls == [(c.function.name, c.function.arguments) for c in whole]


def test_tool_choice_none_neither_constrains_nor_parses(server, client) -> None:
    response = _chat(server, client, tools=TOOLS, tool_choice="none", max_tokens=8)
    choice = response.choices[0]
    assert choice.message.tool_calls is None and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")


def test_tool_results_history_is_served_and_cached_tokens_grow(server, client) -> None:
    """A 3-step agent loop: each step resends the tools and the growing history, and reads more from the cache."""
    messages = [{"role": "system", "content": "You are an agent. " + "Use the tools well. " * 20},
                {"role": "user", "content": "Plan a trip."}]
    cached = []
    for step in range(3):
        response = _chat(server, client, messages=messages, tools=TOOLS, tool_choice="required",
                         extra_body={"cache_salt": "agent-loop"})
        calls = response.choices[0].message.tool_calls
        _check_calls(calls)
        cached.append(response.usage.prompt_tokens_details.cached_tokens)
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in calls]})
        messages += [{"role": "tool", "tool_call_id": c.id, "content": f"result {step}"} for c in calls]
    assert cached[0] < cached[1] < cached[2], cached
    # litellm omits content on an assistant turn with tool calls; content may also be text parts
    messages[2].pop("content")
    messages[3]["content"] = [{"type": "text", "text": "result 0"}]
    final = _chat(server, client, messages=messages, tools=TOOLS, max_tokens=4)
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("kwargs, mentions, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, ("no tool named 'fly'",),
     "tool_choice.function.name"),
    ({"tool_choice": "required"}, ("needs tools",), "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, ("'none', 'auto', 'required'",), "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "allowed_tools"}}, ("'function'",), "tool_choice.type"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, ("'function'",), "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "two words"}}]}, ("function name",),
     "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "a"}}]},
     ("two tools",), "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "a", "parameters": "x"}}]}, ("object",),
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "a", "parameters": {"type": "object",
                                                                             "properties": {"x": {"type": "nope"}}}}}],
      "tool_choice": "required"}, ("cannot be compiled into a grammar",), "tools"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, ("boolean",), "parallel_tool_calls"),
    ({"tools": {}}, ("array",), "tools"),
    ({"tools": TOOLS, "extra_body": {"guided_regex": "a+"}}, ("at most one output constraint",), "guided_regex"),
    ({"tools": TOOLS, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "nope"}}}}, ("cannot be compiled into a grammar",), "response_format"),
])
def test_bad_tool_fields_are_400_naming_the_field(server, client, kwargs, mentions, param) -> None:
    _bad(lambda: _chat(server, client, **kwargs), *mentions, param=param)


CALL = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 1, \"b\": 2}"}}


@pytest.mark.parametrize("messages, mentions, param", [
    ([{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_9", "content": "3"}],
     ("matches no tool call",), "messages[1].tool_call_id"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [CALL]},
      {"role": "tool", "tool_call_id": "call_2", "content": "3"}], ("matches no tool call",),
     "messages[2].tool_call_id"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "content": "3"}],
     ("field required",), "messages[2].tool_call_id"),
    ([{"role": "user", "content": "hi"},
      {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "add", "arguments": "{oops"}}]}],
     ("the JSON text of an object",), "messages[1].tool_calls[0].function.arguments"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}],
     ("field required",), "messages[1].tool_calls[0].function"),
    ([{"role": "user", "content": "hi", "tool_calls": [CALL]}], ("only assistant",), "messages[0].tool_calls"),
    ([{"role": "function", "name": "add", "content": "3"}], ("\"tool\"",), "messages[0].role"),
])
def test_bad_tool_history_is_400_naming_the_field(server, client, messages, mentions, param) -> None:
    _bad(lambda: _chat(server, client, messages=messages, tools=TOOLS), *mentions, param=param)


# -- structured outputs ----------------------------------------------------------------------------------------

class Forecast(BaseModel):
    model_config = ConfigDict(extra="forbid")  # else the schema allows more keys, and the random model adds some

    city: Literal["Paris", "Tokyo"]
    sunny: bool
    days: Literal[1, 2, 3]


def test_chat_completions_parse_returns_the_pydantic_object(server, client) -> None:
    with no_errors_logged("promptstash"):
        response = client.chat.completions.parse(model=server.state.model_name, messages=MESSAGES,
                                                 response_format=Forecast, max_tokens=300, temperature=0)
    parsed = response.choices[0].message.parsed
    assert isinstance(parsed, Forecast), response
    assert response.choices[0].finish_reason == "stop"


def test_json_schema_and_json_object_outputs_parse(server, client) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    response = _chat(server, client, response_format={"type": "json_schema", "json_schema": {
        "name": "answer", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(response.choices[0].message.content), schema)
    response = _chat(server, client, extra_body={"guided_json": schema})
    jsonschema.validate(json.loads(response.choices[0].message.content), schema)
    loose = _chat(server, client, response_format={"type": "json_object"}, max_tokens=200)
    text = loose.choices[0].message.content
    assert text.lstrip().startswith("{")
    if loose.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_guided_regex_and_choice(server, client) -> None:
    digits = _chat(server, client, extra_body={"guided_regex": "[0-9]{3}-[a-c]{2}"}).choices[0].message.content
    assert re.fullmatch("[0-9]{3}-[a-c]{2}", digits), digits
    picked = _chat(server, client, n=3, temperature=1.0, seed=4, extra_body={"guided_choice": ["yes", "no", "maybe"]})
    assert all(c.message.content in ("yes", "no", "maybe") for c in picked.choices)
    text = client.completions.create(model=server.state.model_name, prompt="Answer:", max_tokens=20, temperature=0,
                                     extra_body={"guided_regex": "(left|right)!"})
    assert text.choices[0].text in ("left!", "right!")


def test_streamed_structured_output_equals_the_unstreamed_one(server, client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "f", "schema": Forecast.model_json_schema()}}
    whole = _chat(server, client, response_format=fmt).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in _chat(server, client, response_format=fmt, stream=True)
                       if c.choices)
    assert streamed == whole
    Forecast.model_validate_json(whole)


@pytest.mark.parametrize("kwargs, mentions, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     ("cannot be compiled into a grammar",), "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}},
     ("field required",), "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema"}}, ("field required",), "response_format.json_schema"),
    ({"response_format": {"type": "xml"}}, ("'json_schema'",), "response_format.type"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a+"}},
     ("at most one output constraint",), "guided_regex"),
    ({"extra_body": {"guided_json": "{not json"}}, ("not valid JSON",), "guided_json"),
    ({"extra_body": {"guided_json": 5}}, ("schema object",), "guided_json"),
    ({"extra_body": {"guided_regex": "(unclosed"}}, ("cannot be compiled into a grammar",), "guided_regex"),
    ({"extra_body": {"guided_choice": []}}, ("non-empty",), "guided_choice"),
    ({"extra_body": {"guided_choice": ["a", 1]}}, ("non-empty strings",), "guided_choice"),
    ({"extra_body": {"guided_regex": 5}}, ("string",), "guided_regex"),
])
def test_bad_structured_output_fields_are_400_naming_the_field(server, client, kwargs, mentions, param) -> None:
    _bad(lambda: _chat(server, client, **kwargs), *mentions, param=param)


def test_completions_reject_response_format_json(server, client) -> None:
    _bad(lambda: client.completions.create(model=server.state.model_name, prompt="x", max_tokens=2,
                                           extra_body={"response_format": {"type": "json_object"}}),
         "guided_json", param="response_format")
