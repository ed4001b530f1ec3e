"""The usual agent frameworks, unchanged, against a live server on the real default model: openai-agents (Responses
and Chat Completions models), LangChain ChatOpenAI / ChatAnthropic (tools, structured output, token counting) and
LiteLLM. Every tool call and structured output must parse against its schema.

Kept fast: short prompts, small max_tokens, tool_choice forced where the framework allows it (constrained decoding
then guarantees a call), temperature 0.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import pytest
from real_model_helpers import engines
from server_helpers import LiveServer

from promptstash.config import ServerConfig

pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.timeout(300)]

agents = pytest.importorskip("agents", reason="openai-agents is in the `test` extra")
langchain_openai = pytest.importorskip("langchain_openai", reason="langchain-openai is in the `test` extra")
langchain_anthropic = pytest.importorskip("langchain_anthropic", reason="langchain-anthropic is in the `test` extra")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm: no network fetch of its price list
litellm = pytest.importorskip("litellm", reason="litellm is in the `test` extra")

import jsonschema  # noqa: E402  (a dependency of the frameworks above)
from langchain_core.messages import HumanMessage  # noqa: E402
from langchain_core.tools import tool as lc_tool  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


class Weather(BaseModel):
    """A weather report."""

    city: str = Field(description="the city")
    temperature_c: int = Field(description="degrees Celsius")


@lc_tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"sunny, 21 C in {city}"


@pytest.fixture(scope="module")
def served():
    on, _ = engines("default")  # what `promptstash serve` runs (no float32 exactness is compared here)
    with LiveServer(on, ServerConfig(default_max_tokens=64)) as srv:
        yield srv


@pytest.fixture(scope="module")
def name(served) -> str:
    return served.state.model_name


def fits(arguments: dict[str, Any] | str, schema: dict[str, Any]) -> dict[str, Any]:
    """The arguments (a dict or JSON text), validated against `schema`."""
    value = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(value, schema)
    return value


# -- openai-agents ----------------------------------------------------------------------------------------------

def _run_agent(served, model: Any) -> tuple[list[dict[str, Any]], Any]:
    """An Agent with a @function_tool, the call forced on the first turn (tool_use_behavior stops after the tool
    ran, so one model turn is enough); returns the tool's recorded calls and the run result."""
    from agents import Agent, ModelSettings, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    calls: list[dict[str, Any]] = []

    @function_tool
    def lookup_weather(city: str) -> str:
        """Get the current weather in a city."""
        calls.append({"city": city})
        return f"sunny in {city}"

    agent = Agent(name="weather", instructions="Answer with the weather tool.", tools=[lookup_weather],
                  model=model, tool_use_behavior="stop_on_first_tool",
                  model_settings=ModelSettings(tool_choice="required", max_tokens=48, temperature=0))
    result = asyncio.run(Runner.run(agent, "What is the weather in Paris?", max_turns=2))
    return calls, result


def _async_client(served, paths: list[str] | None = None):
    """An AsyncOpenAI client for the live server; `paths` collects the path of every request it sends."""
    import httpx
    from openai import AsyncOpenAI

    async def record(request: httpx.Request) -> None:
        if paths is not None:
            paths.append(request.url.path)

    return AsyncOpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0,
                       http_client=httpx.AsyncClient(event_hooks={"request": [record]}, timeout=120))


def test_openai_agents_function_tool_with_the_default_responses_model(served, name) -> None:
    from agents import OpenAIResponsesModel

    calls, result = _run_agent(served, OpenAIResponsesModel(model=name, openai_client=_async_client(served)))
    assert len(calls) == 1 and isinstance(calls[0]["city"], str) and calls[0]["city"]
    assert result.final_output == f"sunny in {calls[0]['city']}"
    usage = result.context_wrapper.usage
    assert usage.requests == 1 and usage.input_tokens > 0


