"""Anthropic-compatible route: POST /v1/messages, with cache_control breakpoints.

Rules as Anthropic states them: at most 4 breakpoints (top-level automatic cache_control counts as one);
a 1h breakpoint may not follow a 5m one; a breakpoint whose prefix is shorter than the minimum cacheable
length writes nothing and is no error; `max_tokens: 0` only warms the cache.
Usage: `input_tokens` excludes tokens read from (`cache_read_input_tokens`) and written to
(`cache_creation_input_tokens`, split by TTL in `cache_creation`) the cache.

Modules: a text block (in `system` or a message's content) with `"module": true` is a module (tokenized on its
own; its K/V are reused wherever it appears; its cache_control TTL becomes the module's), and
`{"type": "module", "id": ...}` uses a module registered with POST /v1/modules in the caller's tenant.
`module_repair` picks what is recomputed where modules are assembled. A prompt with modules gets
`usage.promptstash` (prefix- and module-reused, recomputed and computed tokens).

Tools: `tools` ({name, description, input_schema, cache_control}) are rendered by the chat template ahead of the
conversation (so they are cached; a tool's cache_control is a breakpoint right after its definition).
`tool_choice` auto | any | tool (+ name) | none, `disable_parallel_tool_use`: with tools and a choice other than
none, output is constrained by a grammar (GrammarSpec.tool_calls: auto = text or calls, any = at least one call,
tool = that tool), so every tool_use input is valid JSON for its input_schema; none renders the tools (as
Anthropic does) but neither constrains nor parses: the output is text. One call per answer unless
`disable_parallel_tool_use` is explicitly false (small models repeat a call until max_tokens; with parallel
calls a repeated one ends the output and is dropped). On auto a bare `{"name": ..., "arguments": ...}` answer
naming a tool is a tool_use. History: assistant `tool_use` blocks
become the message's tool calls, user `tool_result` blocks become tool messages (`is_error`: the result is
rendered after "Error:"); cache_control on either is a breakpoint after it (a tool_use's: after its input JSON).
Output: the model's `<tool_call>` text is parsed into `tool_use` blocks (ids "toolu_..."), stop_reason "tool_use";
streamed as content_block_start (input {}), input_json_delta deltas, content_block_stop.
Structured output: `output_config: {"format": {"type": "json_schema", "schema": {...}}}` (or the beta spelling
`output_format: {...}`) constrains the text to the schema; with tools, tool_choice auto gives tool_use blocks or
JSON text in the format, any / tool a tool_use. A final assistant message is a prefill: generation
continues it and the response holds only the new text. Not supported, a 400 rather than ignored: `thinking`
(other than disabled), `output_config.effort`, `container`, `mcp_servers`, `context_management`, server tools
(a tool `type` other than custom), `defer_loading`. Ignored as harmless: metadata, service_tier, speed,
inference_geo, diagnostics, user_profile_id, workspace_id, a tool's strict (inputs are always constrained),
input_examples, allowed_callers, eager_input_streaming.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from promptstash.cache.manager import TTL_SECONDS
from promptstash.cache.modules import ModuleRepair, ModuleSpan
from promptstash.engine.engine import Completion, Usage
from promptstash.engine.grammar import GrammarSpec
from promptstash.engine.sampling import SamplingParams
from promptstash.errors import ContextLengthError, InvalidRequestError
from promptstash.prompts import ChatMessage, TextBlock
from promptstash.server.common import (
    SSE_HEADERS,
    module_flag,
    module_id_field,
    module_repair_field,
    new_request_id,
    sse,
    submit,
    usage_extension,
)
from promptstash.server.errors import APIError
from promptstash.server.semantic import (
    ReplaySubmission,
    SemanticOutcome,
    SemanticPlan,
    hit_completion,
    parse_option,
    with_label,
)
from promptstash.server.state import ServerState, cache_namespace, registry_namespace, wait_for_completion
from promptstash.server.validate import Body, parse_json_object
from promptstash.tools import (
    ArgsDelta,
    CallStart,
    TextDelta,
    ToolCall,
    ToolCallStream,
    ToolDef,
    ToolEvent,
    parse_tool_calls,
)

MAX_BREAKPOINTS = 4
TTLS = ("5m", "1h")
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
TOOL_USE_ID = re.compile(r"^[a-zA-Z0-9_-]{1,256}$")
TOOL_MODES = {"auto": "auto", "any": "required", "tool": "named"}  # tool_choice type -> GrammarSpec tool mode
UNSUPPORTED = {"container": "container (code execution)", "mcp_servers": "mcp_servers (MCP connectors)",
               "context_management": "context_management (context editing)"}


def _cache_control(value: Any, where: str) -> str | None:
    """The TTL class of a cache_control value, None if absent; 400 if malformed."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise APIError(400, f"{where}: expected an object like {{\"type\": \"ephemeral\"}}")
    cc = Body(value, where)
    cc.str("type", required=True, choices=("ephemeral",))
    return cc.str("ttl", "5m", choices=TTLS)


def _block_list(content: Any, where: str) -> list[tuple[dict[str, Any], str]]:
    """A content value (a string or an array of block objects) as (block, where) pairs."""
    if isinstance(content, str):
        return [({"type": "text", "text": content}, where)]
    if not isinstance(content, list):
        raise APIError(400, f"{where}: expected a string or an array of content blocks", param=where)
    if not content:
        raise APIError(400, f"{where}: must not be empty", param=where)
    for j, raw in enumerate(content):
        if not isinstance(raw, dict):
            raise APIError(400, f"{where}[{j}]: expected a content block object", param=f"{where}[{j}]")
    return [(raw, f"{where}[{j}]") for j, raw in enumerate(content)]


def _text_block(raw: dict[str, Any], where: str, ttls: list[str], also: str = "") -> TextBlock:
    """A text block or a module block; its cache_control TTL is appended to `ttls`. also: the other block types
    accepted where this one is (for the error message)."""
    block = Body(raw, where)
    module = module_flag(raw, where)
    kind = block.str("type", required=True)
    if kind == "module":
        result = TextBlock("", _cache_control(raw.get("cache_control"), f"{where}.cache_control"),
                           module_id=module_id_field(raw, where))
    elif kind != "text":
        if module:
            raise block.fail("module", f"only text blocks can be modules (\"module\": true), got type {kind!r}")
        raise block.fail("type", f"only text content blocks{also} (and {{\"type\": \"module\", \"id\": ...}}) "
                                 f"are supported here, got {kind!r}")
    else:
        text = block.str("text", required=True)
        if module and not text:
            raise block.fail("text", "a module must not be empty")
        result = TextBlock(text, _cache_control(raw.get("cache_control"), f"{where}.cache_control"), module=module)
    if result.ttl_class is not None:
        ttls.append(result.ttl_class)
    return result


def _blocks(content: Any, where: str, ttls: list[str]) -> tuple[TextBlock, ...]:
    return tuple(_text_block(raw, w, ttls) for raw, w in _block_list(content, where))


def _assistant(content: Any, where: str, calls_by_id: dict[str, str], ttls: list[str]) -> ChatMessage:
    """An assistant turn: text blocks and tool_use blocks (its tool calls, rendered after its text)."""
    blocks: list[TextBlock] = []
    calls: list[ToolCall] = []
    call_ttls: list[str | None] = []
    for raw, w in _block_list(content, where):
        kind = raw.get("type")
        if kind == "tool_result":
            raise APIError(400, f"{w}: tool_result blocks belong in user messages", param=w)
        if kind != "tool_use":
            blocks.append(_text_block(raw, w, ttls, ", tool_use blocks"))
            continue
        block = Body(raw, w)
        call_id = block.str("id", required=True)
        if not TOOL_USE_ID.fullmatch(call_id):
            raise block.fail("id", f"must match {TOOL_USE_ID.pattern}, got {call_id[:80]!r}")
        if call_id in calls_by_id:
            raise block.fail("id", f"duplicate tool_use id {call_id!r}: each tool call needs its own id")
        name = block.str("name", required=True)
        if not name:
            raise block.fail("name", "must not be empty")
        arguments = block.obj("input", required=True)
        assert arguments is not None
        ttl = _cache_control(raw.get("cache_control"), f"{w}.cache_control")
        if ttl is not None:
            ttls.append(ttl)
        calls.append(ToolCall(call_id, name, json.dumps(arguments.data, ensure_ascii=False)))
        call_ttls.append(ttl)
        calls_by_id[call_id] = name
    return ChatMessage("assistant", tuple(blocks), tuple(calls), tool_call_ttls=tuple(call_ttls))


def _user(content: Any, where: str, calls_by_id: dict[str, str], ttls: list[str]) -> list[ChatMessage]:
    """A user turn: its tool_result blocks become tool messages, runs of text blocks user messages, in order."""
    messages: list[ChatMessage] = []
    pending: list[TextBlock] = []
    for raw, w in _block_list(content, where):
        kind = raw.get("type")
        if kind == "tool_use":
            raise APIError(400, f"{w}: tool_use blocks belong in assistant messages", param=w)
        if kind != "tool_result":
            pending.append(_text_block(raw, w, ttls, ", tool_result blocks"))
            continue
        if pending:
            messages.append(ChatMessage("user", tuple(pending)))
            pending = []
        messages.append(_tool_result(raw, w, calls_by_id, ttls))
    if pending:
        messages.append(ChatMessage("user", tuple(pending)))
    return messages


def _tool_result(raw: dict[str, Any], where: str, calls_by_id: dict[str, str], ttls: list[str]) -> ChatMessage:
    block = Body(raw, where)
    call_id = block.str("tool_use_id", required=True)
    if call_id not in calls_by_id:
        raise block.fail("tool_use_id", f"{call_id[:80]!r} matches no tool call (tool_use block) of an earlier "
                                         "assistant message")
    is_error = block.bool("is_error", False)
    content = raw.get("content")
    if content is None or content == []:
        blocks = [TextBlock("")]
    elif isinstance(content, str | list):
        blocks = list(_blocks(content, f"{where}.content", ttls))
    else:
        raise block.fail("content", "expected a string or an array of text blocks")
    ttl = _cache_control(raw.get("cache_control"), f"{where}.cache_control")
    if ttl is not None:
        ttls.append(ttl)
        if blocks[-1].ttl_class is None:
            blocks[-1] = replace(blocks[-1], ttl_class=ttl)
    if is_error:
        blocks.insert(0, TextBlock("Error:"))
    return ChatMessage("tool", tuple(blocks), tool_call_id=call_id, name=calls_by_id[call_id])


def _tools(body: Body) -> list[ToolDef]:
    """`tools`: custom tools {name, description?, input_schema, cache_control?}."""
    tools: list[ToolDef] = []
    for i, item in enumerate(body.list("tools") or []):
        where = f"tools[{i}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{where}: expected a tool object", param=where)
        tool = Body(item, where)
        kind = tool.str("type")
        if kind not in (None, "custom"):
            raise tool.fail("type", f"only custom tools (type \"custom\" or absent) are supported, not server tools "
                                    f"like {kind[:60]!r}")
        name = tool.str("name", required=True)
        if not TOOL_NAME.fullmatch(name):
            raise tool.fail("name", f"must match {TOOL_NAME.pattern}, got {name[:80]!r}")
        if any(t.name == name for t in tools):
            raise tool.fail("name", f"duplicate tool name {name!r}")
        description = tool.str("description")
        schema = tool.obj("input_schema", required=True)
        assert schema is not None
        if schema.data.get("type") != "object":
            raise tool.fail("input_schema", "must be a JSON schema with \"type\": \"object\"")
        tool.bool("strict")
        if tool.bool("defer_loading", False):
            raise tool.fail("defer_loading", "tool search is not supported: every tool is rendered into the prompt")
        tools.append(ToolDef(name, description, schema.data,
                             _cache_control(item.get("cache_control"), f"{where}.cache_control")))
    return tools


