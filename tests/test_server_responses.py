"""POST /v1/responses, GET / DELETE /v1/responses/{id} on a live server (tiny random-weight chat model), through
the official openai SDK: string and item input, instructions, function tools and function_call_output
follow-ups, text.format json_schema, the streaming event sequence (raw and the SDK's stream helper), stored
conversations with previous_response_id hitting the prefix cache, tenant isolation and bad input."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel
from server_helpers import FakeClock, LiveServer, tiny_chat_engine, twin_engine

from promptstash.config import ServerConfig
from promptstash.prompts import ChatMessage, TextBlock
from promptstash.server.response_store import ResponseStore
from promptstash.tools import ToolCall

MODEL = "tiny-chat"
INSTRUCTIONS = "You are a terse assistant for ACME. " * 12  # several 16-token blocks: a cacheable prefix
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                           "unit": {"type": "string", "enum": ["c", "f"]}},
                          "required": ["city", "unit"], "additionalProperties": False},
           "strict": True}
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 12},
                                                  "score": {"type": "integer", "minimum": 0, "maximum": 5}},
                 "required": ["answer", "score"], "additionalProperties": False}
KEYS = {"key-alpha": "alpha", "key-beta": "beta"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LiveServer(tiny_chat_engine(tmp_path_factory.mktemp("responses"))) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _messages(*pairs: tuple[str, str]) -> list[ChatMessage]:
    return [ChatMessage(role, (TextBlock(text),)) for role, text in pairs]


def _create(client: openai.OpenAI, cache_salt: str | None = None, **kwargs: Any):
    kwargs.setdefault("max_output_tokens", 8)
    kwargs.setdefault("temperature", 0)
    if cache_salt is not None:
        kwargs["extra_body"] = {"cache_salt": cache_salt}
    return client.responses.create(model=MODEL, **kwargs)


def test_string_input_gives_the_engines_own_greedy_output_and_usage(server, client) -> None:
    r = _create(client, input="Say hello.", store=False)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL
    assert r.status in ("completed", "incomplete")
    assert r.output[0].type == "message" and r.output[0].role == "assistant" and r.output[0].id.startswith("msg_")
    assert r.output[0].content[0].type == "output_text" and r.output[0].content[0].annotations == []
    prompt = server.engine.render(_messages(("user", "Say hello."))).token_ids
    ref = twin_engine(server.engine).generate(prompt, max_tokens=8)
    assert r.output_text == ref.text
    assert r.usage.input_tokens == len(prompt) and r.usage.output_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    if ref.finish_reason == "length":
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.store is False and r.tools == [] and r.tool_choice == "none" and r.parallel_tool_calls is False
    assert r.text.format.type == "text" and r.temperature == 0


def test_items_and_instructions_render_as_the_chat_template_does(server, client) -> None:
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Question one?"}]},
             {"type": "message", "role": "assistant", "id": "msg_x", "status": "completed",
              "content": [{"type": "output_text", "text": "Answer one.", "annotations": []}]},
             {"role": "developer", "content": "Prefer short answers."},
             {"type": "message", "role": "user", "content": "Question two?"}]
    r = _create(client, input=items, instructions="Be brief.")
    expected = _messages(("system", "Be brief."), ("user", "Question one?"), ("assistant", "Answer one."),
                         ("system", "Prefer short answers."), ("user", "Question two?"))
    prompt = server.engine.render(expected).token_ids
    assert r.usage.input_tokens == len(prompt)
    assert r.output_text == twin_engine(server.engine).generate(prompt, max_tokens=8).text
    assert r.instructions == "Be brief."


def test_previous_response_id_renders_the_stored_conversation_and_hits_the_cache(server, client) -> None:
    first = _create(client, input="What is ACME?", instructions=INSTRUCTIONS)
    second = _create(client, input="And its motto?", instructions=INSTRUCTIONS, previous_response_id=first.id)
    expected = _messages(("system", INSTRUCTIONS), ("user", "What is ACME?"), ("assistant", first.output_text),
                         ("user", "And its motto?"))
    assert second.usage.input_tokens == len(server.engine.render(expected).token_ids)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 16 > 0
    # a third turn extends the second
    third = _create(client, input="Thanks.", instructions=INSTRUCTIONS, previous_response_id=second.id)
    assert third.usage.input_tokens_details.cached_tokens >= second.usage.input_tokens - 16


def test_cache_salt_isolates_the_cache(client) -> None:
    prompt = "Salted prompt. " + INSTRUCTIONS
    first = _create(client, input=prompt, cache_salt="a")
    assert _create(client, input=prompt, cache_salt="b").usage.input_tokens_details.cached_tokens == 0
    assert _create(client, input=prompt, cache_salt="a").usage.input_tokens_details.cached_tokens >= (
        first.usage.input_tokens - 16)


def test_retrieve_and_delete(client) -> None:
    r = _create(client, input="Remember me.", metadata={"run": "7"})
    got = client.responses.retrieve(r.id)
    assert got.model_dump() == r.model_dump() and got.metadata == {"run": "7"}
    deleted = client.responses.with_raw_response.delete(r.id)
    assert deleted.status_code == 200 and deleted.http_response.json() == {"id": r.id, "object": "response",
                                                                          "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError) as err:
        _create(client, input="again", previous_response_id=r.id)
    assert err.value.body["param"] == "previous_response_id"
    unstored = _create(client, input="Forget me.", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def _event_types(events: list[Any]) -> list[str]:
    return [e.type for e in events]


def test_stream_event_sequence_matches_the_unstreamed_response(client) -> None:
    plain = _create(client, input="Stream this.", store=False)
    events = list(_create(client, input="Stream this.", stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = _event_types(events)
    final = "response.completed" if plain.status == "completed" else "response.incomplete"
    num_deltas = types.count("response.output_text.delta")
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * num_deltas,
                     "response.output_text.done", "response.content_part.done", "response.output_item.done", final]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == plain.output_text == events[-4].text
    done = events[-1].response
    assert done.output_text == plain.output_text and done.status == plain.status
    assert done.usage.input_tokens == plain.usage.input_tokens
    assert events[0].response.status == "in_progress" and events[0].response.id == done.id


class Verdict(BaseModel):
    ok: bool


def test_sdk_stream_helper_and_parse_with_a_pydantic_text_format(client) -> None:
    """The SDK's helpers: responses.stream() accumulates the events into the final response, and text_format=
    (a pydantic model, sent as a strict json_schema) parses output_text into it."""
    kwargs = {"model": MODEL, "input": "Is it ok?", "max_output_tokens": 300, "temperature": 0,
              "text_format": Verdict}
    with client.responses.stream(**kwargs) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == "".join(deltas)
    assert isinstance(final.output_parsed, Verdict)
    parsed = client.responses.parse(**kwargs)
    assert parsed.output_parsed == final.output_parsed and parsed.output_text == final.output_text


def test_function_tool_required_gives_a_call_whose_arguments_fit_the_schema(server, client) -> None:
    r = _create(client, input="Weather in Paris?", tools=[WEATHER], tool_choice="required", max_output_tokens=500)
    calls = [item for item in r.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id and calls[0].id.startswith("fc_")
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    assert r.tool_choice == "required" and r.tools[0].name == "get_weather"
    # the tool's result, as a follow-up: only the new item is sent, and the earlier prompt is reused
    follow = _create(client, previous_response_id=r.id, tools=[WEATHER], tool_choice="none",
                     input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "21 C, sunny"}])
    assert follow.usage.input_tokens_details.cached_tokens > 0
    assert all(item.type == "message" for item in follow.output)
    # the same conversation sent as items, without previous_response_id
    items = [{"role": "user", "content": "Weather in Paris?"},
             {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
              "arguments": calls[0].arguments},
             {"type": "function_call_output", "call_id": calls[0].call_id, "output": "21 C, sunny"}]
    again = _create(client, input=items, tools=[WEATHER], tool_choice="none")
    assert again.usage.input_tokens > 0


def test_named_tool_choice_and_streamed_call(client) -> None:
    lookup = {"type": "function", "name": "lookup", "parameters": {
        "type": "object", "properties": {"q": {"type": "string", "maxLength": 8}}, "required": ["q"],
        "additionalProperties": False}}
    events = list(_create(client, input="Look it up.", tools=[WEATHER, lookup], stream=True,
                          tool_choice={"type": "function", "name": "lookup"}, max_output_tokens=500))
    types = _event_types(events)
    assert "response.function_call_arguments.delta" in types and "response.function_call_arguments.done" in types
    done = events[-1].response
    calls = [item for item in done.output if item.type == "function_call"]
    assert calls and all(c.name == "lookup" for c in calls)
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta"
                   and e.item_id == calls[0].id)
    assert args == calls[0].arguments
    jsonschema.validate(json.loads(args), lookup["parameters"])
    with client.responses.stream(model=MODEL, input="Look it up.", tools=[WEATHER, lookup], temperature=0,
                                 tool_choice={"type": "function", "name": "lookup"}, parallel_tool_calls=False,
                                 max_output_tokens=500) as stream:
        final = stream.get_final_response()  # the SDK's accumulator accepts the event sequence
    (call,) = [item for item in final.output if item.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), lookup["parameters"])


def test_text_format_json_schema_output_parses(client) -> None:
    r = _create(client, input="Rate this.", max_output_tokens=600,
                text={"format": {"type": "json_schema", "name": "rating", "schema": ANSWER_SCHEMA, "strict": True}})
    assert r.status == "completed"  # the grammar ends the output (JSON whitespace is bounded)
    jsonschema.validate(json.loads(r.output_text), ANSWER_SCHEMA)
    assert r.text.format.type == "json_schema" and r.text.format.name == "rating"


def test_tools_with_a_text_format(client) -> None:
    """openai-agents sends tools and a json_schema text.format for an agent with an output_type: tool_choice auto
    gives function calls or JSON text in the format (streamed alike); required forces a call. Parallel calls are
    off unless asked for, and the response says which."""
    text = {"format": {"type": "json_schema", "name": "final_output", "schema": ANSWER_SCHEMA, "strict": True}}
    kinds = set()
    for seed in (0, 18, *range(1, 40)):  # the random model calls at seed 0 and answers in the format at seed 18
        if kinds == {"call", "text"}:
            break
        kwargs: dict[str, Any] = dict(input="Weather?", tools=[WEATHER], temperature=1.0, max_output_tokens=300,
                                      text=text, extra_body={"seed": seed})
        r = _create(client, **kwargs)
        assert r.status == "completed" and r.parallel_tool_calls is False
        calls = [item for item in r.output if item.type == "function_call"]
        if calls:
            (call,) = calls
            jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
            kinds.add("call")
        else:
            jsonschema.validate(json.loads(r.output_text), ANSWER_SCHEMA)
            kinds.add("text")
        final = list(client.responses.create(model=MODEL, stream=True, **kwargs))[-1].response
        assert [(i.type, getattr(i, "name", None), getattr(i, "arguments", None)) for i in final.output] == \
            [(i.type, getattr(i, "name", None), getattr(i, "arguments", None)) for i in r.output]
        assert final.output_text == r.output_text
    assert kinds == {"call", "text"}
    forced = _create(client, input="Weather?", tools=[WEATHER], tool_choice="required", text=text,
                     max_output_tokens=300, parallel_tool_calls=True)
    assert forced.parallel_tool_calls is True
    calls = [item for item in forced.output if item.type == "function_call"]
    assert calls and all(item.type == "function_call" for item in forced.output)
    keys = [json.loads(c.arguments) for c in calls]
    assert all(keys.count(k) == 1 for k in keys)  # a repeated call ends the output and is dropped


BAD = [
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name"),
    ({"input": "x", "tools": [WEATHER, WEATHER]}, "tools[1].name"),
    ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "tool_choice": {"type": "web_search_preview"}}, "tool_choice.type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"type": "function_call_output", "call_id": "call_zz", "output": "1"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]}, "input[0].arguments"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": []}, "input"),
    ({"input": 3}, "input"),
    ({}, "input"),
    ({"input": "x", "reasoning": {"effort": "low", "summary": "auto"}}, "reasoning.summary"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "truncation": "auto"}, "truncation"),
    ({"input": "x", "include": ["message.output_text.logprobs"]}, "include[0]"),
    ({"input": "x", "top_logprobs": 3}, "top_logprobs"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "s"}}}, "text.format.schema"),
    ({"input": "x", "text": {"format": {"type": "grammar"}}}, "text.format.type"),
    ({"input": "x", "text": {"verbosity": "low"}}, "text.verbosity"),
    ({"input": "x", "metadata": {"k": 1}}, "metadata.k"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "temperature": 3}, "temperature"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
    ({"input": "x", "tools": [WEATHER], "text": {"format": {"type": "json_schema", "name": "s", "schema": {
        "type": "object", "properties": {"a": {"type": "nope"}}}}}}, "text.format"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "nonsense"}}}},
     "text.format"),
    ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"type": 5}}]}, "tools"),
    ({"input": "x", "prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"input": "x", "stream_options": {"include_obfuscation": -3.3e-71}}, "stream_options.include_obfuscation"),
]


@pytest.mark.parametrize("extra,param", BAD, ids=[p for _, p in BAD])
def test_bad_input_is_a_400_naming_the_field(server, extra, param) -> None:
    response = httpx.post(server.url + "/v1/responses", json={"model": MODEL, **extra}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert param.split("[")[0].split(".")[0] in error["message"]


def test_unknown_model_and_unknown_ids_are_404s(server) -> None:
    response = httpx.post(server.url + "/v1/responses", json={"model": "gpt-9", "input": "x"}, timeout=30)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    for method in ("GET", "DELETE"):
        response = httpx.request(method, server.url + "/v1/responses/resp_nope", timeout=30)
        assert response.status_code == 404 and "not found" in response.json()["error"]["message"]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    with LiveServer(tiny_chat_engine(tmp_path_factory.mktemp("responses-keys")), ServerConfig(api_keys=KEYS)) as srv:
        yield srv


def test_tenants_never_see_each_others_responses(keyed) -> None:
    alpha = openai.OpenAI(base_url=keyed.url + "/v1", api_key="key-alpha", max_retries=0, timeout=60)
    beta = openai.OpenAI(base_url=keyed.url + "/v1", api_key="key-beta", max_retries=0, timeout=60)
    secret = "alpha's secret plan " * 8
    r = _create(alpha, input=secret)
    for attempt in (lambda: beta.responses.retrieve(r.id), lambda: beta.responses.delete(r.id),
                    lambda: _create(beta, input="go on", previous_response_id=r.id)):
        with pytest.raises(openai.NotFoundError) as err:
            attempt()
        assert "secret" not in json.dumps(err.value.body)
    assert alpha.responses.retrieve(r.id).id == r.id  # still there for its owner
    follow = _create(alpha, input="go on", previous_response_id=r.id)
    assert follow.usage.input_tokens_details.cached_tokens > 0
    again = _create(beta, input=secret)  # the same prompt in another tenant: no reuse across tenants
    assert again.usage.input_tokens_details.cached_tokens == 0
    assert httpx.post(keyed.url + "/v1/responses", json={"model": MODEL, "input": "x"}, timeout=30).status_code == 401


def test_store_is_bounded_in_count_and_age() -> None:
    clock = FakeClock()
    store = ResponseStore(max_entries=3, max_age_s=60, clock=clock)
    history = (ChatMessage("assistant", (TextBlock(""),), tool_calls=(ToolCall("call_1", "f", "{}"),)),)
    for i in range(4):
        store.put("t", f"resp_{i}", {"id": f"resp_{i}"}, history)
        clock.advance(10)
    assert store.get("t", "resp_0") is None and len(store) == 3  # the oldest went first
    assert store.get("u", "resp_1") is None and not store.delete("u", "resp_1")  # another tenant: unknown
    assert store.get("t", "resp_1").messages == history
    clock.advance(31)  # resp_1 is now 61 s old; resp_2 51 s
    assert store.get("t", "resp_1") is None and store.get("t", "resp_2") is not None
    clock.advance(100)
    assert len(store) == 0


# -- fuzzing the documented schema (tests/test_schemathesis.py's rules, for these operations) ------------------

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

FUZZ_MAX_TOKENS = 4
# a schema-valid request may still get a 400 for a rule JSON Schema cannot state; these are the messages
FUZZ_RULES = ("context window", "no tool named", "matches no tool call", "needs tools", "at most one output constraint",
              "cannot be compiled into a grammar", "two tools are named", "JSON text of an object")
FUZZ_OPERATIONS = [("POST", "/v1/responses"), ("GET", "/v1/responses/{response_id}"),
                   ("DELETE", "/v1/responses/{response_id}")]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    engine = tiny_chat_engine(tmp_path_factory.mktemp("responses-fuzz"))
    with LiveServer(engine, ServerConfig(default_max_tokens=FUZZ_MAX_TOKENS)) as srv:
        stored = httpx.post(srv.url + "/v1/responses", timeout=30,
                            json={"model": MODEL, "input": "stored", "max_output_tokens": 2}).json()["id"]
        schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
        schema.config.output.sanitization.update(enabled=False)
        yield srv, schema, stored


def _last_event(content: bytes) -> str | None:
    events = [line[7:].strip() for line in content.decode(errors="replace").splitlines() if line.startswith("event: ")]
    return events[-1] if events else None


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
@pytest.mark.parametrize("method,path", FUZZ_OPERATIONS, ids=[f"{m} {p}" for m, p in FUZZ_OPERATIONS])
def test_fuzz_responses_from_the_document(fuzzed, method, path, mode) -> None:
    """Schema-valid requests get a 2xx (or a 400 for a rule above, a 404 for an unknown id); schema-invalid ones a
    4xx; never a 5xx; every answer fits the documented responses; every stream ends with its final event."""
    srv, schema, stored = fuzzed
    if mode is GenerationMode.NEGATIVE and method != "POST":
        pytest.skip("any string is a valid path segment: nothing schema-invalid to send")
    statuses: dict[int, int] = {}

    @settings(max_examples=40, derandomize=True, database=None, deadline=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(case=schema[path][method].as_strategy(generation_mode=mode))
    def run(case) -> None:
        body = case.body
        if isinstance(body, dict):
            value = body.get("max_output_tokens")
            if isinstance(value, int) and not isinstance(value, bool) and FUZZ_MAX_TOKENS < value <= 1 << 20:
                body["max_output_tokens"] = FUZZ_MAX_TOKENS
            if isinstance(body.get("previous_response_id"), str):
                body["previous_response_id"] = stored  # a random id names nothing (404): no schema can say so
        response = case.call(base_url=srv.url, timeout=20)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        where = case.as_curl_command()
        assert response.status_code < 500, f"{response.status_code} {response.text[:300]}: {where}"
        case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                 content_type_conformance, response_schema_conformance,
                                                 negative_data_rejection])
        if mode is GenerationMode.POSITIVE:
            ok = 200 <= response.status_code < 300 or (response.status_code == 404 and method != "POST")
            ok = ok or (response.status_code == 400 and any(r in response.text for r in FUZZ_RULES))
            assert ok, f"schema-valid request rejected: {response.status_code} {response.text[:300]}: {where}"
        if response.status_code == 200 and "text/event-stream" in response.headers.get("content-type", ""):
            assert _last_event(response.content) in ("response.completed", "response.incomplete"), where

    run()
    assert statuses
    if mode is GenerationMode.POSITIVE and method == "POST":
        # NOTE: a third, not a half: hypothesis draws differ between checkouts (seen: 19 of 40 answered 200; the
        # rest broke rules JSON Schema cannot state, a correct 400)
        assert statuses.get(200, 0) >= sum(statuses.values()) // 3, statuses