def test_openai_agents_default_model_is_the_responses_model(served, name) -> None:
    """The Agent's default model (a model name and a default client) goes through /v1/responses."""
    from agents import set_default_openai_api, set_default_openai_client

    paths: list[str] = []
    set_default_openai_client(_async_client(served, paths), use_for_tracing=False)
    set_default_openai_api("responses")
    calls, _ = _run_agent(served, name)
    assert len(calls) == 1 and calls[0]["city"]
    assert paths == ["/v1/responses"]


def test_openai_agents_function_tool_with_the_chat_completions_model(served, name) -> None:
    from agents import OpenAIChatCompletionsModel

    model = OpenAIChatCompletionsModel(model=name, openai_client=_async_client(served))
    calls, result = _run_agent(served, model)
    assert len(calls) == 1 and calls[0]["city"]
    assert result.final_output == f"sunny in {calls[0]['city']}"


def test_openai_agents_structured_output_type(served, name) -> None:
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)
    agent = Agent(name="report", instructions="Report the weather as JSON.", output_type=Weather,
                  model=OpenAIChatCompletionsModel(model=name, openai_client=_async_client(served)),
                  model_settings=ModelSettings(max_tokens=48, temperature=0))
    result = asyncio.run(Runner.run(agent, "Paris: 21 degrees and sunny.", max_turns=1))
    assert isinstance(result.final_output, Weather)
    fits(result.final_output.model_dump(), Weather.model_json_schema())


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_openai_agents_function_tool_and_output_type(served, name, api: str) -> None:
    """An Agent with a tool and an output_type sends both (tools + a json_schema format, tool_choice auto; once a
    400): the model's first turn is a call (its bare, fenced answer on auto), the run stops at the tool. (Told the
    tool's result, this 0.5B model calls the tool again rather than answer, so the run stops there.)"""
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    calls: list[str] = []
    paths: list[str] = []

    @function_tool
    def lookup_weather(city: str) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return f"{city}: sunny, 21 degrees Celsius"

    model_class = OpenAIResponsesModel if api == "responses" else OpenAIChatCompletionsModel
    agent = Agent(name="reporter", instructions="Use the weather tool, then report the weather.",
                  tools=[lookup_weather], output_type=Weather, tool_use_behavior="stop_on_first_tool",
                  model=model_class(model=name, openai_client=_async_client(served, paths)),
                  model_settings=ModelSettings(max_tokens=64, temperature=0))
    result = asyncio.run(Runner.run(agent, "What is the weather in Paris?", max_turns=2))
    assert calls == ["Paris"] and result.final_output == "Paris: sunny, 21 degrees Celsius"
    assert paths == ["/v1/responses" if api == "responses" else "/v1/chat/completions"]


# -- LangChain ChatOpenAI ---------------------------------------------------------------------------------------

def _chat_openai(served, name: str, **options: Any):
    return langchain_openai.ChatOpenAI(base_url=served.url + "/v1", api_key="unused", model=name, max_tokens=48,
                                       temperature=0, max_retries=0, **options)


@pytest.mark.parametrize("tool_choice", ["get_weather", "any"])
def test_langchain_chat_openai_bind_tools(served, name, tool_choice: str) -> None:
    llm = _chat_openai(served, name).bind_tools([get_weather], tool_choice=tool_choice)
    message = llm.invoke("What is the weather in Paris?")
    assert len(message.tool_calls) == 1  # parallel calls are off unless asked for
    call = message.tool_calls[0]
    assert call["name"] == "get_weather" and call["id"]
    fits(call["args"], get_weather.args_schema.model_json_schema())
    assert message.usage_metadata["input_tokens"] > 0


def test_langchain_chat_openai_streamed_tool_call(served, name) -> None:
    llm = _chat_openai(served, name).bind_tools([get_weather], tool_choice="get_weather")
    chunks = list(llm.stream("What is the weather in Paris?"))
    message = chunks[0]
    for chunk in chunks[1:]:
        message = message + chunk
    assert [c["name"] for c in message.tool_calls] == ["get_weather"]
    fits(message.tool_calls[0]["args"], get_weather.args_schema.model_json_schema())