def _tool_choice(body: Body, tools: list[ToolDef]) -> tuple[str | None, str | None, bool]:
    """(grammar tool mode or None: no tool calls expected, the tool's name for mode named, parallel). Parallel
    calls only with an explicit `disable_parallel_tool_use: false` (small models repeat a call until max_tokens)."""
    choice = body.obj("tool_choice")
    if choice is None:
        return ("auto" if tools else None), None, False
    kind = choice.str("type", required=True, choices=("auto", "any", "tool", "none"))
    name = choice.str("name", required=kind == "tool")
    if kind != "tool" and name is not None:
        raise choice.fail("name", f"only tool_choice of type \"tool\" names a tool (this one is {kind!r})")
    parallel = choice.bool("disable_parallel_tool_use") is False
    if kind == "none" or (kind == "auto" and not tools):
        return None, None, False
    if not tools:
        raise choice.fail("type", f"tool_choice {kind!r} needs tools")
    if kind == "tool" and all(t.name != name for t in tools):
        raise choice.fail("name", f"no tool named {name[:80]!r} in tools")
    return TOOL_MODES[kind], name, parallel


def _output_schema(body: Body) -> dict[str, Any] | None:
    """The JSON schema of `output_config.format` (or the beta spelling `output_format`), None without one."""
    config = body.obj("output_config")
    output_format = None
    if config is not None:
        if config.data.get("effort") is not None:
            raise config.fail("effort", "not supported: the model has no effort setting")
        output_format = config.obj("format")
    beta = body.obj("output_format")
    if beta is not None:
        if output_format is not None:
            raise body.fail("output_format", "at most one output constraint: give output_config.format or "
                                             "output_format, not both")
        output_format = beta
    if output_format is None:
        return None
    output_format.str("type", required=True, choices=("json_schema",))
    schema = output_format.obj("schema", required=True)
    assert schema is not None
    return schema.data


