"""OpenAI-compatible routes: /v1/chat/completions and /v1/completions.

Caching is automatic (every request reuses the longest cached prefix of its tenant's namespace);
`prompt_cache_retention: "24h"` protects the prompt's blocks under the 24-hour TTL class.
Usage: `prompt_tokens` includes cached tokens; `prompt_tokens_details.cached_tokens` is the engine's reuse.

Newer cache controls (OpenAI's shapes), mapped onto our TTL classes by rounding up (a TTL is a minimum
lifetime): "30m" -> "1h", "12h" -> "24h".
- `prompt_cache_breakpoint: {"mode": "explicit", "ttl"?: "30m" | "12h"}` on a content part (text or module part,
  any role): the prompt up to the end of that part is protected for the TTL (default: prompt_cache_options.ttl,
  else 30m). At most MAX_CACHE_BREAKPOINTS per request.
- `prompt_cache_options: {"mode"?: "implicit" | "explicit", "ttl"?: "30m" | "12h"}`: mode implicit (the default
  once the object is given) adds one breakpoint at the end of the prompt; explicit adds none, so only the
  marked parts are protected. Either way every request still reads the longest cached prefix. Without
  prompt_cache_options no implicit breakpoint is written (as before).
- A breakpoint whose prefix is shorter than --min-cacheable-tokens writes nothing (no error); where breakpoints
  nest, the blocks they share get the longest TTL among them. `prompt_cache_retention: "24h"` still protects
  the whole prompt for 24h. `usage.prompt_tokens_details.cache_write_tokens` counts what this request wrote.

Sampling beyond the basics: `n` (1..16; the prompt is computed once and counted once in usage), `logprobs`
(chat: `logprobs: true` + `top_logprobs` 0..20; completions: `logprobs` 0..5), `logit_bias` (token id ->
-100..100), `presence_penalty` / `frequency_penalty`, vLLM's `repetition_penalty`, `min_p` and `top_k`.
Logprobs are the model's raw distribution (before penalties, bias or a grammar).

Tools (chat): `tools` (type "function"; `strict` is accepted: arguments always follow the schema, by constrained
decoding), `tool_choice` ("auto" | "none" | "required" | {"type": "function", "function": {"name"}}),
`parallel_tool_calls`; histories with assistant `tool_calls` and `tool` messages. Tool definitions are rendered by
the model's chat template ahead of the conversation, so they are cached. "none" renders the tools but neither
constrains nor parses the output. The legacy `functions` / `function_call` fields are a 400 (use tools).
Parallel calls are off unless `parallel_tool_calls: true` (as llama.cpp's server: small models repeat a call
until max_tokens); with it, a call repeating an earlier one ends the output and is dropped. With "auto" a
model may also answer with a bare `{"name": ..., "arguments": ...}` object naming a tool (no tags): a call.

Structured outputs: `response_format` json_object / json_schema (chat), vLLM's `guided_json`, `guided_regex`,
`guided_choice` (both routes); at most one of these per request. Tools combine with `response_format` (as
openai-agents sends for an agent with tools and an output type): "auto" gives calls or JSON text in the
format; "required" / a named function force a call, so the format (still checked) does not apply.

Modules (chat only): a text part `{"type": "text", "text": ..., "module": true}` is a module (tokenized on its
own; its K/V are reused wherever it appears), `{"type": "module", "id": ...}` uses a module registered with
POST /v1/modules in the caller's tenant. `module_repair` picks what is recomputed where modules are assembled.
A prompt with modules gets `usage.promptstash` (prefix- and module-reused, recomputed and computed tokens).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from promptstash import tools as tool_format
from promptstash.cache.modules import ModuleRepair, ModuleSpan
from promptstash.cache.ttl import TTL_SECONDS
from promptstash.engine.engine import Completion, Prompt, Usage
from promptstash.engine.grammar import GrammarSpec
from promptstash.engine.results import TokenLogprob
from promptstash.engine.sampling import MAX_LOGPROBS, MAX_N, SamplingParams
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
from promptstash.server.validate import Body, parse_json_object, type_name
from promptstash.tools import ToolCall, ToolDef

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
FINISH_REASONS = {"stop": "stop", "length": "length"}
MAX_COMPLETION_LOGPROBS = 5
MAX_TOOLS = 128
MAX_CACHE_BREAKPOINTS = 4
CACHE_TTLS = {"30m": "1h", "12h": "24h"}  # OpenAI's TTL -> our TTL class (the next one up)
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
TOKEN_ID_KEY = re.compile(r"^(0|[1-9][0-9]{0,9})$")
MIN_REPETITION_PENALTY = 0.01  # dividing logits by a tinier penalty overflows them to inf
MIN_LOGPROB = -9999.0  # what a -inf log-probability is reported as (JSON has no infinities)
# fields we know and do not implement: silently ignoring them would change what the caller gets
UNSUPPORTED = {
    "functions": "the legacy functions field is not supported; use tools",
    "function_call": "the legacy function_call field is not supported; use tool_choice",
    "guided_grammar": "guided_grammar is not supported; use guided_json, guided_regex or guided_choice",
    "structured_outputs": "structured_outputs is not supported; use response_format, guided_json, guided_regex or "
                          "guided_choice",
    "prediction": "predicted outputs are not supported",
    "audio": "audio output is not supported",
    "web_search_options": "web search is not supported",
}


@dataclass(frozen=True)
class _CacheOptions:
    """prompt_cache_options: mode and the TTL class (ours) of the breakpoints it writes."""

    mode: str  # implicit | explicit
    ttl_class: str


@dataclass(frozen=True)
class _Options:
    model: str
    stream: bool
    include_usage: bool
    sampling: SamplingParams
    namespace: str
    tenant: str
    retention: str
    max_tokens_given: bool  # else the default, capped at what the context window leaves
    module_repair: ModuleRepair | None = None  # None: the engine's default
    cache_options: _CacheOptions | None = None  # None: prompt_cache_options not given
    tools: tuple[ToolDef, ...] = ()
    parse_tools: bool = False  # tools were given and tool_choice is not "none": output is parsed for calls


@dataclass(frozen=True)
class _Prepared:
    opts: _Options
    token_ids: list[int]
    modules: tuple[ModuleSpan, ...] = ()
    breakpoints: tuple[tuple[int, str], ...] = ()  # (prefix_len, ttl_class) to protect once computed
    semantic: SemanticPlan | None = None  # the request opted into the semantic cache (server/semantic.py)


# -- request fields --------------------------------------------------------------------------------------------

def _vocab_size(state: ServerState) -> int | None:
    return getattr(getattr(getattr(state.engine, "model", None), "config", None), "vocab_size", None)


def _logit_bias(state: ServerState, body: Body) -> tuple[tuple[int, float], ...]:
    """`logit_bias`: {"<token id>": bias in [-100, 100]}; an id outside the vocabulary is a 400."""
    bias = body.obj("logit_bias")
    if bias is None:
        return ()
    vocab = _vocab_size(state)
    items = []
    for key in bias.data:
        if not TOKEN_ID_KEY.fullmatch(key):
            raise bias.fail(key, "keys must be token ids written as decimal integers (e.g. \"1234\")")
        token_id = int(key)
        if vocab is not None and token_id >= vocab:
            raise bias.fail(key, f"token id {token_id} is outside the vocabulary (ids 0..{vocab - 1})")
        value = bias.num(key, min=-100.0, max=100.0)
        if value is None:
            raise bias.fail(key, "expected a number in [-100, 100], got null")
        items.append((token_id, value))
    return tuple(items)


def _logprobs(body: Body, kind: str) -> int | None:
    """SamplingParams.logprobs: chat `logprobs: true` + `top_logprobs`; completions `logprobs` (an integer)."""
    if kind == "text":
        if body.data.get("top_logprobs") is not None:
            raise body.fail("top_logprobs", "not supported on /v1/completions (a chat field): it takes logprobs "
                                            f"(0..{MAX_COMPLETION_LOGPROBS}) for the top tokens")
        if body.data.get("logprobs") is False:  # what chat clients send for "off"
            return None
        return body.int("logprobs", None, min=0, max=MAX_COMPLETION_LOGPROBS)
    wanted = body.bool("logprobs", False)
    top = body.int("top_logprobs", None, min=0, max=MAX_LOGPROBS)
    if top and not wanted:
        raise body.fail("top_logprobs", "top_logprobs requires logprobs: true")
    return (top or 0) if wanted else None


def _function_name(value: Body, field: str = "name") -> str:
    name = value.str(field, required=True)
    if not TOOL_NAME.fullmatch(name):
        raise value.fail(field, "a function name is 1 to 64 letters, digits, underscores or dashes, got "
                                f"{name[:80]!r}")
    return name


def _tools(body: Body) -> tuple[ToolDef, ...]:
    raw = body.list("tools")
    if not raw:  # NOTE: a tools value that is not an array is a 400 too (Body.list), even an empty one
        return ()
    if len(raw) > MAX_TOOLS:
        raise body.fail("tools", f"at most {MAX_TOOLS} tools, got {len(raw)}")
    tools: list[ToolDef] = []
    for i, item in enumerate(raw):
        where = body.name(f"tools[{i}]")
        if not isinstance(item, dict):
            raise APIError(400, f"{where}: expected an object like {{\"type\": \"function\", \"function\": "
                                "{\"name\": ...}}", param=where)
        tool = Body(item, where)
        tool.str("type", required=True, choices=("function",))
        function = tool.obj("function", required=True)
        assert function is not None
        name = _function_name(function)
        if any(t.name == name for t in tools):
            raise function.fail("name", f"two tools are named {name!r}")
        description = function.str("description")
        parameters = function.obj("parameters")
        function.bool("strict")  # arguments always follow the schema (constrained decoding), strict or not
        params = parameters.data if parameters is not None else {"type": "object", "properties": {}}
        tools.append(ToolDef(name, description, params))
    return tuple(tools)


def tools_of(body: Body) -> tuple[ToolDef, ...]:
    """The request's OpenAI `tools` as ToolDefs (400 on malformed ones)."""
    return _tools(body)


