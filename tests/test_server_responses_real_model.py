"""POST /v1/responses on the real default model through the openai SDK: a two-turn conversation by
previous_response_id whose second turn reuses the first turn's prompt from the cache (and gives the same output as
the engine with caching off), and a function tool call whose arguments fit the tool's schema, answered by a
function_call_output follow-up."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from real_model_helpers import SYSTEM, engines
from server_helpers import LiveServer

from promptstash.engine.grammar import GrammarSpec
from promptstash.prompts import ChatMessage, TextBlock
from promptstash.tools import ToolCall, ToolDef, parse_tool_calls

pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.timeout(300)]

WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                          "required": ["city"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def served():
    on, off = engines("float32")
    with LiveServer(on) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=300)
        yield srv, off, client


def test_second_turn_by_previous_response_id_hits_the_cache_and_equals_caching_off(served) -> None:
    srv, off, client = served
    instructions = "Responses session. " + SYSTEM[:1500]
    first = client.responses.create(model=srv.state.model_name, instructions=instructions, temperature=0,
                                    input="Which rule covers module number 3?", max_output_tokens=12)
    second = client.responses.create(model=srv.state.model_name, instructions=instructions, temperature=0,
                                     input="And module 4?", previous_response_id=first.id, max_output_tokens=12)
    assert first.usage.input_tokens > 300
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 16  # whole blocks
    messages = [ChatMessage(role, (TextBlock(text),)) for role, text in (
        ("system", instructions), ("user", "Which rule covers module number 3?"),
        ("assistant", first.output_text), ("user", "And module 4?"))]
    prompt = off.render(messages).token_ids
    assert second.usage.input_tokens == len(prompt)
    assert second.output_text == off.generate(prompt, max_tokens=12).text


def test_function_tool_call_then_its_output_equal_caching_off(served) -> None:
    """The call's arguments fit the schema; the follow-up (only the function_call_output is sent) reuses the call
    turn's prompt, and both turns give what the engine with caching off gives for the same prompt and grammar."""
    srv, off, client = served
    question = "What is the weather in Paris right now?"
    call_turn = client.responses.create(model=srv.state.model_name, input=question, tools=[WEATHER],
                                        tool_choice="required", temperature=0,
                                        max_output_tokens=48)
    calls = [item for item in call_turn.output if item.type == "function_call"]
    assert call_turn.status == "completed" and len(calls) == 1 and calls[0].name == "get_weather"
    arguments = json.loads(calls[0].arguments)
    jsonschema.validate(arguments, WEATHER["parameters"])
    assert "paris" in arguments["city"].lower()
    result = json.dumps({"city": "Paris", "celsius": 21, "sky": "sunny"})
    answer = client.responses.create(model=srv.state.model_name, previous_response_id=call_turn.id, tools=[WEATHER],
                                     temperature=0, max_output_tokens=24,
                                     input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                             "output": result}])
    assert answer.usage.input_tokens_details.cached_tokens >= call_turn.usage.input_tokens - 16

    tools = [ToolDef(WEATHER["name"], WEATHER["description"], WEATHER["parameters"])]
    call = ToolCall(calls[0].call_id, "get_weather", calls[0].arguments)
    history = [ChatMessage("user", (TextBlock(question),))]
    ref_call = off.generate(off.render(history, tools=tools).token_ids, max_tokens=48,
                            grammar=GrammarSpec.tool_calls(tools, "required", None, False))
    assert parse_tool_calls(ref_call.text)[1][0].arguments == calls[0].arguments
    history += [ChatMessage("assistant", (TextBlock(""),), tool_calls=(call,)),
                ChatMessage("tool", (TextBlock(result),), tool_call_id=call.id, name="get_weather")]
    prompt = off.render(history, tools=tools).token_ids
    assert answer.usage.input_tokens == len(prompt)
    ref = off.generate(prompt, max_tokens=24, grammar=GrammarSpec.tool_calls(tools, "auto", None, False))
    content, ref_calls = parse_tool_calls(ref.text, ["get_weather"])  # the model may answer with a bare call
    assert answer.output_text == content
    assert [c.arguments for c in ref_calls] == [i.arguments for i in answer.output if i.type == "function_call"]