def _reject_unsupported(body: Body) -> None:
    """Fields that would change what the model does, which this server does not implement: a 400, not ignored."""
    thinking = body.obj("thinking")
    if thinking is not None and thinking.data.get("type") != "disabled":
        raise body.fail("thinking", "thinking is not supported (only absent, null or {\"type\": \"disabled\"})")
    for name, what in UNSUPPORTED.items():
        if body.data.get(name) is not None:
            raise body.fail(name, f"{what} is not supported")


def count_tokens(state: ServerState, raw: bytes, tenant: str) -> dict[str, Any]:
    """POST /v1/messages/count_tokens: the prompt's tokens as /v1/messages would compute them (tools included), and
    whether each cache_control breakpoint reaches --min-cacheable-tokens (a shorter one writes nothing)."""
    p = _prepare(state, raw, tenant, count_only=True)
    minimum = state.config.min_cacheable_tokens
    return {"input_tokens": len(p.token_ids),
            "cache_breakpoints": [{"prefix_tokens": n, "ttl": ttl, "cacheable": n >= minimum}
                                  for n, ttl in p.all_breakpoints],
            "min_cacheable_tokens": minimum}


def _messages(body: Body, tools: list[ToolDef]) -> tuple[list[ChatMessage], bool]:
    """The conversation as ChatMessages, and whether the last message is an assistant prefill. Checks the
    breakpoint rules over tools, system and messages, in that order (Anthropic's)."""
    ttls = [t.ttl_class for t in tools if t.ttl_class is not None]
    messages: list[ChatMessage] = []
    system = body.data.get("system")
    if system is not None and system != "":
        messages.append(ChatMessage("system", _blocks(system, "system", ttls)))
    raw = body.list("messages", required=True)
    if not raw:
        raise body.fail("messages", "must contain at least one message")
    calls_by_id: dict[str, str] = {}  # tool_use id -> tool name, of the turns so far
    role = "user"
    for i, item in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{where}: expected an object", param=where)
        role = Body(item, where).str("role", required=True, choices=("user", "assistant"))
        if role == "assistant":
            messages.append(_assistant(item.get("content"), f"{where}.content", calls_by_id, ttls))
        else:
            messages.extend(_user(item.get("content"), f"{where}.content", calls_by_id, ttls))
    prefill = role == "assistant"
    if prefill and messages[-1].tool_calls:
        raise APIError(400, f"messages[{len(raw) - 1}].content: a final assistant message is a prefill that "
                            "generation continues; it cannot hold tool_use blocks", param=f"messages[{len(raw) - 1}]")
    automatic = _cache_control(body.data.get("cache_control"), "cache_control")
    if automatic is not None:  # automatic mode: one more breakpoint, on the last cacheable block
        ttls.append(automatic)
        messages[-1] = _mark_last(messages[-1], automatic)
    if len(ttls) > MAX_BREAKPOINTS:
        raise APIError(400, f"a maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided; "
                            f"found {len(ttls)}")
    for earlier, later in zip(ttls, ttls[1:], strict=False):
        if TTL_SECONDS[later] > TTL_SECONDS[earlier]:
            raise APIError(400, f"a cache_control breakpoint with ttl='{later}' may not come after one with "
                                f"ttl='{earlier}': longer TTLs must come first")
    return messages, prefill


