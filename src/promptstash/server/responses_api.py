"""OpenAI Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}.

A request maps onto the chat machinery: `instructions` becomes a system message, `input` (a string, or
message / function_call / function_call_output items) becomes ChatMessages, function `tools` become ToolDefs
rendered by the chat template, and `tool_choice` / `text.format` become a grammar (constrained decoding).
The output is split into a message item (output_text) and function_call items at the model's
`<tool_call>...</tool_call>` markers, the same way streamed and not.

Stored conversations (`store`, default true; response_store.py): the response, with its whole conversation, is
kept per tenant, bounded in age (and, in memory, in count): in this process's memory, or, with a shared Redis, in
Redis for every replica (response_store_redis.py; memory then keeps a copy for when Redis is down). A follow-up
with `previous_response_id` renders that conversation plus its new input (instructions and tools are the
follow-up's own, as OpenAI does), so its prompt extends the earlier one and reuses its cached prefix. Another
tenant's id is a 404, as an unknown one.

Tools: parallel calls only with `parallel_tool_calls: true` (the response echoes the value in effect; small
models otherwise repeat a call until max_output_tokens), and then a repeated call ends the output and is dropped.
On tool_choice auto a bare `{"name": ..., "arguments": ...}` answer naming a tool is a call. Tools combine with a
JSON text.format (openai-agents sends both for an agent with an output_type): auto gives calls or JSON text in
the format; required / a named function force a call.

Supported: see the openapi.py Responses section. Refused with a 400 naming the field: tool types other than
function (web_search, file_search, ...), images and files, reasoning summaries, `background`, `conversation`,
`prompt` templates, `truncation: "auto"`, logprobs, and anything else that would change the output.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from promptstash.engine.engine import Usage
from promptstash.engine.grammar import GrammarSpec
from promptstash.engine.sampling import SamplingParams
from promptstash.errors import ContextLengthError, InvalidRequestError
from promptstash.prompts import ChatMessage, TextBlock
from promptstash.server.common import SSE_HEADERS, new_request_id, sse, submit
from promptstash.server.errors import APIError
from promptstash.server.response_store import ResponseStorage, ResponseStore
from promptstash.server.state import ServerState, cache_namespace, registry_namespace, wait_for_completion
from promptstash.server.validate import Body, parse_json_object, type_name
from promptstash.tools import ArgsDelta, CallEnd, CallStart, TextDelta, ToolCall, ToolCallStream, ToolDef

ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
TEXT_PARTS = ("input_text", "output_text", "text")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function and schema names
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
SERVICE_TIERS = ("auto", "default", "flex", "scale", "priority")
# include values that ask for items this server never produces: accepted, nothing to add
HARMLESS_INCLUDES = ("reasoning.encrypted_content", "web_search_call.results", "web_search_call.action.sources",
                     "file_search_call.results", "code_interpreter_call.outputs",
                     "computer_call_output.output.image_url", "message.input_image.image_url")
# request fields whose only accepted value is "not used" (null, or the listed value)
UNSUPPORTED = {
    "background": (False, "background responses are not supported"),
    "conversation": (None, "conversations are not supported; use previous_response_id"),
    "prompt": (None, "reusable prompt templates are not supported; send instructions and input"),
    "max_tool_calls": (None, "max_tool_calls is not supported"),
    "context_management": (None, "context_management is not supported"),
    "prompt_cache_options": (None, "prompt_cache_options is not supported on /v1/responses"),
}
METADATA_MAX_KEYS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512
DEFAULT_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def _id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


@dataclass(frozen=True)
class _Prepared:
    """A validated request, rendered: what the route needs to run it and to describe it."""

    model: str
    stream: bool
    store: bool
    tenant: str
    namespace: str
    sampling: SamplingParams
    max_tokens_given: bool
    retention: str
    token_ids: list[int]
    conversation: tuple[ChatMessage, ...]  # the stored history and this input (instructions are not part of it)
    parse_calls: bool  # tools are offered: split the output at tool-call markers
    echo: dict[str, Any] = field(default_factory=dict)  # request fields the response object repeats
    tool_names: tuple[str, ...] = ()  # of the tools offered (a bare call naming one is a call)


# -- request -> messages, tools, grammar ------------------------------------------------------------------------

def _text_of_parts(parts: list[Any], where: str, kinds: tuple[str, ...]) -> str:
    texts = []
    for j, part in enumerate(parts):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise APIError(400, f"{at}: expected a content part object, got {type_name(part)}", param=at)
        kind = part.get("type")
        if kind in kinds and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and "refusal" in kinds and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif kind in kinds:
            raise APIError(400, f"{at}.text: expected a string", param=f"{at}.text")
        else:
            raise APIError(400, f"{at}.type: only text parts ({', '.join(kinds)}) are supported, got {kind!r}"
                                " (images, files and audio are not)", param=f"{at}.type")
    return "\n".join(texts)


def _message(item: dict[str, Any], where: str) -> ChatMessage:
    m = Body(item, where)
    role = m.str("role", required=True)
    if role not in ROLES:
        raise m.fail("role", f"must be one of {', '.join(ROLES)}, got {role!r}")
    content = item.get("content")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        kinds = (*TEXT_PARTS, "refusal") if role == "assistant" else TEXT_PARTS
        text = _text_of_parts(content, f"{where}.content", kinds)
    elif content is None and role == "assistant":
        text = ""
    else:
        raise m.fail("content", f"expected a string or an array of text parts, got {type_name(content)}")
    return ChatMessage(ROLES[role], (TextBlock(text),))


def _function_call(item: dict[str, Any], where: str) -> ToolCall:
    b = Body(item, where)
    call_id = b.str("call_id", required=True)
    name = b.str("name", required=True)
    arguments = b.str("arguments", required=True)
    try:
        parsed = json.loads(arguments)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise b.fail("arguments", "expected the JSON text of an object")
    return ToolCall(call_id, name, arguments)


def _call_output(item: dict[str, Any], where: str) -> tuple[str, str]:
    b = Body(item, where)
    call_id = b.str("call_id", required=True)
    output = item.get("output")
    if isinstance(output, str):
        return call_id, output
    if isinstance(output, list):
        return call_id, _text_of_parts(output, f"{where}.output", TEXT_PARTS)
    raise b.fail("output", f"expected a string or an array of text parts, got {type_name(output)}")


def _input_messages(body: Body, history: tuple[ChatMessage, ...]) -> list[ChatMessage]:
    """`input` as ChatMessages. Function calls join the assistant message right before them (one assistant turn);
    a function_call_output must answer a call made earlier in the conversation (history or this input)."""
    raw = body.data.get("input")
    if isinstance(raw, str):
        return [ChatMessage("user", (TextBlock(raw),))]
    if raw is None:
        raise body.fail("input", "field required")
    if not isinstance(raw, list):
        raise body.fail("input", f"expected a string or an array of input items, got {type_name(raw)}")
    if not raw:
        raise body.fail("input", "must contain at least one item")
    calls = {c.id: c.name for m in history for c in m.tool_calls}
    messages: list[ChatMessage] = []
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{where}: expected an input item object, got {type_name(item)}", param=where)
        kind = "message" if item.get("type") is None else item["type"]
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            call = _function_call(item, where)
            calls[call.id] = call.name
            if messages and messages[-1].role == "assistant":
                messages[-1] = replace(messages[-1], tool_calls=(*messages[-1].tool_calls, call))
            else:
                messages.append(ChatMessage("assistant", (TextBlock(""),), tool_calls=(call,)))
        elif kind == "function_call_output":
            call_id, output = _call_output(item, where)
            if call_id not in calls:
                raise APIError(400, f"{where}.call_id: call_id {call_id[:80]!r} matches no tool call earlier in the "
                                    "conversation (a function_call in input or in the previous response)",
                               param=f"{where}.call_id")
            messages.append(ChatMessage("tool", (TextBlock(output),), tool_call_id=call_id, name=calls[call_id]))
        elif kind == "reasoning":
            continue  # another model's reasoning: this model has none to continue from
        else:
            raise APIError(400, f"{where}.type: input items of type {kind!r} are not supported; supported: message, "
                                "function_call, function_call_output", param=f"{where}.type")
    if not messages:
        raise body.fail("input", "must contain a message or function item (reasoning items alone leave nothing to "
                                 "answer)")
    return messages


def _tools(body: Body) -> tuple[list[ToolDef], list[dict[str, Any]]]:
    """Function tools as ToolDefs, and as the response echoes them."""
    raw = body.list("tools") or []
    tools: list[ToolDef] = []
    echo: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{where}: expected a tool object, got {type_name(item)}", param=where)
        t = Body(item, where)
        kind = t.str("type", required=True)
        if kind != "function":
            raise t.fail("type", f"only function tools are supported, got {kind!r} (built-in tools such as "
                                 "web_search run on OpenAI's servers)")
        name = t.str("name", required=True)
        if not NAME_PATTERN.fullmatch(name):
            raise t.fail("name", f"must be 1 to 64 letters, digits, '_' or '-', got {name[:80]!r}")
        if any(tool.name == name for tool in tools):
            raise t.fail("name", f"two tools are named {name!r}")
        description = t.str("description")
        params = t.obj("parameters")
        parameters = params.data if params is not None else DEFAULT_PARAMETERS
        strict = t.bool("strict", True)
        tools.append(ToolDef(name, description, parameters))
        echo.append({"type": "function", "name": name, "description": description, "parameters": parameters,
                     "strict": strict})
    return tools, echo


def _tool_choice(body: Body, tools: list[ToolDef]) -> tuple[str, str | None, Any]:
    """(mode none|auto|required|named, the named function, the value the response echoes)."""
    value = body.data.get("tool_choice")
    if value is None:
        mode = "auto" if tools else "none"
        return mode, None, mode
    if isinstance(value, str):
        if value not in ("none", "auto", "required"):
            raise body.fail("tool_choice", f"must be 'none', 'auto', 'required' or {{\"type\": \"function\", "
                                           f"\"name\": ...}}, got {value[:40]!r}")
        if value == "required" and not tools:
            raise body.fail("tool_choice", "'required' needs tools (at least one function)")
        return value, None, value
    if not isinstance(value, dict):
        raise body.fail("tool_choice", f"expected a string or an object, got {type_name(value)}")
    c = Body(value, "tool_choice")
    kind = c.str("type", required=True)
    if kind != "function":
        raise c.fail("type", f"only {{\"type\": \"function\", \"name\": ...}} is supported, got {kind!r}")
    name = c.str("name", required=True)
    if not any(t.name == name for t in tools):
        raise c.fail("name", f"no tool named {name[:80]!r} in tools")
    return "named", name, {"type": "function", "name": name}


def _text_format(body: Body) -> tuple[GrammarSpec | None, dict[str, Any]]:
    """text.format as a grammar (None: free text), and the `text` object the response echoes."""
    text = body.obj("text")
    if text is None:
        return None, {"format": {"type": "text"}, "verbosity": "medium"}
    verbosity = text.str("verbosity", "medium")
    if verbosity != "medium":
        raise text.fail("verbosity", f"only 'medium' is supported, got {verbosity[:40]!r}")
    fmt = text.obj("format")
    if fmt is None:
        return None, {"format": {"type": "text"}, "verbosity": verbosity}
    kind = fmt.str("type", required=True, choices=("text", "json_object", "json_schema"))
    if kind == "text":
        return None, {"format": {"type": "text"}, "verbosity": verbosity}
    if kind == "json_object":
        return GrammarSpec.json_schema(None), {"format": {"type": "json_object"}, "verbosity": verbosity}
    name = fmt.str("name", required=True)
    if not NAME_PATTERN.fullmatch(name):
        raise fmt.fail("name", f"must be 1 to 64 letters, digits, '_' or '-', got {name[:80]!r}")
    schema = fmt.obj("schema", required=True)
    assert schema is not None
    echo = {"type": "json_schema", "name": name, "schema": schema.data, "strict": fmt.bool("strict", False),
            "description": fmt.str("description")}
    return GrammarSpec.json_schema(schema.data), {"format": echo, "verbosity": verbosity}


def _metadata(body: Body) -> dict[str, str]:
    meta = body.obj("metadata")
    if meta is None:
        return {}
    if len(meta.data) > METADATA_MAX_KEYS:
        raise body.fail("metadata", f"at most {METADATA_MAX_KEYS} keys, got {len(meta.data)}")
    for key, value in meta.data.items():
        if len(key) > METADATA_KEY_CHARS:
            raise body.fail("metadata", f"keys have at most {METADATA_KEY_CHARS} characters, got {len(key)}")
        if not isinstance(value, str):
            raise meta.fail(key, f"expected a string, got {type_name(value)}")
        if len(value) > METADATA_VALUE_CHARS:
            raise meta.fail(key, f"at most {METADATA_VALUE_CHARS} characters, got {len(value)}")
    return dict(meta.data)


def _check_unsupported(body: Body) -> None:
    for name, (allowed, why) in UNSUPPORTED.items():
        value = body.data.get(name)
        if value is not None and value != allowed:
            raise body.fail(name, why)
    if body.int("top_logprobs", 0, min=0, max=20):
        raise body.fail("top_logprobs", "logprobs are not supported")
    truncation = body.str("truncation", "disabled", choices=("disabled", "auto"))
    if truncation != "disabled":
        raise body.fail("truncation", "only 'disabled' is supported: a prompt over the context window is a 400")
    for i, value in enumerate(body.list("include") or []):
        if not isinstance(value, str):
            raise body.fail(f"include[{i}]", f"expected a string, got {type_name(value)}")
        if value not in HARMLESS_INCLUDES:
            raise body.fail(f"include[{i}]", f"{value[:80]!r} is not supported (accepted: "
                                             f"{', '.join(HARMLESS_INCLUDES)})")
    reasoning = body.obj("reasoning")
    if reasoning is not None:
        reasoning.str("effort", choices=REASONING_EFFORTS)
        for name in ("summary", "generate_summary"):
            if reasoning.data.get(name) is not None:
                raise reasoning.fail(name, "reasoning summaries are not supported: this model does not reason")
    body.str("service_tier", choices=SERVICE_TIERS)
    stream_options = body.obj("stream_options")
    if stream_options is not None:
        stream_options.bool("include_obfuscation")  # no obfuscation is added either way; only its type is checked
    for name in ("user", "safety_identifier", "prompt_cache_key"):
        body.str(name)


def _prepare(state: ServerState, store: ResponseStorage, raw: bytes, tenant: str) -> _Prepared:
    """Body bytes -> a prepared request: validation, the stored history, rendering, tokenizing and the grammar's
    compilation. Runs on a worker thread: none of it may hold up the event loop."""
    body = Body(parse_json_object(raw, state.config.max_body_bytes))
    model = body.str("model", required=True)
    state.check_model(model)
    _check_unsupported(body)
    stream = body.bool("stream", False)
    keep = body.bool("store", True)
    instructions = body.str("instructions")
    limit = state.engine.max_model_len
    max_tokens = body.int("max_output_tokens", None, min=1, max=limit)
    temperature = body.num("temperature", 1.0, min=0.0, max=2.0)
    top_p = body.num("top_p", 1.0, min=0.0, max=1.0)
    seed = body.int("seed", min=-(2**63), max=2**64 - 1)
    retention = body.str("prompt_cache_retention", "in_memory", choices=("in_memory", "24h"))
    metadata = _metadata(body)
    tools, tools_echo = _tools(body)
    mode, named, choice_echo = _tool_choice(body, tools)
    parallel = body.bool("parallel_tool_calls") is True  # off unless asked for (small models repeat calls)
    text_grammar, text_echo = _text_format(body)
    previous_id = body.str("previous_response_id")
    history: tuple[ChatMessage, ...] = ()
    if previous_id is not None:
        previous = store.get(tenant, previous_id)
        if previous is None:
            raise APIError(404, f"previous response {previous_id[:80]!r} not found (responses are stored when "
                                "`store` is true, per API key, for a limited time)", param="previous_response_id",
                           code="previous_response_not_found")
        history = previous.messages
    conversation = (*history, *_input_messages(body, history))

    grammar, grammar_param = text_grammar, "text.format"
    if text_grammar is not None:
        _compile(state, text_grammar, "text.format")
    if tools and mode != "none":
        # with a text.format: auto gives calls or JSON text in the format; required / named force a call
        text_schema = None if text_grammar is None else \
            ({"type": "object"} if text_grammar.source == "" else json.loads(text_grammar.source))
        grammar, grammar_param = GrammarSpec.tool_calls(tools, mode, named, parallel, text_schema), "tools"
    if grammar is not None:
        _compile(state, grammar, grammar_param)  # cached: add_request finds it compiled

    messages = ([ChatMessage("system", (TextBlock(instructions),))] if instructions is not None else [])
    messages += conversation
    chars = sum(len(b.text) for m in messages for b in m.blocks) + sum(len(json.dumps(t)) for t in tools_echo)
    state.check_prompt_chars(chars, "input")
    try:
        rendered = state.engine.render(messages, registry_namespace(tenant), tools=tools)
    except ContextLengthError as exc:
        raise APIError(400, str(exc), param="input", code="context_length_exceeded") from None
    except (InvalidRequestError, ValueError) as exc:
        raise APIError(400, str(exc), param="input") from None
    sampling = SamplingParams(
        max_tokens=state.config.default_max_tokens if max_tokens is None else max_tokens,
        temperature=temperature, top_p=max(top_p, 1e-9), seed=seed, grammar=grammar)
    reasoning = body.obj("reasoning")
    echo = {
        "instructions": instructions, "max_output_tokens": max_tokens, "metadata": metadata,
        "parallel_tool_calls": parallel, "previous_response_id": previous_id,
        "reasoning": {"effort": reasoning.data.get("effort") if reasoning else None, "summary": None},
        "service_tier": "default", "store": keep, "temperature": temperature, "text": text_echo,
        "tool_choice": choice_echo, "tools": tools_echo, "top_p": top_p, "truncation": "disabled",
        "user": body.str("user"), "safety_identifier": body.str("safety_identifier"),
        "prompt_cache_key": body.str("prompt_cache_key"), "prompt_cache_retention": retention,
        "background": False, "top_logprobs": 0,
    }
    namespace = cache_namespace(tenant, body.str("cache_salt"))
    return _Prepared(model, stream, keep, tenant, namespace, sampling, max_tokens is not None,
                     retention, rendered.token_ids, conversation, bool(tools) and mode != "none", echo,
                     tuple(t.name for t in tools))


def _compile(state: ServerState, grammar: GrammarSpec, param: str) -> None:
    try:
        state.engine.compile_grammar(grammar)
    except InvalidRequestError as exc:
        raise APIError(400, f"{param}: cannot be compiled into a grammar: {exc}", param=param) from None


# -- output: items and stream events ---------------------------------------------------------------------------

class _Output:
    """The response's output items, built from the model's text as it comes (split into content and calls by
    tools.ToolCallStream when tools are offered); each method returns the stream events (without
    sequence_number) that tell a client what changed. Streamed or not, a response gets the same items."""

    def __init__(self, parse_calls: bool, names: tuple[str, ...] = ()) -> None:
        self.items: list[dict[str, Any]] = []
        self._calls = ToolCallStream(names) if parse_calls else None
        self._message: dict[str, Any] | None = None  # the open message item
        self._call: dict[str, Any] | None = None  # the open function_call item

    def feed(self, text: str, last: bool = False) -> list[dict[str, Any]]:
        """Events for the next piece of output text (last: the output is complete, so held-back text settles)."""
        if self._calls is None:
            return self._text(text, eager=True)
        events: list[dict[str, Any]] = []
        for event in self._calls.feed(text) + (self._calls.finish() if last else []):
            if isinstance(event, TextDelta):
                events += self._text(event.text)
            elif isinstance(event, CallStart):
                events += self._start_call(event.id, event.name)
            elif isinstance(event, ArgsDelta) and self._call is not None:
                self._call["arguments"] += event.text
                events.append({"type": "response.function_call_arguments.delta", "item_id": self._call["id"],
                               "output_index": len(self.items) - 1, "delta": event.text})
            elif isinstance(event, CallEnd):
                events += self._end_call("completed")
        return events

    @property
    def text(self) -> str:
        return "".join(part["text"] for item in self.items if item["type"] == "message" for part in item["content"])

    def _text(self, text: str, eager: bool = False) -> list[dict[str, Any]]:
        """eager: open the message even for no text (without tools the output is one message, maybe empty)."""
        events: list[dict[str, Any]] = []
        if self._message is None:
            if not text and not eager:
                return events
            item = {"id": _id("msg_"), "type": "message", "status": "in_progress", "role": "assistant",
                    "content": []}
            self._message = item
            self.items.append(item)
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            events += [{"type": "response.output_item.added", "output_index": len(self.items) - 1,
                        "item": _copy(item)},
                       {"type": "response.content_part.added", "item_id": item["id"],
                        "output_index": len(self.items) - 1, "content_index": 0, "part": dict(part)}]
            item["content"].append(part)
        if text:
            self._message["content"][0]["text"] += text
            events.append({"type": "response.output_text.delta", "item_id": self._message["id"],
                           "output_index": self.items.index(self._message), "content_index": 0, "delta": text,
                           "logprobs": []})
        return events

    def _close_message(self, status: str) -> list[dict[str, Any]]:
        item, self._message = self._message, None
        if item is None:
            return []
        index = self.items.index(item)
        item["status"] = status
        part = item["content"][0]
        return [{"type": "response.output_text.done", "item_id": item["id"], "output_index": index,
                 "content_index": 0, "text": part["text"], "logprobs": []},
                {"type": "response.content_part.done", "item_id": item["id"], "output_index": index,
                 "content_index": 0, "part": dict(part)},
                {"type": "response.output_item.done", "output_index": index, "item": _copy(item)}]

    def _start_call(self, call_id: str, name: str) -> list[dict[str, Any]]:
        events = self._close_message("completed") + self._end_call("incomplete")
        item = {"id": _id("fc_"), "type": "function_call", "status": "in_progress", "call_id": call_id,
                "name": name, "arguments": ""}
        self._call = item
        self.items.append(item)
        return events + [{"type": "response.output_item.added", "output_index": len(self.items) - 1,
                          "item": _copy(item)}]

    def _end_call(self, status: str) -> list[dict[str, Any]]:
        item, self._call = self._call, None
        if item is None:
            return []
        index = self.items.index(item)
        item["status"] = status
        return [{"type": "response.function_call_arguments.done", "item_id": item["id"], "output_index": index,
                 "name": item["name"], "arguments": item["arguments"]},
                {"type": "response.output_item.done", "output_index": index, "item": _copy(item)}]

    def finish(self, status: str) -> list[dict[str, Any]]:
        """Close what is open (with the response's status); an output with no item at all gets an empty message."""
        events: list[dict[str, Any]] = []
        if not self.items:
            events += self._text("", eager=True)
        return events + self._close_message(status) + self._end_call(status)

    def message(self) -> ChatMessage:
        """The output as the assistant turn a follow-up's history holds. A call cut short (max_output_tokens) whose
        arguments are not a JSON object is left out: it cannot be rendered, and was never complete."""
        calls = tuple(ToolCall(item["call_id"], item["name"], item["arguments"]) for item in self.items
                      if item["type"] == "function_call" and _is_json_object(item["arguments"]))
        return ChatMessage("assistant", (TextBlock(self.text),), tool_calls=calls)


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _copy(item: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return json.loads(json.dumps({**item, **changes}))


def usage_json(usage: Usage) -> dict[str, Any]:
    return {"input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens,
                                     "cache_write_tokens": usage.num_cache_write_tokens},
            "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


# -- routes ----------------------------------------------------------------------------------------------------

def register(app: FastAPI, state: ServerState, store: ResponseStorage | None = None) -> ResponseStorage:
    """Add the routes; the store (a new in-memory one unless given) is returned and kept as app.state.responses.
    NOTE: every store call runs on a worker thread: a shared store waits on Redis."""
    store = store if store is not None else ResponseStore()  # NOTE: not `or`: an empty store is falsy (len 0)
    app.state.responses = store

    @app.post("/v1/responses")
    async def create_response(request: Request):
        tenant = state.tenant(request)
        raw = await state.read_body(request)
        prepared = await asyncio.to_thread(_prepare, state, store, raw, tenant)
        return await _respond(state, store, request, prepared)

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(request: Request, response_id: str):
        tenant = state.tenant(request)
        if request.query_params.get("stream", "false").lower() not in ("false", "0"):
            raise APIError(400, "stream: a stored response cannot be streamed again", param="stream")
        stored = await asyncio.to_thread(store.get, tenant, response_id)
        if stored is None:
            raise APIError(404, f"response {response_id[:80]!r} not found", param="response_id")
        return JSONResponse(stored.body)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(request: Request, response_id: str):
        tenant = state.tenant(request)
        if not await asyncio.to_thread(store.delete, tenant, response_id):
            raise APIError(404, f"response {response_id[:80]!r} not found", param="response_id")
        return {"id": response_id, "object": "response", "deleted": True}

    return store


async def _respond(state: ServerState, store: ResponseStorage, request: Request, p: _Prepared):
    sampling = p.sampling
    if not p.max_tokens_given:  # as OpenAI does: never more than the context window leaves
        room = max(1, state.engine.max_model_len - len(p.token_ids))
        sampling = replace(sampling, max_tokens=min(sampling.max_tokens, room))
    breakpoints = [(len(p.token_ids), "24h")] if p.retention == "24h" else []
    rid = new_request_id()
    submission = await submit(state, p.token_ids, sampling, p.namespace, tenant=p.tenant, breakpoints=breakpoints,
                              request_id=rid, param="input")
    response_id = "resp_" + rid
    created = int(time.time())
    headers = {"x-request-id": rid}

    def body(status: str, output: list[dict[str, Any]], usage: Usage | None,
             error: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"id": response_id, "object": "response", "created_at": created, "status": status,
                "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
                "error": error,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "model": p.model, "output": output, "usage": usage_json(usage) if usage is not None else None,
                **p.echo}

    async def finished(out: _Output, usage: Usage, reason: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        status = "completed" if reason == "stop" else "incomplete"
        events = out.finish(status)
        result = body(status, out.items, usage)
        if p.store:
            await asyncio.to_thread(store.put, p.tenant, response_id, result, (*p.conversation, out.message()))
        return result, events

    if not p.stream:
        completion = await wait_for_completion(submission, request)
        if completion is None:
            return JSONResponse({}, status_code=499)  # the client has gone; nobody reads this
        if completion.finish_reason not in ("stop", "length"):
            raise APIError(500, f"generation failed (finish reason {completion.finish_reason!r})")
        state.stats.record("responses", completion, p.tenant)
        out = _Output(p.parse_calls, p.tool_names)
        out.feed(completion.text, last=True)
        result, _ = await finished(out, completion.usage, completion.finish_reason)
        return JSONResponse(result, headers=headers)

    async def events() -> AsyncIterator[str]:
        sequence = iter(range(1 << 62))

        def event(data: dict[str, Any]) -> str:
            return sse({"type": data["type"], "sequence_number": next(sequence),
                        **{k: v for k, v in data.items() if k != "type"}}, event=data["type"])

        out = _Output(p.parse_calls, p.tool_names)
        try:
            yield event({"type": "response.created", "response": body("in_progress", [], None)})
            yield event({"type": "response.in_progress", "response": body("in_progress", [], None)})
            async for update in submission.updates():
                if update.new_text:
                    for e in out.feed(update.new_text):
                        yield event(e)
            completion = await submission.completion()
            reason = completion.finish_reason
            if reason not in ("stop", "length"):
                error = {"code": "server_error", "message": f"generation failed ({reason})"}
                yield event({"type": "response.failed", "response": body("failed", out.items, None, error)})
                return
            state.stats.record("responses", completion, p.tenant)
            flushed = out.feed("", last=True)
            result, closing = await finished(out, completion.usage, reason)
            for e in [*flushed, *closing]:
                yield event(e)
            kind = "response.completed" if result["status"] == "completed" else "response.incomplete"
            yield event({"type": kind, "response": result})
        finally:
            submission.abort_soon()  # a client that went away frees its blocks now (no-op once complete)

    return StreamingResponse(events(), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
