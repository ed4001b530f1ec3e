"""Anthropic tools, structured output and prefill on the real default model, through the anthropic SDK: forced
tool calls validate against their schema (streamed too), and greedy output with caching on (a cache hit on the
tool definitions) equals the engine's with caching off."""

from __future__ import annotations

import json

import anthropic
import jsonschema
import pytest
from real_model_helpers import engines
from server_helpers import LiveServer

from promptstash.config import ServerConfig
from promptstash.engine.grammar import GrammarSpec
from promptstash.prompts import ChatMessage, TextBlock
from promptstash.tools import ToolDef, parse_tool_calls

pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.timeout(300)]

WEATHER = {"name": "get_weather", "description": "Get the current weather in a given city.",
           "input_schema": {"type": "object", "properties": {
               "city": {"type": "string", "description": "The city, e.g. Paris"},
               "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
               "required": ["city", "unit"], "additionalProperties": False}}
TIME = {"name": "get_time", "description": "Get the current local time in a given city.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
QUESTION = "What is the weather in Paris right now, in celsius?"
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def served():
    on, off = engines("float32")
    with LiveServer(on, ServerConfig(min_cacheable_tokens=64)) as srv:
        yield srv, off


def client_of(srv) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.url, api_key="none", max_retries=0, timeout=240)


def reference(off, question: str, tool_choice: tuple[str, str | None]) -> str:
    """The caching-off engine's greedy output for the same prompt and grammar."""
    tools = [ToolDef(t["name"], t["description"], t["input_schema"]) for t in (WEATHER, TIME)]
    prompt = off.render([ChatMessage("user", (TextBlock(question),))], tools=tools)
    spec = GrammarSpec.tool_calls(tools, tool_choice[0], tool_choice[1], parallel=False)
    return off.generate(prompt.token_ids, max_tokens=48, grammar=spec).text


def test_forced_tool_call_validates_and_equals_caching_off(served) -> None:
    srv, off = served
    client = client_of(srv)
    tools = [{**WEATHER, "cache_control": {"type": "ephemeral", "ttl": "1h"}}, TIME]
    # a salt of its own: other modules share this engine, and may have cached the same tool definitions
    kw = {"model": srv.state.model_name, "max_tokens": 48, "tools": tools,
          "extra_body": {**GREEDY, "cache_salt": "forced-tool-call"},
          "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}}
    first = client.messages.create(messages=[{"role": "user", "content": QUESTION}], **kw)
    [use] = first.content
    assert use.type == "tool_use" and use.name == "get_weather" and first.stop_reason == "tool_use"
    jsonschema.validate(use.input, WEATHER["input_schema"])
    assert use.input["city"] == "Paris" and use.input["unit"] == "celsius"
    assert first.usage.cache_creation_input_tokens > 100  # the tool definitions, up to the 1h breakpoint

    question = "And what is the weather in Rome, in fahrenheit?"
    second = client.messages.create(messages=[{"role": "user", "content": question}], **kw)
    assert second.usage.cache_read_input_tokens >= first.usage.cache_creation_input_tokens - 16
    _, calls = parse_tool_calls(reference(off, question, ("named", "get_weather")))  # the cache hit's output
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [(second.content[0].name, second.content[0].input)]


def test_streamed_tool_call_equals_the_unstreamed_one(served) -> None:
    srv, off = served
    client = client_of(srv)
    kw = {"model": srv.state.model_name, "max_tokens": 48, "tools": [WEATHER, TIME], "extra_body": GREEDY,
          "messages": [{"role": "user", "content": QUESTION}],
          "tool_choice": {"type": "any", "disable_parallel_tool_use": True}}
    events = list(client.messages.create(stream=True, **kw))
    starts = [e for e in events if e.type == "content_block_start"]
    assert [s.content_block.type for s in starts] == ["tool_use"] and starts[0].index == 0
    partial = "".join(e.delta.partial_json for e in events if e.type == "content_block_delta")
    arguments = json.loads(partial)
    jsonschema.validate(arguments, WEATHER["input_schema"] if starts[0].content_block.name == "get_weather"
                        else TIME["input_schema"])
    assert events[-2].delta.stop_reason == "tool_use"
    plain = client.messages.create(**kw)
    assert (plain.content[0].name, plain.content[0].input) == (starts[0].content_block.name, arguments)
    _, calls = parse_tool_calls(reference(off, QUESTION, ("required", None)))
    assert calls[0].arguments == partial  # argument deltas are the model's text, exactly


def test_output_config_json_schema_and_prefill_on_the_real_model(served) -> None:
    srv, off = served
    client = client_of(srv)
    schema = {"type": "object", "properties": {"capital": {"type": "string"}, "population_millions": {
        "type": "integer", "minimum": 0, "maximum": 100}}, "required": ["capital", "population_millions"],
        "additionalProperties": False}
    message = client.messages.create(
        model=srv.state.model_name, max_tokens=48, messages=[{"role": "user", "content": "The capital of France?"}],
        output_config={"format": {"type": "json_schema", "schema": schema}}, extra_body=GREEDY)
    value = json.loads(message.content[0].text)
    jsonschema.validate(value, schema)
    assert value["capital"] == "Paris"

    messages = [{"role": "user", "content": "Write a Python function that adds two numbers."},
                {"role": "assistant", "content": "def add("}]
    continued = client.messages.create(model=srv.state.model_name, max_tokens=8, messages=messages,
                                       extra_body=GREEDY)
    prompt = off.render([ChatMessage("user", (TextBlock(messages[0]["content"]),)),
                         ChatMessage("assistant", (TextBlock("def add("),))], continue_final=True)
    assert continued.content[0].text == off.generate(prompt.token_ids, max_tokens=8).text
    assert not continued.content[0].text.startswith("def add(")