def _mark_last(message: ChatMessage, ttl: str) -> ChatMessage:
    """The message with a breakpoint on what it renders last (its last tool call, else its last block), unless
    that already has one."""
    if message.tool_calls:
        call_ttls = list((message.tool_call_ttls + (None,) * len(message.tool_calls))[:len(message.tool_calls)])
        call_ttls[-1] = call_ttls[-1] or ttl
        return replace(message, tool_call_ttls=tuple(call_ttls))
    if message.blocks and message.blocks[-1].ttl_class is None:
        return replace(message, blocks=message.blocks[:-1] + (replace(message.blocks[-1], ttl_class=ttl),))
    return message


def usage_json(usage: Usage, extension: dict[str, Any] | None = None) -> dict[str, Any]:
    """Anthropic usage; `extension` (usage_extension: a prompt with modules) is added as usage.promptstash."""
    w5 = usage.cache_write_tokens.get("5m", 0)
    w1 = usage.cache_write_tokens.get("1h", 0) + usage.cache_write_tokens.get("24h", 0)
    doc = {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens - w5 - w1,
        "cache_creation_input_tokens": w5 + w1,
        "cache_read_input_tokens": usage.cached_tokens,
        "cache_creation": {"ephemeral_5m_input_tokens": w5, "ephemeral_1h_input_tokens": w1},
        "output_tokens": usage.completion_tokens,
    }
    if extension is not None:
        doc["promptstash"] = extension
    return doc