def _tool_choice(body: Body, tools: Sequence[ToolDef]) -> tuple[str, str | None]:
    """(mode, name): mode none | auto | required | named (name: the function to call)."""
    value = body.data.get("tool_choice")
    if value is None:
        return "auto", None
    if isinstance(value, str):
        mode = body.str("tool_choice", choices=("none", "auto", "required"))
        if mode == "required" and not tools:
            raise body.fail("tool_choice", "\"required\" needs tools; none were given")
        return mode, None
    choice = body.obj("tool_choice")
    if choice is None:
        raise body.fail("tool_choice", f"expected \"none\", \"auto\", \"required\" or {{\"type\": \"function\", "
                                       f"\"function\": {{\"name\": ...}}}}, got {type_name(value)}")
    choice.str("type", required=True, choices=("function",))
    function = choice.obj("function", required=True)
    assert function is not None
    name = _function_name(function)
    if name not in {t.name for t in tools}:
        known = ", ".join(repr(t.name) for t in tools) or "none were given"
        raise function.fail("name", f"no tool named {name!r} in tools ({known})")
    return "named", name


def _json_schema_value(body: Body, field: str) -> dict[str, Any] | None:
    """A JSON schema given as an object (or, for guided_json, as JSON text)."""
    value = body.data.get(field)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise body.fail(field, f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise body.fail(field, f"expected a JSON schema object, got {type_name(value)}")
    return value


def _response_format(body: Body) -> GrammarSpec | None:
    fmt = body.obj("response_format")
    if fmt is None:
        return None
    kind = fmt.str("type", "text", choices=("text", "json_object", "json_schema"))
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec.json_schema(None)
    spec = fmt.obj("json_schema", required=True)
    assert spec is not None
    _function_name(spec)
    spec.str("description")
    spec.bool("strict")  # the output always follows the schema
    schema = spec.obj("schema")
    return GrammarSpec.json_schema(schema.data if schema is not None else None)


def _compiled(state: ServerState, body: Body, field: str, spec: GrammarSpec) -> GrammarSpec:
    try:
        state.engine.compile_grammar(spec)
    except InvalidRequestError as exc:
        raise body.fail(field, f"cannot be compiled into a grammar: {exc}") from None
    return spec


def _grammar(state: ServerState, body: Body, kind: str, tools: Sequence[ToolDef]) -> GrammarSpec | None:
    """The one output constraint asked for (400 if several), compiled here so a bad one is a 400 up front.
    Tools (tool_choice not none) and response_format combine: with tool_choice auto the output is calls or
    JSON text in the format; required / named force a call, so the format (still checked) has no effect."""
    specs: list[tuple[str, GrammarSpec]] = []
    if kind == "chat":
        mode, name = _tool_choice(body, tools)
        parallel = body.bool("parallel_tool_calls") is True  # off unless asked for (small models repeat calls)
        fmt = _response_format(body)
        if tools and mode != "none":
            text_schema = None
            if fmt is not None:
                _compiled(state, body, "response_format", fmt)
                text_schema = _load_schema(fmt.source)
            specs.append(("tools", GrammarSpec.tool_calls(list(tools), mode, name, parallel, text_schema)))
        elif fmt is not None:
            specs.append(("response_format", fmt))
    elif (fmt := body.obj("response_format")) is not None and fmt.str("type", "text") != "text":
        raise body.fail("response_format", "/v1/completions takes guided_json, guided_regex or guided_choice")
    if body.data.get("guided_json") is not None:
        specs.append(("guided_json", GrammarSpec.json_schema(_json_schema_value(body, "guided_json"))))
    if (pattern := body.str("guided_regex")) is not None:
        if not pattern:
            raise body.fail("guided_regex", "must not be empty")
        specs.append(("guided_regex", GrammarSpec.regex(pattern)))
    if (choices := body.list("guided_choice")) is not None:
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise body.fail("guided_choice", "expected a non-empty array of non-empty strings")
        specs.append(("guided_choice", GrammarSpec.choice(choices)))
    if not specs:
        return None
    if len(specs) > 1:
        first, second = specs[0][0], specs[1][0]
        raise body.fail(second, f"at most one output constraint per request: {first} and {second} were both given")
    return _compiled(state, body, *specs[0])


def _load_schema(source: str) -> dict[str, Any]:
    """The schema of a json_schema GrammarSpec ("" = any object)."""
    return {"type": "object"} if source == "" else json.loads(source)


def _cache_options(body: Body) -> _CacheOptions | None:
    options = body.obj("prompt_cache_options")
    if options is None:
        return None
    mode = options.str("mode", "implicit", choices=("implicit", "explicit"))
    ttl = options.str("ttl", "30m", choices=tuple(CACHE_TTLS))
    return _CacheOptions(mode, CACHE_TTLS[ttl])


def _options(state: ServerState, body: Body, tenant: str, kind: str) -> _Options:
    model = body.str("model", required=True)
    state.check_model(model)
    for name, message in UNSUPPORTED.items():
        if body.data.get(name) is not None:
            raise body.fail(name, message)
    tools = _tools(body) if kind == "chat" else ()
    if kind == "text" and body.list("tools"):
        raise body.fail("tools", "/v1/completions does not take tools; use /v1/chat/completions")
    grammar = _grammar(state, body, kind, tools)
    body.str("user")
    body.str("prompt_cache_key")  # routing hint for multi-replica setups; one engine here needs none
    retention = body.str("prompt_cache_retention", "in_memory", choices=("in_memory", "24h"))
    stream = body.bool("stream", False)
    stream_options = body.obj("stream_options")
    include_usage = bool(stream_options and stream_options.bool("include_usage", False))
    limit = state.engine.max_model_len
    legacy = body.int("max_tokens", None, min=0, max=limit)  # checked even when the newer field wins
    max_tokens = body.int("max_completion_tokens", None, min=0, max=limit)
    if max_tokens is None:
        max_tokens = legacy
    sampling = SamplingParams(
        max_tokens=state.config.default_max_tokens if max_tokens is None else max_tokens,
        temperature=body.num("temperature", 1.0, min=0.0, max=2.0),
        top_p=max(body.num("top_p", 1.0, min=0.0, max=1.0), 1e-9),
        top_k=body.int("top_k", 0, min=0),
        seed=body.int("seed", min=-(2**63), max=2**64 - 1),  # torch.Generator.manual_seed's range
        stop=body.stop("stop", 4),
        ignore_eos=body.bool("ignore_eos", False),
        n=body.int("n", 1, min=1, max=MAX_N),
        logprobs=_logprobs(body, kind),
        logit_bias=_logit_bias(state, body),
        presence_penalty=body.num("presence_penalty", 0.0, min=-2.0, max=2.0),
        frequency_penalty=body.num("frequency_penalty", 0.0, min=-2.0, max=2.0),
        repetition_penalty=_repetition_penalty(body),
        min_p=body.num("min_p", 0.0, min=0.0, max=1.0),
        grammar=grammar,
    )
    salt = body.str("cache_salt")
    repair = module_repair_field(body)
    parse_tools = bool(tools) and grammar is not None and grammar.kind == "tool_calls"
    return _Options(model, stream, include_usage, sampling, cache_namespace(tenant, salt), tenant, retention,
                    max_tokens is not None, repair, _cache_options(body), tools, parse_tools)


def _repetition_penalty(body: Body) -> float:
    """vLLM's repetition_penalty, in [MIN_REPETITION_PENALTY, 2] (1 = off)."""
    return body.num("repetition_penalty", 1.0, min=MIN_REPETITION_PENALTY, max=2.0)


# -- messages --------------------------------------------------------------------------------------------------

def chat_messages_of(body: Body) -> list[ChatMessage]:
    """The request's `messages` as ChatMessages (400 on malformed ones)."""
    return _chat_messages(body)


def _chat_messages(body: Body, default_ttl: str = CACHE_TTLS["30m"]) -> list[ChatMessage]:
    """default_ttl: the TTL class of a prompt_cache_breakpoint that names none."""
    raw = body.list("messages", required=True)
    if not raw:
        raise body.fail("messages", "must contain at least one message")
    messages = []
    calls: dict[str, str] = {}  # tool call id -> function name, from earlier assistant messages
    for i, item in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{where}: expected an object", param=where)
        m = Body(item, where)
        role = m.str("role", required=True)
        if role == "function":
            raise m.fail("role", "the legacy \"function\" role is not supported; use \"tool\" with tool_call_id")
        if role not in ROLES:
            raise m.fail("role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        content = item.get("content")
        if isinstance(content, str):
            blocks: tuple[TextBlock, ...] = (TextBlock(content),)
        elif isinstance(content, list):
            blocks = tuple(_content_part(part, f"{where}.content[{j}]", f"{where}.content", default_ttl)
                           for j, part in enumerate(content))
        elif content is None and role == "assistant":
            blocks = (TextBlock(""),)
        else:
            raise m.fail("content", "expected a string or an array of text parts")
        tool_calls: tuple[ToolCall, ...] = ()
        tool_call_id = name = None
        if role == "assistant":
            tool_calls = _assistant_tool_calls(m)
            calls.update((c.id, c.name) for c in tool_calls)
        elif role == "tool":
            tool_call_id = m.str("tool_call_id", required=True)
            if tool_call_id not in calls:
                raise m.fail("tool_call_id", f"{tool_call_id[:80]!r} matches no tool call of an earlier assistant "
                                             "message")
            name = calls[tool_call_id]
        elif item.get("tool_calls") is not None:
            raise m.fail("tool_calls", "only assistant messages carry tool_calls")
        messages.append(ChatMessage(ROLES[role], blocks, tool_calls, tool_call_id, name))
    return messages


def _assistant_tool_calls(m: Body) -> tuple[ToolCall, ...]:
    raw = m.list("tool_calls")
    calls = []
    for j, item in enumerate(raw or ()):
        where = m.name(f"tool_calls[{j}]")
        if not isinstance(item, dict):
            raise APIError(400, f"{where}: expected an object like {{\"id\": ..., \"type\": \"function\", "
                                "\"function\": {\"name\": ..., \"arguments\": ...}}", param=where)
        call = Body(item, where)
        call_id = call.str("id", required=True)
        call.str("type", "function", choices=("function",))
        function = call.obj("function", required=True)
        assert function is not None
        name = function.str("name", required=True)
        arguments = function.str("arguments", required=True) or "{}"
        try:
            parsed = json.loads(arguments)
        except ValueError as exc:
            raise function.fail("arguments", f"expected the JSON text of an object, got text that is not valid "
                                             f"JSON ({exc})") from None
        if not isinstance(parsed, dict):
            raise function.fail("arguments", f"expected the JSON text of an object, got {type_name(parsed)}")
        calls.append(ToolCall(call_id, name, arguments))
    return tuple(calls)


def _content_part(part: Any, where: str, param: str, default_ttl: str = CACHE_TTLS["30m"]) -> TextBlock:
    """A text part (`"module": true` makes it a module) or `{"type": "module", "id": ...}`; either may carry
    a `prompt_cache_breakpoint`."""
    if not isinstance(part, dict):
        raise APIError(400, f"{where}: only text parts are supported ({{\"type\": \"text\", \"text\": ...}}), "
                            "and module parts ({\"type\": \"module\", \"id\": ...})", param=param)
    module = module_flag(part, where)
    ttl = _breakpoint(part, where, default_ttl)
    kind = part.get("type")
    if kind == "module":
        return TextBlock("", ttl_class=ttl, module_id=module_id_field(part, where))
    if kind == "text" and isinstance(part.get("text"), str):
        if module and not part["text"]:
            raise APIError(400, f"{where}.text: a module must not be empty", param=f"{where}.text")
        return TextBlock(part["text"], ttl_class=ttl, module=module)
    if module and kind != "text":
        raise APIError(400, f"{where}: only text parts can be modules (\"module\": true), got type {kind!r}",
                       param=f"{where}.module")
    raise APIError(400, f"{where}: only text parts are supported ({{\"type\": \"text\", \"text\": ...}}), "
                        "and module parts ({\"type\": \"module\", \"id\": ...})", param=param)


def _breakpoint(part: dict[str, Any], where: str, default_ttl: str) -> str | None:
    """The TTL class of a part's `prompt_cache_breakpoint` ({"mode": "explicit", "ttl"?}), None if absent."""
    holder = Body(part, where)
    value = holder.obj("prompt_cache_breakpoint")
    if value is None:
        return None
    value.str("mode", required=True, choices=("explicit",))
    ttl = value.str("ttl", None, choices=tuple(CACHE_TTLS))
    return default_ttl if ttl is None else CACHE_TTLS[ttl]


def _integral(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer())


def _completion_prompt(body: Body) -> Prompt:
    prompt = body.data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise body.fail("prompt", "must not be empty")
        return prompt
    if isinstance(prompt, list) and prompt and all(_integral(t) for t in prompt):
        return [int(t) for t in prompt]  # 147.0 is 147, as for every other integer field (Body.int)
    if prompt is None:
        raise body.fail("prompt", "field required")
    raise body.fail("prompt", "expected a non-empty string or array of token ids (one prompt per request)")


# -- preparing (worker thread) ---------------------------------------------------------------------------------

def _breakpoints(state: ServerState, opts: _Options, prompt_len: int, marked: Sequence[tuple[int, str]]
                 ) -> tuple[tuple[int, str], ...]:
    """What the request protects: marked parts and the implicit breakpoint (when prompt_cache_options asks for
    it) that reach --min-cacheable-tokens, with shared blocks under the longest TTL; and
    prompt_cache_retention "24h" (the whole prompt, as before)."""
    minimum = state.config.min_cacheable_tokens
    points = [(n, ttl) for n, ttl in marked if n >= minimum]
    if opts.cache_options is not None and opts.cache_options.mode == "implicit" and prompt_len >= minimum:
        points.append((prompt_len, opts.cache_options.ttl_class))
    if opts.retention == "24h":
        points.append((prompt_len, "24h"))
    points.sort()
    order = list(TTL_SECONDS)  # shortest first
    longest = None
    result: list[tuple[int, str]] = []
    for n, ttl in reversed(points):  # a block takes the class of the first breakpoint covering it
        if longest is None or order.index(ttl) > order.index(longest):
            longest = ttl
        result.append((n, longest))
    return tuple(reversed(result))


def _prepare_chat(state: ServerState, raw: bytes, tenant: str) -> _Prepared:
    """Body bytes -> options, prompt tokens, module spans and cache breakpoints: JSON, validation, grammar
    compiling, the character cap, the chat template and the tokenizer (module ids resolve in the request's
    namespace). Runs on a worker thread: none of it may hold up the event loop."""
    body = Body(parse_json_object(raw, state.config.max_body_bytes))
    opts = _options(state, body, tenant, "chat")
    default_ttl = opts.cache_options.ttl_class if opts.cache_options is not None else CACHE_TTLS["30m"]
    messages = _chat_messages(body, default_ttl)
    marked = sum(b.ttl_class is not None for m in messages for b in m.blocks)
    if marked > MAX_CACHE_BREAKPOINTS:
        raise body.fail("messages", f"at most {MAX_CACHE_BREAKPOINTS} content parts may carry a "
                                    f"prompt_cache_breakpoint, found {marked}")
    state.check_prompt_chars(sum(len(b.text) for m in messages for b in m.blocks), "messages")
    try:
        if opts.tools:
            rendered = state.engine.render(messages, registry_namespace(tenant), tools=opts.tools)
        else:
            rendered = state.engine.render(messages, registry_namespace(tenant))
    except ContextLengthError as exc:
        raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from None
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None
    breakpoints = _breakpoints(state, opts, len(rendered.token_ids), rendered.breakpoints)
    semantic = state.semantic_plan(
        parse_option(body), tenant=tenant, namespace=opts.namespace, flavour="openai-chat", messages=messages,
        sampling=opts.sampling, has_modules=bool(rendered.modules),
        extra=[[t.name, t.description, t.parameters] for t in opts.tools] + [opts.parse_tools])
    return _Prepared(opts, rendered.token_ids, rendered.modules, breakpoints, semantic)


def _prepare_completion(state: ServerState, raw: bytes, tenant: str) -> _Prepared:
    """As _prepare_chat, for /v1/completions (a text prompt or token ids)."""
    body = Body(parse_json_object(raw, state.config.max_body_bytes))
    opts = _options(state, body, tenant, "text")
    if body.bool("echo", False):
        raise body.fail("echo", "echo is not supported")
    if body.str("suffix"):
        raise body.fail("suffix", "suffix is not supported")
    if body.int("best_of", 1) != 1:
        raise body.fail("best_of", "only best_of=1 is supported")
    if parse_option(body).requested:
        raise body.fail("semantic_cache", "the semantic cache needs a last user message: use /v1/chat/completions")
    prompt = _completion_prompt(body)
    if isinstance(prompt, str):
        state.check_prompt_chars(len(prompt), "prompt")
        try:
            token_ids = state.engine.tokenize(prompt)
        except ContextLengthError as exc:
            raise APIError(400, str(exc), param="prompt", code="context_length_exceeded") from None
        except ValueError as exc:
            raise APIError(400, str(exc), param="prompt") from None
    else:
        token_ids = list(prompt)
    return _Prepared(opts, token_ids, (), _breakpoints(state, opts, len(token_ids), ()))


# -- responses -------------------------------------------------------------------------------------------------

def usage_json(usage: Usage, extension: dict[str, Any] | None = None) -> dict[str, Any]:
    """OpenAI usage; `extension` (usage_extension: a prompt with modules) is added as usage.promptstash."""
    doc = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens,
                                  "cache_write_tokens": usage.num_cache_write_tokens},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    if extension is not None:
        doc["promptstash"] = extension
    return doc


def _finish_reason(completion: Completion) -> str:
    if completion.finish_reason not in FINISH_REASONS:
        raise APIError(500, f"generation failed (finish reason {completion.finish_reason!r})")
    return FINISH_REASONS[completion.finish_reason]


class _TokenText:
    """Each token's text and UTF-8 bytes for logprobs (decoded once per id)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        found = self._cache.get(token_id)
        if found is None:
            tok = self._tokenizer
            text = tok.decode([token_id], skip_special_tokens=False) if tok is not None else ""
            token_bytes = getattr(tok, "token_bytes", None)
            raw = token_bytes(token_id) if token_bytes is not None else text.encode("utf-8")
            found = self._cache[token_id] = (text, list(raw))
        return found


def _logprob(value: float) -> float:
    return max(float(value), MIN_LOGPROB)


def _chat_logprobs(items: Sequence[TokenLogprob], text_of: _TokenText) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = text_of(token_id)
        return {"token": text, "logprob": _logprob(logprob), "bytes": raw}

    return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                        for t in items], "refusal": None}


def _text_logprobs(items: Sequence[TokenLogprob], text_of: _TokenText, k: int, offset: int) -> dict[str, Any]:
    """/v1/completions logprobs; offset: the characters of output before these tokens."""
    tokens, offsets = [], []
    for t in items:
        text = text_of(t.token_id)[0]
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    top = [{text_of(i)[0]: _logprob(lp) for i, lp in t.top} for t in items] if k else None
    return {"tokens": tokens, "token_logprobs": [_logprob(t.logprob) for t in items], "top_logprobs": top,
            "text_offset": offsets}


def _tool_calls_json(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def _chat_choice(sample: Completion, opts: _Options, text_of: _TokenText) -> dict[str, Any]:
    reason = _finish_reason(sample)
    message: dict[str, Any] = {"role": "assistant", "content": sample.text, "refusal": None}
    if opts.parse_tools:
        content, calls = tool_format.parse_tool_calls(sample.text, [t.name for t in opts.tools])
        if calls:
            message["content"] = content or None
            message["tool_calls"] = _tool_calls_json(calls)
            if reason == "stop":
                reason = "tool_calls"
    logprobs = _chat_logprobs(sample.logprobs or (), text_of) if opts.sampling.logprobs is not None else None
    return {"index": sample.index, "message": message, "logprobs": logprobs, "finish_reason": reason}


def _text_choice(sample: Completion, opts: _Options, text_of: _TokenText) -> dict[str, Any]:
    k = opts.sampling.logprobs
    logprobs = _text_logprobs(sample.logprobs or (), text_of, k, 0) if k is not None else None
    return {"index": sample.index, "text": sample.text, "logprobs": logprobs, "finish_reason": _finish_reason(sample)}


def register(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        tenant = state.tenant(request)
        raw = await state.read_body(request)
        prepared = await asyncio.to_thread(_prepare_chat, state, raw, tenant)
        return await _respond(state, request, "chat", prepared)

    @app.post("/v1/completions")
    async def completions(request: Request):
        tenant = state.tenant(request)
        raw = await state.read_body(request)
        prepared = await asyncio.to_thread(_prepare_completion, state, raw, tenant)
        return await _respond(state, request, "text", prepared)


async def _respond(state: ServerState, request: Request, kind: str, prepared: _Prepared):
    opts, token_ids, modules = prepared.opts, prepared.token_ids, prepared.modules
    if not opts.max_tokens_given:  # as OpenAI does: never more than the context window leaves
        room = max(1, state.engine.max_model_len - len(token_ids))
        opts = replace(opts, sampling=replace(opts.sampling, max_tokens=min(opts.sampling.max_tokens, room)))
    rid = new_request_id()
    semantic: SemanticOutcome | None = await state.semantic_lookup(prepared.semantic)
    if semantic is not None and semantic.hit:
        submission: Any = ReplaySubmission(hit_completion(semantic, rid, token_ids, opts.namespace, opts.tenant))
    else:
        submission = await submit(state, token_ids, opts.sampling, opts.namespace, tenant=opts.tenant,
                                  breakpoints=prepared.breakpoints, request_id=rid, modules=modules,
                                  module_repair=opts.module_repair if modules else None)
    text_of = _TokenText(state.engine.tokenizer)

    def usage(u: Usage) -> dict[str, Any]:
        return with_label(usage_json(u, usage_extension(u, bool(modules), opts.module_repair,
                                                        state.engine.default_module_repair)), semantic)

    def remember(completion: Completion) -> None:
        if semantic is not None and not semantic.hit:
            state.semantic_cache().store(semantic, completion)

    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    obj = "chat.completion" if kind == "chat" else "text_completion"
    created = int(time.time())
    headers = {"x-request-id": rid, **(semantic.headers() if semantic is not None else {})}
    base = {"id": prefix + rid, "object": obj, "created": created, "model": opts.model, "system_fingerprint": None}

    if not opts.stream:
        completion = await wait_for_completion(submission, request)
        if completion is None:
            return JSONResponse({}, status_code=499)  # the client has gone; nobody reads this
        state.stats.record(kind, completion, opts.tenant, modules=modules)
        remember(completion)
        choice = _chat_choice if kind == "chat" else _text_choice
        choices = [choice(sample, opts, text_of) for sample in completion.samples]
        return JSONResponse({**base, "choices": choices, "usage": usage(completion.usage)}, headers=headers)

    chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    extra = {"usage": None} if opts.include_usage else {}
    streams = [_ChoiceStream(kind, index, opts, text_of) for index in range(opts.sampling.n)]

    def chunk(choices: list[dict[str, Any]]) -> str:
        return sse({**base, "object": chunk_obj, "choices": choices, **extra})

    async def events() -> AsyncIterator[str]:
        try:
            if kind == "chat":
                for s in streams:
                    yield chunk([s.first()])
            async for update in submission.updates():
                s = streams[update.index] if 0 <= update.index < len(streams) else streams[0]
                for choice in s.feed(update.new_text, update.new_logprobs):
                    yield chunk([choice])
                if update.sample_finish_reason is not None and update.sample_finish_reason in FINISH_REASONS:
                    for choice in s.finish(update.sample_finish_reason):
                        yield chunk([choice])
            completion = await submission.completion()
            failed = [c.finish_reason for c in completion.samples if c.finish_reason not in FINISH_REASONS]
            if failed:
                yield sse({"error": {"message": f"generation failed ({failed[0]})", "type": "server_error",
                                     "param": None, "code": None}})
                return
            state.stats.record(kind, completion, opts.tenant, modules=modules)
            remember(completion)
            for s, sample in zip(streams, completion.samples, strict=False):
                for choice in s.finish(sample.finish_reason):  # samples whose end no update named
                    yield chunk([choice])
            if opts.include_usage:
                yield sse({**base, "object": chunk_obj, "choices": [], "usage": usage(completion.usage)})
            yield sse("[DONE]")
        finally:
            submission.abort_soon()  # a client that went away frees its blocks now (no-op once complete)

    return StreamingResponse(events(), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})


class _ChoiceStream:
    """One choice's streamed chunks: text (and tool call) deltas with their logprobs, then its finish."""

    def __init__(self, kind: str, index: int, opts: _Options, text_of: _TokenText) -> None:
        self.kind = kind
        self.index = index
        self.opts = opts
        self.text_of = text_of
        self.finished = False
        self.offset = 0  # characters of output so far (completions' text_offset)
        self.tools = ToolDeltas([t.name for t in opts.tools]) if opts.parse_tools else None

    def first(self) -> dict[str, Any]:
        return {"index": self.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def _logprobs(self, items: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        k = self.opts.sampling.logprobs
        if k is None or not items:
            return None
        if self.kind == "chat":
            return _chat_logprobs(items, self.text_of)
        return _text_logprobs(items, self.text_of, k, self.offset)

    def feed(self, text: str, logprobs: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
        if self.finished or (not text and not logprobs):
            return []
        lp = self._logprobs(logprobs)
        if self.kind == "text":
            self.offset += sum(len(self.text_of(t.token_id)[0]) for t in logprobs)
            return [{"index": self.index, "text": text, "logprobs": lp, "finish_reason": None}]
        deltas = self.tools.feed(text) if self.tools is not None else ([{"content": text}] if text else [])
        if lp is not None and not deltas:
            deltas = [{}]  # the tokens' logprobs go out even while their text is held back
        return [{"index": self.index, "delta": d, "logprobs": lp if i == 0 else None, "finish_reason": None}
                for i, d in enumerate(deltas)]

    def finish(self, reason: str) -> list[dict[str, Any]]:
        if self.finished:
            return []
        self.finished = True
        reason = FINISH_REASONS.get(reason, reason)
        if self.kind == "text":
            return [{"index": self.index, "text": "", "logprobs": None, "finish_reason": reason}]
        choices = []
        if self.tools is not None:
            choices = [{"index": self.index, "delta": d, "logprobs": None, "finish_reason": None}
                       for d in self.tools.close()]
            if self.tools.num_calls and reason == "stop":
                reason = "tool_calls"
        return choices + [{"index": self.index, "delta": {}, "logprobs": None, "finish_reason": reason}]


class ToolDeltas:
    """Streamed chat text -> OpenAI deltas: {"content": ...} for text, and per tool call
    {"tool_calls": [{"index", "id", "type", "function": {"name", "arguments": ""}}]} once its name is known,
    then {"tool_calls": [{"index", "function": {"arguments": "..."}}]} argument deltas. names: the tools' (a
    bare call naming one is a call)."""

    def __init__(self, names: Sequence[str] = ()) -> None:
        self._stream = tool_format.ToolCallStream(names)
        self.num_calls = 0

    def _deltas(self, events: Sequence[tool_format.ToolEvent]) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        for event in events:
            if isinstance(event, tool_format.TextDelta):
                if event.text:
                    deltas.append({"content": event.text})
            elif isinstance(event, tool_format.CallStart):
                self.num_calls = max(self.num_calls, event.index + 1)
                deltas.append({"tool_calls": [{"index": event.index, "id": event.id, "type": "function",
                                               "function": {"name": event.name, "arguments": ""}}]})
            elif isinstance(event, tool_format.ArgsDelta) and event.text:
                deltas.append({"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]})
        return deltas

    def feed(self, text: str) -> list[dict[str, Any]]:
        return self._deltas(self._stream.feed(text)) if text else []

    def close(self) -> list[dict[str, Any]]:
        return self._deltas(self._stream.finish())
