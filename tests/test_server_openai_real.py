"""The OpenAI routes on the real default model, through the official openai SDK: n = 4 computes the prompt once,
chat.completions.parse returns the pydantic object, a 3-step agent loop reads more from the cache at every step,
and with a schema or tools the greedy output is the same with caching on and off."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, ConfigDict
from real_model_helpers import engines
from server_helpers import LiveServer

from promptstash.config import ServerConfig

pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.timeout(600)]

WEATHER = {"type": "object", "properties": {"city": {"type": "string"},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
                                           "parameters": WEATHER, "strict": True}},
         {"type": "function", "function": {"name": "get_time", "description": "Local time in a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"], "additionalProperties": False}}}]


class Review(BaseModel):
    model_config = ConfigDict(extra="forbid")

    language: Literal["python", "rust", "go"]
    has_bug: bool


@pytest.fixture(scope="module")
def served():
    on, off = engines("float32")
    with LiveServer(on, ServerConfig(min_cacheable_tokens=1024)) as srv, LiveServer(off) as ref:
        yield srv, ref


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=300)


def test_n4_computes_the_prompt_once(served) -> None:
    srv, _ = served
    engine = srv.engine
    messages = [{"role": "system", "content": "You are a poet. " + "Write short, vivid lines. " * 20},
                {"role": "user", "content": "One line about the sea."}]
    before = engine.stats().num_computed_prompt_tokens
    response = _client(srv).chat.completions.create(model=srv.state.model_name, messages=messages, n=4, max_tokens=8,
                                                    temperature=0.9, seed=1, extra_body={"cache_salt": "n4"})
    computed = engine.stats().num_computed_prompt_tokens - before
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.usage.prompt_tokens_details.cached_tokens == 0
    assert computed == response.usage.prompt_tokens  # once, not four times
    assert 4 <= response.usage.completion_tokens <= 4 * 8  # every sample's output tokens
    assert len({c.message.content for c in response.choices}) > 1  # the samples are sampled separately


def test_chat_completions_parse_returns_a_review(served) -> None:
    srv, _ = served
    response = _client(srv).chat.completions.parse(
        model=srv.state.model_name, response_format=Review, max_tokens=40, temperature=0,
        messages=[{"role": "user", "content": "Review this code and answer in JSON with the language and whether it "
                                              "has a bug:\n\ndef add(a, b):\n    return a - b\n"}])
    parsed = response.choices[0].message.parsed
    assert isinstance(parsed, Review)
    assert parsed.language == "python"


def test_three_step_agent_loop_reads_more_from_the_cache_each_step(served) -> None:
    srv, _ = served
    client = _client(srv)
    messages = [{"role": "system", "content": "You are a travel assistant. Use the tools to answer."},
                {"role": "user", "content": "What is the weather and the local time in Paris, then in Tokyo?"}]
    cached = []
    for step in range(3):
        response = client.chat.completions.create(model=srv.state.model_name, messages=messages, tools=TOOLS,
                                                  tool_choice="required", parallel_tool_calls=False, max_tokens=60,
                                                  temperature=0, extra_body={"cache_salt": "agent-loop"})
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        call = choice.message.tool_calls[0]
        schema = WEATHER if call.function.name == "get_weather" else TOOLS[1]["function"]["parameters"]
        jsonschema.validate(json.loads(call.function.arguments), schema)
        cached.append(response.usage.prompt_tokens_details.cached_tokens)
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]})
        messages.append({"role": "tool", "tool_call_id": call.id, "content": f"result {step}: sunny, 21 C, 14:05"})
    assert cached[0] < cached[1] < cached[2], cached
    assert cached[2] >= 0.8 * response.usage.prompt_tokens


@pytest.mark.parametrize("kind", ["schema", "tools"])
def test_greedy_output_is_identical_with_caching_on_and_off(served, kind) -> None:
    srv, ref = served
    messages = [{"role": "system", "content": "You answer briefly. " + "Be precise and factual. " * 10},
                {"role": "user", "content": "What is the weather in Lima?"}]
    if kind == "schema":
        extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}}}
    else:
        extra = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}
    kwargs = dict(messages=messages, max_tokens=40, temperature=0, extra_body={"cache_salt": f"exact-{kind}"}, **extra)
    outputs = []
    for server in (srv, srv, ref):  # caching on: a miss, then a hit; then caching off
        r = _client(server).chat.completions.create(model=server.state.model_name, **kwargs)
        message = r.choices[0].message
        calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or ()]
        reason, cached = r.choices[0].finish_reason, r.usage.prompt_tokens_details.cached_tokens
        outputs.append((message.content, calls, reason, cached))
    (miss, hit, off) = outputs
    assert hit[3] > 0 and off[3] == 0
    assert miss[:3] == hit[:3] == off[:3]
    if kind == "schema":
        jsonschema.validate(json.loads(hit[0]), WEATHER)
    else:
        assert hit[1] and hit[2] == "tool_calls"


def test_a_generated_call_is_cached_through_in_the_next_step(served) -> None:
    """Constrained JSON has tojson's layout, so the call renders back to the tokens the model generated: step 2
    reads step 1's prompt and its generated call (up to the last full block) from the cache."""
    srv, _ = served
    client = _client(srv)
    messages = [{"role": "system", "content": "You are a travel assistant. Use the tools to answer."},
                {"role": "user", "content": "What is the weather in Lima?"}]
    kwargs = dict(model=srv.state.model_name, tools=TOOLS, max_tokens=60, temperature=0,
                  extra_body={"cache_salt": "render-back"})
    first = client.chat.completions.create(messages=messages, tool_choice="required", **kwargs)
    (call,) = first.choices[0].message.tool_calls  # one call: parallel calls are off by default
    assert first.choices[0].finish_reason == "tool_calls"
    messages += [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    second = client.chat.completions.create(messages=messages, **kwargs)
    block = srv.engine.config.block_size
    with_kv = first.usage.prompt_tokens + first.usage.completion_tokens - 1  # the last sampled token has no K/V
    assert second.usage.prompt_tokens_details.cached_tokens >= with_kv // block * block > first.usage.prompt_tokens


def test_tool_choice_auto_gets_a_call(served) -> None:
    """The model answers "auto" with a bare (here fenced) {"name", "arguments"} object, not a tagged call: the
    grammar holds it to a valid call and the parser takes it, streamed or not."""
    srv, _ = served
    client = _client(srv)
    kwargs = dict(model=srv.state.model_name, tools=TOOLS, max_tokens=60, temperature=0,
                  messages=[{"role": "user", "content": "What is the weather in Lima?"}])
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    arguments, names, reasons = "", [], []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            assert not c.delta.content
            for delta in c.delta.tool_calls or ():
                names += [delta.function.name] if delta.function.name else []
                arguments += delta.function.arguments or ""
            reasons += [c.finish_reason] if c.finish_reason else []
    assert names == ["get_weather"] and arguments == call.function.arguments and reasons == ["tool_calls"]