def _stop(completion: Completion) -> tuple[str, str | None]:
    if completion.finish_reason == "length":
        return "max_tokens", None
    if completion.finish_reason == "stop":
        if completion.stop_sequence is not None:
            return "stop_sequence", completion.stop_sequence
        return "end_turn", None
    raise APIError(500, f"generation failed (finish reason {completion.finish_reason!r})")


@dataclass(frozen=True)
class _Prepared:
    model: str
    sampling: SamplingParams
    stream: bool
    namespace: str
    token_ids: list[int]
    breakpoints: list[tuple[int, str]]
    modules: tuple[ModuleSpan, ...] = ()
    module_repair: ModuleRepair | None = None  # None: the engine's default
    all_breakpoints: tuple[tuple[int, str], ...] = ()  # every breakpoint, cacheable or not (count_tokens)
    parse_tools: bool = False  # the output may hold tool calls (tools given, tool_choice not none)
    tool_names: tuple[str, ...] = ()  # of the tools given (a bare call naming one is a call)
    semantic: SemanticPlan | None = None  # the request opted into the semantic cache (server/semantic.py)
    semantic_outcome: SemanticOutcome | None = None  # what the lookup found (set once looked up)

    def usage(self, state: ServerState, usage: Usage) -> dict[str, Any]:
        return with_label(usage_json(usage, usage_extension(usage, bool(self.modules), self.module_repair,
                                                            state.engine.default_module_repair)),
                          self.semantic_outcome)