@pytest.mark.parametrize("method", ["function_calling", "json_schema", "json_mode"])
def test_langchain_chat_openai_with_structured_output(served, name, method: str) -> None:
    llm = _chat_openai(served, name).with_structured_output(Weather, method=method)
    prompt = "Paris: 21 degrees, sunny. Reply as JSON with keys city and temperature_c."
    report = llm.invoke(prompt)
    if method == "json_mode":  # json_object only promises JSON; the schema is in the prompt
        assert isinstance(report, Weather | dict)
    else:
        assert isinstance(report, Weather)
        fits(report.model_dump(), Weather.model_json_schema())


def test_langchain_chat_openai_on_the_responses_api(served, name) -> None:
    llm = _chat_openai(served, name, use_responses_api=True)
    message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(
        "What is the weather in Paris?")
    assert [c["name"] for c in message.tool_calls] == ["get_weather"]
    fits(message.tool_calls[0]["args"], get_weather.args_schema.model_json_schema())


# -- LangChain ChatAnthropic ------------------------------------------------------------------------------------

def _chat_anthropic(served, name: str):
    return langchain_anthropic.ChatAnthropic(base_url=served.url, api_key="unused", model=name, max_tokens=48,
                                             temperature=0, max_retries=0)


@pytest.mark.parametrize("tool_choice", ["get_weather", "any"])
def test_langchain_chat_anthropic_bind_tools(served, name, tool_choice: str) -> None:
    llm = _chat_anthropic(served, name).bind_tools([get_weather], tool_choice=tool_choice)
    message = llm.invoke("What is the weather in Paris?")
    assert len(message.tool_calls) == 1  # parallel calls are off unless asked for
    call = message.tool_calls[0]
    assert call["name"] == "get_weather" and call["id"]
    fits(call["args"], get_weather.args_schema.model_json_schema())
    assert message.usage_metadata["input_tokens"] > 0


def test_langchain_chat_anthropic_with_structured_output(served, name) -> None:
    report = _chat_anthropic(served, name).with_structured_output(Weather).invoke("Paris: 21 degrees, sunny.")
    assert isinstance(report, Weather)
    fits(report.model_dump(), Weather.model_json_schema())


def test_langchain_chat_anthropic_get_num_tokens_from_messages(served, name) -> None:
    llm = _chat_anthropic(served, name)
    messages = [HumanMessage("What is the weather in Paris?")]
    plain = llm.get_num_tokens_from_messages(messages)
    with_tools = llm.get_num_tokens_from_messages(messages, tools=[get_weather])
    rendered = served.engine.render([{"role": "user", "content": "What is the weather in Paris?"}])
    assert plain == len(rendered.token_ids)
    assert with_tools > plain + 20  # the tool definitions are part of the prompt


# -- LiteLLM ----------------------------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                           "parameters": WEATHER_SCHEMA}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_litellm_completion_with_tools(served, name, tool_choice) -> None:
    response = litellm.completion(model=f"openai/{name}", api_base=served.url + "/v1", api_key="unused",
                                  messages=ASK, tools=TOOLS, tool_choice=tool_choice, max_tokens=48, temperature=0)
    calls = response.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    fits(calls[0].function.arguments, WEATHER_SCHEMA)
    assert response.choices[0].finish_reason == "tool_calls"


def test_litellm_tool_loop_caches_the_history(served, name) -> None:
    """Two steps of a tool loop: the second request resends tools + history and reuses the first's prompt."""
    kwargs = dict(model=f"openai/{name}", api_base=served.url + "/v1", api_key="unused", tools=TOOLS,
                  max_tokens=32, temperature=0)
    first = litellm.completion(messages=ASK, tool_choice="required", **kwargs)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    second = litellm.completion(messages=history, tool_choice="none", **kwargs)
    assert second.choices[0].message.content
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - served.engine.config.block_size