def _prepare(state: ServerState, raw: bytes, tenant: str, *, count_only: bool = False) -> _Prepared:
    """Body bytes -> what to submit: JSON, validation, the character cap, the chat template, the tokenizer and
    the grammar (compiled here, so that a schema the grammar library rejects is a 400 and the engine finds it
    cached). Runs on a worker thread: none of it may hold up the event loop. count_only: for count_tokens, where
    max_tokens is optional (the same body is otherwise validated the same way)."""
    body = Body(parse_json_object(raw, state.config.max_body_bytes))
    if count_only and body.data.get("max_tokens") is None:
        body.data["max_tokens"] = 0
    model = body.str("model", required=True)
    state.check_model(model)
    max_tokens = body.int("max_tokens", required=True, min=0, max=state.engine.max_model_len)
    _reject_unsupported(body)
    tools = _tools(body)
    tool_mode, tool_name, parallel = _tool_choice(body, tools)
    schema = _output_schema(body)
    grammar: GrammarSpec | None = None
    if schema is not None:
        grammar, grammar_field = GrammarSpec.json_schema(schema), "output_config.format.schema"
        if tool_mode is not None:  # auto: calls or JSON text in the format; any / tool: a call
            _compile(state, grammar, grammar_field)
            grammar = GrammarSpec.tool_calls(tools, tool_mode, tool_name, parallel, schema)
            grammar_field = "tools"
    elif tool_mode is not None:
        grammar, grammar_field = GrammarSpec.tool_calls(tools, tool_mode, tool_name, parallel), "tools"
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=body.num("temperature", 1.0, min=0.0, max=1.0),
        top_p=max(body.num("top_p", 1.0, min=0.0, max=1.0), 1e-9),
        top_k=body.int("top_k", 0, min=0),
        stop=tuple(_stop_sequences(body)),
        grammar=grammar,
    )
    stream = body.bool("stream", False)
    metadata = body.obj("metadata")
    if metadata is not None:
        metadata.str("user_id")
    namespace = cache_namespace(tenant, body.str("cache_salt"))
    repair = module_repair_field(body)
    messages, prefill = _messages(body, tools)
    state.check_prompt_chars(sum(len(b.text) for m in messages for b in m.blocks)
                             + sum(len(c.arguments) for m in messages for c in m.tool_calls)
                             + sum(len(json.dumps(t.template_json())) for t in tools), "messages")
    try:
        prompt = state.engine.render(messages, registry_namespace(tenant), tools=tools, continue_final=prefill)
    except ContextLengthError as exc:
        raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from None
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None
    if grammar is not None:
        _compile(state, grammar, grammar_field)
    minimum = state.config.min_cacheable_tokens
    all_breakpoints = _prefix_ttls(prompt.breakpoints)
    breakpoints = [(n, ttl) for n, ttl in all_breakpoints if n >= minimum]
    option = parse_option(body)
    semantic = None if count_only else state.semantic_plan(
        option, tenant=tenant, namespace=namespace, flavour="anthropic-messages", messages=messages,
        sampling=sampling, has_modules=bool(prompt.modules),
        extra=[[t.name, t.description, t.parameters] for t in tools] + [tool_mode is not None, prefill])
    return _Prepared(model, sampling, stream, namespace, prompt.token_ids, breakpoints, prompt.modules, repair,
                     all_breakpoints, tool_mode is not None, tuple(t.name for t in tools), semantic)


def _compile(state: ServerState, grammar: GrammarSpec, field: str) -> None:
    try:
        state.engine.compile_grammar(grammar)
    except InvalidRequestError as exc:
        raise APIError(400, f"{field}: cannot be compiled into a grammar: {exc}", param=field) from None


def _prefix_ttls(breakpoints: tuple[tuple[int, str], ...]) -> tuple[tuple[int, str], ...]:
    """Breakpoints (in prompt order) with each TTL raised to the longest TTL of any later one: a breakpoint's
    whole prefix is cached for its TTL. Anthropic's order (tools, system, messages) has longer TTLs first, but
    a chat template may render the system text before the tools (Qwen2.5 does), so a 5m system breakpoint can
    come before a 1h tool breakpoint in the prompt."""
    result: list[tuple[int, str]] = []
    longest: str | None = None
    for n, ttl in reversed(breakpoints):
        if longest is None or TTL_SECONDS[ttl] > TTL_SECONDS[longest]:
            longest = ttl
        result.append((n, longest))
    return tuple(reversed(result))


def _tool_use(call: ToolCall) -> dict[str, Any]:
    """A parsed call as an Anthropic tool_use block, with a fresh id."""
    try:
        arguments = json.loads(call.arguments) if call.arguments.strip() else {}
    except ValueError:
        arguments = {}
    return {"type": "tool_use", "id": new_tool_use_id(), "name": call.name,
            "input": arguments if isinstance(arguments, dict) else {}}


def new_tool_use_id() -> str:
    return "toolu_" + uuid.uuid4().hex[:24]


def _content(completion: Completion, p: _Prepared) -> tuple[list[dict[str, Any]], str, str | None]:
    """The response's content blocks, stop_reason and stop_sequence."""
    stop_reason, stop_sequence = _stop(completion)
    if not p.parse_tools:
        return ([{"type": "text", "text": completion.text}] if completion.usage.completion_tokens else []), \
            stop_reason, stop_sequence
    text, calls = parse_tool_calls(completion.text, p.tool_names)
    content = [{"type": "text", "text": text}] if text or (completion.usage.completion_tokens and not calls) else []
    content += [_tool_use(call) for call in calls]
    if calls and completion.finish_reason == "stop" and stop_sequence is None:
        stop_reason = "tool_use"
    return content, stop_reason, stop_sequence


def register(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/messages")
    async def messages(request: Request):
        tenant = state.tenant(request)
        raw = await state.read_body(request)
        p = await asyncio.to_thread(_prepare, state, raw, tenant)
        rid = new_request_id()
        semantic = await state.semantic_lookup(p.semantic)
        p = replace(p, semantic_outcome=semantic)
        if semantic is not None and semantic.hit:
            submission: Any = ReplaySubmission(hit_completion(semantic, rid, p.token_ids, p.namespace, tenant))
        else:
            submission = await submit(state, p.token_ids, p.sampling, p.namespace, tenant=tenant,
                                      breakpoints=p.breakpoints, overloaded_status=529, request_id=rid,
                                      modules=p.modules, module_repair=p.module_repair if p.modules else None)
        base = {"id": "msg_" + rid, "type": "message", "role": "assistant", "model": p.model}
        headers = {"x-request-id": rid, "request-id": rid, **(semantic.headers() if semantic is not None else {})}
        if not p.stream:
            completion = await wait_for_completion(submission, request)
            if completion is None:
                return JSONResponse({}, status_code=499)  # the client has gone; nobody reads this
            content, stop_reason, stop_sequence = _content(completion, p)
            state.stats.record("messages", completion, tenant, modules=p.modules)
            _remember(state, p, completion)
            return JSONResponse({**base, "content": content, "stop_reason": stop_reason,
                                 "stop_sequence": stop_sequence, "usage": p.usage(state, completion.usage)},
                                headers=headers)
        return StreamingResponse(_events(state, submission, base, tenant, p), media_type="text/event-stream",
                                 headers={**SSE_HEADERS, **headers})


def _remember(state: ServerState, p: _Prepared, completion: Completion) -> None:
    """Store the model's answer in the semantic cache when the request opted in and missed."""
    if p.semantic_outcome is not None and not p.semantic_outcome.hit:
        state.semantic_cache().store(p.semantic_outcome, completion)


def _stop_sequences(body: Body) -> list[str]:
    items = body.list("stop_sequences") or []
    if not all(isinstance(s, str) and s for s in items):
        raise body.fail("stop_sequences", "expected an array of non-empty strings")
    return items


async def _events(state: ServerState, submission, base: dict[str, Any], tenant: str, p: _Prepared
                  ) -> AsyncIterator[str]:
    """message_start, then per content block content_block_start, content_block_delta*, content_block_stop (a text
    block: text_delta; a tool_use block: input {} at its start, then input_json_delta partial_json pieces), then
    message_delta, message_stop. Blocks are numbered 0, 1, ... in output order.

    message_start waits for the first update, so its usage already holds the real cache read and write.
    """
    blocks = _BlockEvents()
    calls = ToolCallStream(p.tool_names) if p.parse_tools else None
    try:
        started = False
        async for update in submission.updates():
            if not started:
                started = True
                usage = p.usage(state, submission.usage())
                usage["output_tokens"] = 0
                yield sse({"type": "message_start", "message": {**base, "content": [], "stop_reason": None,
                                                                "stop_sequence": None, "usage": usage}},
                          "message_start")
            if update.new_text:
                for event in blocks.events(calls.feed(update.new_text) if calls else [TextDelta(update.new_text)]):
                    yield event
        completion = await submission.completion()
        try:
            stop_reason, stop_sequence = _stop(completion)
        except APIError as exc:
            yield sse({"type": "error", "error": {"type": "api_error", "message": exc.message}}, "error")
            return
        for event in blocks.events(calls.finish() if calls else []):
            yield event
        state.stats.record("messages", completion, tenant, modules=p.modules)
        _remember(state, p, completion)
        if completion.usage.completion_tokens and blocks.next_index == 0:
            for event in blocks.events([TextDelta("")]):
                yield event
        for event in blocks.close():
            yield event
        if blocks.num_calls and completion.finish_reason == "stop" and stop_sequence is None:
            stop_reason = "tool_use"
        yield sse({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                   "usage": p.usage(state, completion.usage)}, "message_delta")
        yield sse({"type": "message_stop"}, "message_stop")
    finally:
        submission.abort_soon()


class _BlockEvents:
    """ToolCallStream events -> Anthropic content block events, with block indexes."""

    def __init__(self) -> None:
        self.next_index = 0  # of the next block to open
        self.open: str | None = None  # the type of the open block
        self.num_calls = 0

    def events(self, items: list[ToolEvent]) -> list[str]:
        out: list[str] = []
        for item in items:
            if isinstance(item, TextDelta):
                if self.open != "text":
                    out += self.close()
                    out.append(self._start({"type": "text", "text": ""}))
                    self.open = "text"
                if item.text:
                    out.append(self._delta({"type": "text_delta", "text": item.text}))
            elif isinstance(item, CallStart):
                out += self.close()
                out.append(self._start({"type": "tool_use", "id": new_tool_use_id(), "name": item.name,
                                        "input": {}}))
                self.open = "tool_use"
                self.num_calls += 1
            elif isinstance(item, ArgsDelta):
                if item.text:
                    out.append(self._delta({"type": "input_json_delta", "partial_json": item.text}))
            else:
                out += self.close()
        return out

    def close(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        return [sse({"type": "content_block_stop", "index": self.next_index - 1}, "content_block_stop")]

    def _start(self, block: dict[str, Any]) -> str:
        self.next_index += 1
        return sse({"type": "content_block_start", "index": self.next_index - 1, "content_block": block},
                   "content_block_start")

    def _delta(self, delta: dict[str, Any]) -> str:
        return sse({"type": "content_block_delta", "index": self.next_index - 1, "delta": delta},
                   "content_block_delta")
