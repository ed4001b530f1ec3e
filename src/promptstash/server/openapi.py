"""The server's OpenAPI 3.1 document (served at /openapi.json).

The model routes take a raw Request and parse their JSON by hand (validate.py), so FastAPI's generated
document has no request bodies. This module starts from FastAPI's document and adds what the routes really
accept: request-body schemas for POST /v1/chat/completions, /v1/completions and /v1/messages, the query and
path parameters of the GET /v1/cache/* routes, the status codes each route returns and the two ways to send
an API key. Schemas allow unknown fields (as the routes do: they ignore what they do not know), and give
the limits the routes enforce (ranges, enums, the served model names, the context window), so a request that
fits the schema is accepted unless it breaks a rule JSON Schema cannot state (prompt + max_tokens must fit
the context window; Anthropic's at most 4 cache breakpoints, longer TTLs first; a module id must be registered
in the caller's tenant). Such requests get a 400.

Modules: chat content parts / Anthropic text blocks may carry `"module": true`, and a part
`{"type": "module", "id": ...}` uses a module registered with POST /v1/modules (GET lists, DELETE forgets);
`module_repair` picks the repair strategy; a prompt with modules gets `usage.promptstash` (UsageExtension).
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from promptstash.cache.modules import MODULE_ID_PATTERN
from promptstash.cache.ttl import TTL_SECONDS
from promptstash.server.common import MODULE_REPAIR_PATTERN

JSON = "application/json"
SSE = "text/event-stream"

BEARER = "bearerAuth"
API_KEY = "apiKeyHeader"
QUERY_KEY = "apiKeyQuery"
OPEN_ROUTES = {"/health"}  # every other route takes a key when keys are configured


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` or null: the routes treat a null field as an absent one."""
    return {"anyOf": [schema, {"type": "null"}]}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _object(properties: dict[str, Any], required: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": True, **extra}
    if required:
        schema["required"] = list(required)
    return schema


# -- request bodies --------------------------------------------------------------------------------------------

def _sampling_common(max_model_len: int) -> dict[str, Any]:
    """Fields both API flavours read the same way (temperature ranges differ and are set by the callers)."""
    return {
        "max_tokens": _nullable({"type": "integer", "minimum": 0, "maximum": max_model_len,
                                 "description": "tokens to generate; prompt + max_tokens must fit the context "
                                                "window"}),
        "top_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
        "top_k": _nullable({"type": "integer", "minimum": 0, "description": "0 = off"}),
        "stream": _nullable({"type": "boolean"}),
        "cache_salt": _nullable({"type": "string", "description": "isolates the cache: requests with different "
                                                                  "salts never share cached blocks"}),
        "module_repair": _nullable({"type": "string", "pattern": MODULE_REPAIR_PATTERN.pattern,
                                    "description": "what is recomputed where cached modules are assembled: none "
                                                   "(concatenate as loaded), legolink[:K] (the first K tokens of each "
                                                   "module), cacheblend[:R] (the fraction R of module tokens that "
                                                   "deviate most), full (everything); default: the server's"}),
    }


MODULE_ID = {"type": "string", "pattern": MODULE_ID_PATTERN.pattern,
             "description": "the id of a module registered with POST /v1/modules by this API key's tenant"}


def _text_parts(extra: dict[str, Any]) -> dict[str, Any]:
    """A text part (extra: more properties, e.g. cache_control); `"module": true` makes it a module, whose text
    must not be empty."""
    plain = _object({"type": {"type": "string", "const": "text"}, "text": {"type": "string"},
                     "module": _nullable({"type": "boolean", "const": False}), **extra}, ("type", "text"))
    module = _object({"type": {"type": "string", "const": "text"}, "text": {"type": "string", "minLength": 1},
                      "module": {"type": "boolean", "const": True,
                                 "description": "a module: tokenized on its own, its K/V reused wherever it "
                                                "appears"}, **extra}, ("type", "text", "module"))
    return {"anyOf": [plain, module]}


def _module_part(extra: dict[str, Any]) -> dict[str, Any]:
    return _object({"type": {"type": "string", "const": "module"}, "id": MODULE_ID,
                    "module": _nullable({"type": "boolean"}), **extra}, ("type", "id"),
                   description="a registered module, used without resending its text")


def _id_pattern(vocab_size: int | None) -> str:
    """A regex for the decimal token ids 0 .. vocab_size - 1 (no leading zeros): logit_bias keys."""
    if not vocab_size:
        return r"^(0|[1-9][0-9]{0,9})$"
    top = str(vocab_size - 1)
    options = ["[0-9]"] if len(top) > 1 else [f"[0-{top}]"]
    options += [f"[1-9][0-9]{{{n}}}" for n in range(1, len(top) - 1)]
    if len(top) > 1:
        for i, digit in enumerate(top):  # same first i digits as top, then a smaller digit, then anything
            low = "1" if i == 0 else "0"
            if int(digit) > int(low):
                options.append(f"{top[:i]}[{low}-{int(digit) - 1}][0-9]{{{len(top) - i - 1}}}")
        options.append(top)
    return "^(" + "|".join(options) + ")$"


OUTPUT_CONSTRAINTS = "At most one output constraint per request: response_format json_object / json_schema, " \
                     "guided_json, guided_regex, guided_choice, or tools that may be called (tool_choice not " \
                     "\"none\"); tools combine with response_format (tool_choice auto: calls or JSON text in the " \
                     "format; required / a named function: a call)."
CACHE_TTL = {"type": "string", "enum": ["30m", "12h"],
             "description": "a minimum lifetime, mapped onto the next TTL class up: 30m -> 1h, 12h -> 24h"}
FUNCTION_NAME = {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"}
NOT_SUPPORTED = {"type": "null", "description": "not supported (a value is a 400)"}


def _openai_options(model_names: list[str], max_model_len: int, vocab_size: int | None) -> dict[str, Any]:
    """Fields both OpenAI routes read the same way."""
    schema_object = {"type": "object", "description": "a JSON schema, compiled into a grammar (a schema the grammar "
                                                      "library cannot compile is a 400 naming the problem)"}
    return {
        "model": {"type": "string", "enum": model_names},
        **_sampling_common(max_model_len),
        "max_completion_tokens": _nullable({"type": "integer", "minimum": 0, "maximum": max_model_len,
                                            "description": "wins over max_tokens"}),
        "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2, "description": "0 = greedy"}),
        "seed": _nullable({"type": "integer", "minimum": -(2**63), "maximum": 2**64 - 1}),
        "stop": _nullable({"oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4},
        ], "description": "up to 4 non-empty stop strings, never included in the output"}),
        "stream_options": _nullable(_object({"include_usage": _nullable({"type": "boolean"})})),
        "n": _nullable({"type": "integer", "minimum": 1, "maximum": 16,
                        "description": "choices of one prompt: the prompt is computed once and counted once"}),
        "user": _nullable({"type": "string"}),
        "prompt_cache_key": _nullable({"type": "string", "description": "accepted; one engine needs no routing "
                                                                        "hint"}),
        "prompt_cache_retention": _nullable({"type": "string", "enum": ["in_memory", "24h"],
                                             "description": "24h protects the prompt's blocks for 24 hours"}),
        "prompt_cache_options": _nullable(_object({
            "mode": _nullable({"type": "string", "enum": ["implicit", "explicit"],
                               "description": "implicit (default): one more breakpoint at the end of the prompt; "
                                              "explicit: only prompt_cache_breakpoint parts are protected"}),
            "ttl": _nullable({**CACHE_TTL, "description": "the breakpoints' TTL (default 30m): 30m -> 1h, 12h -> "
                                                          "24h"})})),
        "ignore_eos": _nullable({"type": "boolean"}),
        "presence_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
        "frequency_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
        "repetition_penalty": _nullable({"type": "number", "minimum": 0.01, "maximum": 2,
                                         "description": "vLLM's: > 1 discourages tokens of the prompt and output"}),
        "min_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
        "logit_bias": _nullable({"type": "object", "propertyNames": {"pattern": _id_pattern(vocab_size)},
                                 "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                                 "description": "token id (a decimal string) -> bias added to its logit"}),
        "guided_json": _nullable(schema_object),
        "guided_regex": _nullable({"type": "string", "minLength": 1, "description": "the output matches this regex"}),
        "guided_choice": _nullable({"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
                                    "description": "the output is one of these strings"}),
        **{name: _nullable(NOT_SUPPORTED) for name in ("functions", "function_call", "guided_grammar",
                                                        "structured_outputs", "prediction", "audio",
                                                        "web_search_options")},
    }


def _openai_part(text_part: bool) -> dict[str, Any]:
    extra = {"prompt_cache_breakpoint": _nullable(_object(
        {"mode": {"type": "string", "const": "explicit"},
         "ttl": _nullable({**CACHE_TTL, "description": "default: prompt_cache_options.ttl, else 30m"})}, ("mode",),
        description="protects the prompt up to the end of this part (at most 4 per request)"))}
    return _text_parts(extra) if text_part else _module_part(extra)


def _chat_request(model_names: list[str], max_model_len: int, vocab_size: int | None = None) -> dict[str, Any]:
    part = {"anyOf": [_openai_part(True), _openai_part(False)]}
    content = {"oneOf": [{"type": "string"}, {"type": "array", "items": part}],
               "description": "a string or an array of text parts (`\"module\": true` marks a module) and module "
                              "parts"}
    text_content = {"oneOf": [{"type": "string"}, {"type": "array", "items": _openai_part(True)}]}
    tool_call = _object({"id": {"type": "string"}, "type": _nullable({"type": "string", "const": "function"}),
                         "function": _object({"name": {"type": "string"},
                                              "arguments": {"type": "string",
                                                            "description": "the JSON text of an object"}},
                                             ("name", "arguments"))}, ("id", "function"))
    message = {"oneOf": [
        _object({"role": {"type": "string", "enum": ["system", "developer", "user"]}, "content": content},
                ("role", "content")),
        _object({"role": {"type": "string", "const": "assistant"}, "content": _nullable(content),
                 "tool_calls": _nullable({"type": "array", "items": tool_call})}, ("role",)),
        _object({"role": {"type": "string", "const": "tool"}, "content": text_content,
                 "tool_call_id": {"type": "string", "description": "the id of a tool call of an earlier assistant "
                                                                   "message"}}, ("role", "content", "tool_call_id")),
    ]}
    tool = _object({"type": {"type": "string", "const": "function"}, "function": _object({
        "name": FUNCTION_NAME, "description": _nullable({"type": "string"}),
        "parameters": _nullable({"type": "object", "description": "the arguments' JSON schema"}),
        "strict": _nullable({"type": "boolean", "description": "accepted: arguments always follow the schema"}),
    }, ("name",))}, ("type", "function"))
    json_schema = _object({"name": FUNCTION_NAME, "description": _nullable({"type": "string"}),
                           "schema": _nullable({"type": "object"}), "strict": _nullable({"type": "boolean"})},
                          ("name",))
    response_format = {"anyOf": [
        _object({"type": _nullable({"type": "string", "enum": ["text", "json_object"]})}),
        _object({"type": {"type": "string", "const": "json_schema"}, "json_schema": json_schema},
                ("type", "json_schema")),
    ]}
    tool_choice = {"oneOf": [
        {"type": "string", "enum": ["none", "auto", "required"]},
        _object({"type": {"type": "string", "const": "function"},
                 "function": _object({"name": FUNCTION_NAME}, ("name",))}, ("type", "function")),
    ], "description": "required / a named function need tools; the name must be one of theirs"}
    logprobs_rule = {"if": {"properties": {"top_logprobs": {"type": "integer", "minimum": 1}},
                            "required": ["top_logprobs"]},
                     "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}}
    return _object({**_openai_options(model_names, max_model_len, vocab_size),
                    "messages": {"type": "array", "items": message, "minItems": 1},
                    "logprobs": _nullable({"type": "boolean"}),
                    "top_logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": 20,
                                               "description": "above 0 needs logprobs: true"}),
                    "tools": _nullable({"type": "array", "items": tool, "maxItems": 128,
                                        "description": "function names must differ"}),
                    "tool_choice": _nullable(tool_choice),
                    "parallel_tool_calls": _nullable({"type": "boolean", "description": "several calls in one "
                                                      "answer only when true (default: one)"}),
                    "response_format": _nullable(response_format)},
                   ("model", "messages"), allOf=[logprobs_rule], description=OUTPUT_CONSTRAINTS)


def _completion_request(model_names: list[str], max_model_len: int, vocab_size: int | None) -> dict[str, Any]:
    token: dict[str, Any] = {"type": "integer", "minimum": 0}
    if vocab_size:
        token["maximum"] = vocab_size - 1
    tokens = {"type": "array", "items": token, "minItems": 1}
    text = {"type": "string", "minLength": 1}
    prompt = {"oneOf": [text, tokens, {"type": "array", "items": {"oneOf": [text, tokens]}, "minItems": 1,
                                       "maxItems": 1}],
              "description": "one prompt: a non-empty string or token ids (or a one-element array of either)"}
    return _object({**_openai_options(model_names, max_model_len, vocab_size), "prompt": prompt,
                    "logprobs": _nullable({"anyOf": [{"type": "integer", "minimum": 0, "maximum": 5},
                                                     {"type": "boolean", "const": False}],
                                           "description": "each output token's log-probability and the top N; "
                                                          "false: off"}),
                    "top_logprobs": _nullable({**NOT_SUPPORTED, "description": "a chat field: use logprobs"}),
                    "tools": _nullable({"type": "array", "maxItems": 0, "description": "chat only"}),
                    "response_format": _nullable(_object({"type": _nullable({"type": "string", "enum": ["text"]})},
                                                         description="use guided_json / guided_regex / "
                                                                     "guided_choice")),
                    "echo": _nullable({"type": "boolean", "enum": [False], "description": "not supported"}),
                    "suffix": _nullable({"type": "string", "maxLength": 0, "description": "not supported"}),
                    "best_of": _nullable({"type": "integer", "minimum": 1, "maximum": 1})},
                   ("model", "prompt"), description=OUTPUT_CONSTRAINTS)


def _messages_request(model_names: list[str], max_model_len: int) -> dict[str, Any]:
    """What anthropic_api.py accepts. Rules JSON Schema cannot state (400s): a tool_result's tool_use_id must match
    a tool_use of an earlier assistant message; tool names and tool_use ids must be distinct; tool_choice must name
    a tool in tools (any / tool need tools); output_config.format and output_format are not both given (with
    tools, auto gives tool_use or JSON text in the format); schemas must compile into a grammar; a final assistant
    message (a prefill) holds no tool_use."""
    from promptstash.server.anthropic_api import TOOL_NAME, TOOL_USE_ID

    cache_control = _ref("CacheControl")
    extra = {"cache_control": _nullable(cache_control)}
    text_or_module = [_text_parts(extra), _module_part(extra)]
    blocks = {"type": "array", "items": {"anyOf": text_or_module}, "minItems": 1}
    tool_use = _object({"type": {"type": "string", "const": "tool_use"},
                        "id": {"type": "string", "pattern": TOOL_USE_ID.pattern},
                        "name": {"type": "string", "minLength": 1}, "input": {"type": "object"}, **extra},
                       ("type", "id", "name", "input"), description="a tool call the assistant made")
    tool_result = _object({"type": {"type": "string", "const": "tool_result"}, "tool_use_id": {"type": "string"},
                           "content": _nullable({"oneOf": [{"type": "string"},
                                                           {"type": "array", "items": {"anyOf": text_or_module}}]}),
                           "is_error": _nullable({"type": "boolean"}), **extra}, ("type", "tool_use_id"),
                          description="the result of the tool_use with this id (rendered as a tool message)")
    message = {"oneOf": [
        _object({"role": {"type": "string", "const": "user"}, "content": {"oneOf": [
            {"type": "string"},
            {"type": "array", "items": {"anyOf": [*text_or_module, tool_result]}, "minItems": 1}]}},
            ("role", "content")),
        _object({"role": {"type": "string", "const": "assistant"}, "content": {"oneOf": [
            {"type": "string"},
            {"type": "array", "items": {"anyOf": [*text_or_module, tool_use]}, "minItems": 1}]}},
            ("role", "content"),
            description="the last message may be from the assistant: a prefill that generation continues"),
    ]}
    tool = _object({
        "name": {"type": "string", "pattern": TOOL_NAME.pattern}, "description": _nullable({"type": "string"}),
        "input_schema": _object({"type": {"type": "string", "const": "object"}}, ("type",),
                                description="a JSON schema; the tool's input is constrained to it"),
        "type": _nullable({"type": "string", "const": "custom", "description": "server tools are not supported"}),
        "strict": _nullable({"type": "boolean", "description": "inputs are always constrained to the schema"}),
        "defer_loading": _nullable({"type": "boolean", "const": False, "description": "tool search is not "
                                                                                      "supported"}),
        **extra}, ("name", "input_schema"), description="a custom tool; cache_control: a breakpoint after it")
    parallel = _nullable({"type": "boolean", "description": "several calls in one answer only when false "
                                                            "(default: one)"})
    no_name = {"type": "null", "description": "only tool_choice of type tool names a tool"}
    tool_choice = {"oneOf": [
        *(_object({"type": {"type": "string", "const": kind}, "disable_parallel_tool_use": parallel,
                   "name": no_name}, ("type",)) for kind in ("auto", "any", "none")),
        _object({"type": {"type": "string", "const": "tool"}, "name": {"type": "string"},
                 "disable_parallel_tool_use": parallel}, ("type", "name")),
    ], "description": "auto (text or tool calls), any (at least one call), tool (that tool), none (text only; the "
                      "tools are still rendered); the default is auto with tools"}
    output_format = _object({"type": {"type": "string", "const": "json_schema"}, "schema": {"type": "object"}},
                            ("type", "schema"), description="the text is constrained to this JSON schema")
    never = {"type": "null", "description": "not supported (null or absent)"}
    common = _sampling_common(max_model_len)
    common["max_tokens"] = {"type": "integer", "minimum": 0, "maximum": max_model_len,
                            "description": "0 only writes the prompt to the cache"}
    return _object({
        "model": {"type": "string", "enum": model_names},
        **common,
        "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
        "system": _nullable({"oneOf": [{"type": "string"}, blocks]}),
        "messages": {"type": "array", "items": message, "minItems": 1},
        "stop_sequences": _nullable({"type": "array", "items": {"type": "string", "minLength": 1}}),
        "metadata": _nullable(_object({"user_id": _nullable({"type": "string"})})),
        "tools": _nullable({"type": "array", "items": tool, "description": "rendered ahead of the conversation"}),
        "tool_choice": _nullable(tool_choice),
        "output_config": _nullable(_object({"effort": never, "format": _nullable(output_format)})),
        "output_format": _nullable({**output_format, "description": "the beta spelling of output_config.format"}),
        "thinking": _nullable(_object({"type": {"type": "string", "const": "disabled"}}, ("type",),
                                      description="thinking is not supported")),
        **{field: never for field in ("container", "mcp_servers", "context_management")},
        "cache_control": _nullable({**cache_control, "description": "automatic caching: one more breakpoint, on "
                                                                    "the last block"}),
    }, ("model", "max_tokens", "messages"),
        description="At most 4 cache_control breakpoints (the top-level one counts; tools, system, then messages); "
                    "a 1h breakpoint may not follow a 5m one.",
        **{"if": {"properties": {"tool_choice": {"type": "object", "properties": {"type": {"enum": ["any", "tool"]}},
                                                 "required": ["type"]}}, "required": ["tool_choice"]},
           "then": {"properties": {"tools": {"type": "array", "minItems": 1}}, "required": ["tools"],
                    "description": "tool_choice any / tool needs tools"}})


# -- responses -------------------------------------------------------------------------------------------------

def _token_count() -> dict[str, Any]:
    breakpoint_ = _object({"prefix_tokens": {"type": "integer"}, "ttl": {"type": "string"},
                           "cacheable": {"type": "boolean"}}, ("prefix_tokens", "ttl", "cacheable"))
    return _object({"input_tokens": {"type": "integer"},
                    "cache_breakpoints": {"type": "array", "items": breakpoint_},
                    "min_cacheable_tokens": {"type": "integer"}}, ("input_tokens",))


def _components() -> dict[str, Any]:
    openai_usage = _object({"prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
                            "total_tokens": {"type": "integer"},
                            "prompt_tokens_details": _object({"cached_tokens": {"type": "integer"}},
                                                             ("cached_tokens",)),
                            "promptstash": _ref("UsageExtension")},
                           ("prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"))
    finish = {"type": "string", "enum": ["stop", "length"]}
    tool_call = _object({"id": {"type": "string"}, "type": {"type": "string", "const": "function"},
                         "function": _object({"name": {"type": "string"}, "arguments": {"type": "string"}},
                                             ("name", "arguments"))}, ("id", "type", "function"))
    chat_choice = _object({"index": {"type": "integer"},
                           "finish_reason": {"type": "string", "enum": ["stop", "length", "tool_calls"]},
                           "message": _object({"role": {"type": "string", "const": "assistant"},
                                               "content": {"type": ["string", "null"]},
                                               "tool_calls": {"type": "array", "items": tool_call}},
                                              ("role", "content")),
                           "logprobs": {"type": ["object", "null"]}},
                          ("index", "message", "finish_reason"))
    text_choice = _object({"index": {"type": "integer"}, "text": {"type": "string"}, "finish_reason": finish},
                          ("index", "text", "finish_reason"))

    def openai_completion(obj: str, choice: dict[str, Any]) -> dict[str, Any]:
        return _object({"id": {"type": "string"}, "object": {"type": "string", "const": obj},
                        "created": {"type": "integer"}, "model": {"type": "string"},
                        "choices": {"type": "array", "items": choice, "minItems": 1, "maxItems": 16},
                        "usage": openai_usage}, ("id", "object", "created", "model", "choices", "usage"))

    anthropic_usage = _object({**{name: {"type": "integer", "minimum": 0} for name in (
        "input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")},
        "promptstash": _ref("UsageExtension")},
        ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens"))
    message = _object({
        "id": {"type": "string"}, "type": {"type": "string", "const": "message"},
        "role": {"type": "string", "const": "assistant"}, "model": {"type": "string"},
        "content": {"type": "array", "items": {"anyOf": [
            _object({"type": {"type": "string", "const": "text"}, "text": {"type": "string"}}, ("type", "text")),
            _object({"type": {"type": "string", "const": "tool_use"}, "id": {"type": "string"},
                     "name": {"type": "string"}, "input": {"type": "object"}}, ("type", "id", "name", "input"))]}},
        "stop_reason": {"type": "string", "enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use"]},
        "stop_sequence": {"type": ["string", "null"]}, "usage": anthropic_usage,
    }, ("id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"))
    count = {"type": "integer", "minimum": 0}
    extension = _object({
        "prefix_cached_tokens": {**count, "description": "tokens reused as an exact prefix"},
        "module_cached_tokens": {**count, "description": "module tokens reused at their position, not recomputed"},
        "recomputed_tokens": {**count, "description": "module tokens loaded from the cache but recomputed by the "
                                                      "repair strategy"},
        "computed_tokens": {**count, "description": "prompt tokens run through the model (recomputed ones "
                                                    "included)"},
        "num_modules": {**count, "description": "modules in the prompt outside the reused prefix"},
        "num_module_hits": {**count, "description": "of those, found in the cache"},
        "module_repair": {"type": ["string", "null"], "description": "the repair strategy applied"},
    }, ("prefix_cached_tokens", "module_cached_tokens", "recomputed_tokens", "computed_tokens", "num_modules",
        "num_module_hits", "module_repair"),
        description="promptstash's split of a prompt with modules (present only then): prefix_cached_tokens + "
                    "module_cached_tokens = the cached tokens the API reports")
    module = _object({"id": MODULE_ID, "object": {"type": "string", "const": "module"}, "num_tokens": count,
                      "ttl": {"type": "string", "enum": list(TTL_SECONDS)},
                      "created_at": {"type": "integer", "description": "Unix seconds"},
                      "expires_at": {"type": "integer", "description": "Unix seconds; every use restarts the TTL"}},
                     ("id", "object", "num_tokens", "ttl", "created_at", "expires_at"))
    return {
        "UsageExtension": extension,
        "Module": module,
        "ModuleList": _object({"object": {"type": "string", "const": "list"},
                               "data": {"type": "array", "items": _ref("Module")}}, ("object", "data")),
        "ModuleDeleted": _object({"id": {"type": "string"}, "object": {"type": "string", "const": "module"},
                                  "deleted": {"type": "boolean", "const": True}}, ("id", "object", "deleted")),
        "CacheControl": _object({"type": {"type": "string", "const": "ephemeral"},
                                 "ttl": _nullable({"type": "string", "enum": ["5m", "1h"],
                                                   "description": "default 5m"})}, ("type",)),
        "OpenAIError": _object({"error": _object({
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}, ("message", "type"))},
            ("error",)),
        "AnthropicError": _object({"type": {"type": "string", "const": "error"}, "error": _object({
            "type": {"type": "string"}, "message": {"type": "string"}}, ("type", "message"))}, ("type", "error")),
        "ChatCompletion": openai_completion("chat.completion", chat_choice),
        "TextCompletion": openai_completion("text_completion", text_choice),
        "Message": message,
    }


def _errors(anthropic: bool, *statuses: int) -> dict[str, Any]:
    schema = _ref("AnthropicError" if anthropic else "OpenAIError")
    what = {400: "invalid request (the message names the field and the limit)",
            401: "missing or invalid API key (only when the server has keys)",
            403: "a pool-wide route: it needs an admin key (only when the server has keys)",
            404: "not found", 413: "request body too large", 500: "computing the module failed",
            429: "too many queued requests; retry after the retry-after header",
            529: "overloaded: too many queued requests; retry after the retry-after header"}
    return {str(s): _json_response(what[s], schema) for s in statuses}


def _sse_event(anthropic: bool) -> dict[str, Any]:
    """One server-sent event (Open API 3.1: the `schema` of text/event-stream describes each event)."""
    if not anthropic:  # data: a chunk object, then data: [DONE]
        return _object({"data": {"type": "string"}}, ("data",))
    return _object({"event": {"type": "string", "enum": [
        "message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
        "message_stop", "ping", "error"]},
        "data": {"type": "string", "contentMediaType": JSON,
                 "contentSchema": _object({"type": {"type": "string"}}, ("type",))}}, ("event", "data"))


def _model_route(schema_name: str, request_schema: dict[str, Any], anthropic: bool, summary: str,
                 description: str) -> dict[str, Any]:
    overloaded = 529 if anthropic else 429
    return {
        "summary": summary, "description": description,
        "requestBody": {"required": True, "content": {JSON: {"schema": request_schema}}},
        "responses": {
            "200": {"description": "the completion (JSON), or server-sent events when `stream` is true",
                    "headers": {"x-request-id": {"schema": {"type": "string"},
                                                 "description": "for GET /v1/cache/requests/{id}/miss"}},
                    "content": {JSON: {"schema": _ref(schema_name)}, SSE: {"schema": _sse_event(anthropic)}}},
            **_errors(anthropic, 400, 401, 404, 413, overloaded),
        },
    }


# -- Responses API (POST /v1/responses, GET / DELETE /v1/responses/{response_id}) --------------------------------

def _responses_request(model_names: list[str], max_model_len: int) -> dict[str, Any]:
    """What responses_api.py accepts. Rules JSON Schema cannot state (400s): a function_call_output's call_id must
    match an earlier function_call, function_call arguments must be the JSON text of an object, tool names must be
    distinct, tool_choice must name a tool in tools ('required' needs tools), schemas must compile into a grammar;
    previous_response_id must name a response this tenant stored (else 404). Tools and a JSON text.format
    combine: tool_choice auto gives calls or JSON text in the format, required / a named function a call."""
    from promptstash.server.responses_api import HARMLESS_INCLUDES, REASONING_EFFORTS, SERVICE_TIERS

    string = {"type": "string"}
    name = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}
    text_part = _object({"type": {"type": "string", "enum": ["input_text", "output_text", "text"]}, "text": string},
                        ("type", "text"))
    refusal = _object({"type": {"type": "string", "const": "refusal"}, "refusal": string}, ("type", "refusal"))
    message_type = _nullable({"type": "string", "const": "message"})
    assistant_parts = {"type": "array", "items": {"anyOf": [text_part, refusal]}}
    answerable = [
        _object({"type": message_type, "role": {"type": "string", "enum": ["user", "system", "developer"]},
                 "content": {"anyOf": [string, {"type": "array", "items": text_part}]}}, ("role", "content")),
        _object({"type": message_type, "role": {"type": "string", "const": "assistant"},
                 "content": _nullable({"anyOf": [string, assistant_parts]})},
                ("role",)),
        _object({"type": {"type": "string", "const": "function_call"}, "call_id": string, "name": string,
                 "arguments": {**string, "contentMediaType": JSON, "contentSchema": {"type": "object"},
                               "description": "the JSON text of an object"}},
                ("type", "call_id", "name", "arguments")),
        _object({"type": {"type": "string", "const": "function_call_output"}, "call_id": string,
                 "output": {"anyOf": [string, {"type": "array", "items": text_part}]}},
                ("type", "call_id", "output"), description="answers the function_call with this call_id"),
    ]
    reasoning = _object({"type": {"type": "string", "const": "reasoning"}}, ("type",),
                        description="another model's reasoning: accepted and left out of the prompt")
    function_tool = _object({"type": {"type": "string", "const": "function"}, "name": name,
                             "description": _nullable(string), "parameters": _nullable({"type": "object"}),
                             "strict": _nullable({"type": "boolean"})}, ("type", "name"))
    text_format = {"anyOf": [
        _object({"type": {"type": "string", "enum": ["text", "json_object"]}}, ("type",)),
        _object({"type": {"type": "string", "const": "json_schema"}, "name": name, "schema": {"type": "object"},
                 "strict": _nullable({"type": "boolean"}), "description": _nullable(string)},
                ("type", "name", "schema")),
    ]}
    never = {"type": "null", "description": "not supported (null or absent)"}
    return _object({
        "model": {"type": "string", "enum": model_names},
        "input": {"anyOf": [string, {"type": "array", "items": {"anyOf": [*answerable, reasoning]},
                                     "contains": {"anyOf": answerable}}],
                  "description": "a user message, or input items (at least one that is not reasoning)"},
        "instructions": _nullable({**string, "description": "a system message ahead of the input (not carried over "
                                                            "by previous_response_id)"}),
        "previous_response_id": _nullable({**string, "description": "continue a stored response's conversation"}),
        "store": _nullable({"type": "boolean", "description": "default true: kept in memory, per API key, for GET "
                                                              "and previous_response_id (bounded in count and age)"}),
        "stream": _nullable({"type": "boolean"}),
        "stream_options": _nullable(_object({"include_obfuscation": _nullable({"type": "boolean"})})),
        "tools": _nullable({"type": "array", "items": function_tool, "description": "function tools only"}),
        "tool_choice": _nullable({"anyOf": [
            {"type": "string", "enum": ["none", "auto", "required"]},
            _object({"type": {"type": "string", "const": "function"}, "name": string}, ("type", "name"))]}),
        "parallel_tool_calls": _nullable({"type": "boolean", "description": "several calls in one answer only "
                                                                             "when true (default: one)"}),
        "text": _nullable(_object({"format": _nullable(text_format),
                                   "verbosity": _nullable({"type": "string", "enum": ["medium"]})})),
        "max_output_tokens": _nullable({"type": "integer", "minimum": 1, "maximum": max_model_len}),
        "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2}),
        "top_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
        "seed": _nullable({"type": "integer", "minimum": -(2**63), "maximum": 2**64 - 1}),
        "metadata": _nullable({"type": "object", "maxProperties": 16, "propertyNames": {"maxLength": 64},
                               "additionalProperties": {"type": "string", "maxLength": 512}}),
        "user": _nullable(string), "safety_identifier": _nullable(string), "prompt_cache_key": _nullable(string),
        "cache_salt": _nullable({**string, "description": "isolates the cache: requests with different salts never "
                                                          "share cached blocks"}),
        "prompt_cache_retention": _nullable({"type": "string", "enum": ["in_memory", "24h"]}),
        "service_tier": _nullable({"type": "string", "enum": list(SERVICE_TIERS)}),
        "truncation": _nullable({"type": "string", "enum": ["disabled"]}),
        "include": _nullable({"type": "array", "items": {"type": "string", "enum": list(HARMLESS_INCLUDES)}}),
        "reasoning": _nullable(_object({"effort": _nullable({"type": "string", "enum": list(REASONING_EFFORTS)}),
                                        "summary": never, "generate_summary": never})),
        "top_logprobs": _nullable({"type": "integer", "enum": [0]}),
        "background": _nullable({"type": "boolean", "enum": [False]}),
        **{field: never for field in ("conversation", "prompt", "max_tool_calls", "context_management",
                                      "prompt_cache_options")},
    }, ("model", "input"))


def _responses_components() -> dict[str, Any]:
    string = {"type": "string"}
    status = {"type": "string", "enum": ["in_progress", "completed", "incomplete"]}
    message = _object({"id": string, "type": {"type": "string", "const": "message"}, "status": status,
                       "role": {"type": "string", "const": "assistant"},
                       "content": {"type": "array", "items": _object(
                           {"type": {"type": "string", "const": "output_text"}, "text": string,
                            "annotations": {"type": "array"}}, ("type", "text", "annotations"))}},
                      ("id", "type", "status", "role", "content"))
    call = _object({"id": string, "type": {"type": "string", "const": "function_call"}, "status": status,
                    "call_id": string, "name": string, "arguments": string},
                   ("id", "type", "call_id", "name", "arguments"))
    count = {"type": "integer", "minimum": 0}
    usage = _object({"input_tokens": count, "output_tokens": count, "total_tokens": count,
                     "input_tokens_details": _object({"cached_tokens": count, "cache_write_tokens": count},
                                                     ("cached_tokens",)),
                     "output_tokens_details": _object({"reasoning_tokens": count}, ("reasoning_tokens",))},
                    ("input_tokens", "input_tokens_details", "output_tokens", "output_tokens_details",
                     "total_tokens"))
    response = _object({
        "id": {"type": "string", "pattern": "^resp_"}, "object": {"type": "string", "const": "response"},
        "created_at": {"type": "integer"},
        "status": {"type": "string", "enum": ["completed", "incomplete", "in_progress", "failed"]},
        "incomplete_details": _nullable(_object({"reason": string}, ("reason",))), "model": string,
        "output": {"type": "array", "items": {"anyOf": [message, call]}}, "usage": _nullable(usage),
        "previous_response_id": _nullable(string), "store": {"type": "boolean"},
    }, ("id", "object", "created_at", "status", "model", "output"))
    deleted = _object({"id": string, "object": {"type": "string", "const": "response"},
                       "deleted": {"type": "boolean", "const": True}}, ("id", "object", "deleted"))
    return {"Response": response, "ResponseDeleted": deleted}


RESPONSE_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
                   "response.content_part.added", "response.output_text.delta", "response.output_text.done",
                   "response.content_part.done", "response.function_call_arguments.delta",
                   "response.function_call_arguments.done", "response.output_item.done", "response.completed",
                   "response.incomplete", "response.failed"]


def _responses_paths(model_names: list[str], max_model_len: int) -> dict[str, dict[str, Any]]:
    create = _model_route(
        "Response", _responses_request(model_names, max_model_len), False, "OpenAI Responses API",
        "instructions + input (or a stored conversation, by previous_response_id, + input) rendered with the chat "
        "template and the function tools; the follow-up's prompt extends the stored one, so it reuses its cached "
        "prefix. Streams `event: TYPE` / `data: {...}` pairs with sequence_number, ending with response.completed "
        "(or response.incomplete / response.failed).")
    create["responses"]["200"]["content"][SSE]["schema"] = _object({
        "event": {"type": "string", "enum": RESPONSE_EVENTS},
        "data": {"type": "string", "contentMediaType": JSON,
                 "contentSchema": _object({"type": {"type": "string"}, "sequence_number": {"type": "integer"}},
                                          ("type", "sequence_number"))}}, ("event", "data"))
    create["responses"].update(_errors(False, 500))
    create["responses"]["500"]["description"] = "generation failed"
    response_id = [{"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"},
                    "description": "a stored response's id (this API key's tenant only)"}]
    return {
        "/v1/responses": {"post": create},
        "/v1/responses/{response_id}": {
            "get": {"summary": "A stored response", "parameters": response_id,
                    "responses": {"200": _json_response("the response as it was returned", _ref("Response")),
                                  **_errors(False, 404)}},
            "delete": {"summary": "Forget a stored response", "parameters": response_id,
                       "responses": {"200": _json_response("deleted", _ref("ResponseDeleted")),
                                     **_errors(False, 404)}},
        },
    }


def _limit(default: int, maximum: int) -> dict[str, Any]:
    return {"name": "limit", "in": "query", "required": False,
            "description": f"how many to return (clamped to 1..{maximum})",
            "schema": {"type": "integer", "default": default}}


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document for `app`, completed with the model routes' bodies, status codes and security."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, openapi_version="3.1.0", routes=app.routes,
                      description="OpenAI- and Anthropic-compatible LLM inference with exact prompt caching.")
    state = app.state.promptstash
    names = sorted(state.model_names(), key=lambda n: (n != state.model_name, n))
    max_model_len = state.engine.max_model_len
    vocab_size = getattr(getattr(getattr(state.engine, "model", None), "config", None), "vocab_size", None)
    paths: dict[str, dict[str, Any]] = doc.setdefault("paths", {})

    for path, route in (
        ("/v1/chat/completions", _model_route(
            "ChatCompletion", _chat_request(names, max_model_len, vocab_size), False, "OpenAI chat completion",
            "Reuses the longest cached prefix of the tenant's namespace (the API key's tenant, plus cache_salt).")),
        ("/v1/completions", _model_route(
            "TextCompletion", _completion_request(names, max_model_len, vocab_size), False,
            "OpenAI text completion", "One prompt per request: text, or token ids.")),
        ("/v1/messages", _model_route(
            "Message", _messages_request(names, max_model_len), True, "Anthropic messages",
            "cache_control breakpoints protect the prompt's blocks for their TTL; usage splits input tokens into "
            "uncached, cache writes and cache reads.")),
    ):
        paths.setdefault(path, {}).setdefault("post", {}).update(route)  # keeps FastAPI's operationId

    count_request = copy.deepcopy(_messages_request(names, max_model_len))
    count_request["required"] = [r for r in count_request["required"] if r != "max_tokens"]
    count_request["properties"]["max_tokens"] = _nullable(count_request["properties"]["max_tokens"])
    paths.setdefault("/v1/messages/count_tokens", {}).setdefault("post", {}).update({
        "summary": "Anthropic token counting",
        "description": "The tokens /v1/messages would compute for this body (validated the same way, max_tokens "
                       "optional), without running the model; each cache_control breakpoint says whether its "
                       "prefix reaches --min-cacheable-tokens.",
        "requestBody": {"required": True, "content": {JSON: {"schema": count_request}}},
        "responses": {"200": _json_response("the count", _ref("TokenCount")), **_errors(True, 400, 404, 413)},
    })

    chat = _chat_request(names, max_model_len, vocab_size)["properties"]
    chat_messages = chat["messages"]
    model = _nullable({"type": "string", "enum": names})
    special = _nullable({"type": "boolean", "description": "add the tokenizer's special tokens (default true)"})
    tokenize_body = {"oneOf": [
        {**_object({"model": model, "prompt": {"type": "string", "description": "raw text"},
                    "add_special_tokens": special, "tools": {"type": "null"}}, ("prompt",)),
         "not": {"required": ["messages"]}},
        {**_object({"model": model, "messages": chat_messages, "tools": chat["tools"]}, ("messages",)),
         "not": {"required": ["prompt"]}},
    ]}
    paths.setdefault("/tokenize", {}).setdefault("post", {}).update({
        "summary": "Token ids of a text or of chat messages (vLLM's shape)",
        "description": "`prompt`: the text's tokens; `messages` (and `tools`): the OpenAI chat messages rendered "
                       "with the chat template, exactly as /v1/chat/completions would compute them.",
        "requestBody": {"required": True, "content": {JSON: {"schema": tokenize_body}}},
        "responses": {"200": _json_response("the tokens", _object(
            {"count": {"type": "integer"}, "max_model_len": {"type": "integer"},
             "tokens": {"type": "array", "items": {"type": "integer"}}}, ("count", "max_model_len", "tokens"))),
            **_errors(False, 400, 404, 413)},
    })
    token_id = {"type": "integer", "minimum": 0, **({"maximum": vocab_size - 1} if vocab_size else {})}
    paths.setdefault("/detokenize", {}).setdefault("post", {}).update({
        "summary": "The text of token ids (vLLM's shape); special tokens included",
        "requestBody": {"required": True, "content": {JSON: {"schema": _object(
            {"model": model, "tokens": {"type": "array", "items": token_id, "maxItems": max_model_len}},
            ("tokens",))}}},
        "responses": {"200": _json_response("the text", _object({"prompt": {"type": "string"}}, ("prompt",))),
                      **_errors(False, 400, 404, 413)},
    })

    module_body = _object({
        "text": {"type": "string", "minLength": 1, "description": "the module's text, tokenized on its own"},
        "id": _nullable({**MODULE_ID, "description": "its id (default: a generated mod_... id); registering an id "
                                                     "again replaces that module"}),
        "ttl": _nullable({"type": "string", "enum": list(TTL_SECONDS),
                          "description": "the registry forgets the module this long after its last use (default "
                                         "5m); its blocks are protected in the pool as long"}),
    }, ("text",))
    paths.setdefault("/v1/modules", {}).setdefault("post", {}).update({
        "summary": "Register and precompute a module",
        "description": "Tokenizes the text on its own, computes its K/V in isolation and registers it under an id "
                       "for this API key's tenant; `{\"type\": \"module\", \"id\": ...}` parts then use it.",
        "requestBody": {"required": True, "content": {JSON: {"schema": module_body}}},
        "responses": {"200": _json_response("the registered module", _ref("Module")),
                      **_errors(False, 400, 413, 429, 500)},
    })
    paths["/v1/modules"].setdefault("get", {}).update({
        "summary": "This tenant's registered modules",
        "responses": {"200": _json_response("the modules, oldest first", _ref("ModuleList"))},
    })
    paths.setdefault("/v1/modules/{module_id}", {}).setdefault("delete", {}).update({
        "summary": "Forget a registered module",
        "parameters": [{"name": "module_id", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": _json_response("deleted", _ref("ModuleDeleted")), **_errors(False, 404)},
    })

    for path, methods in _responses_paths(names, max_model_len).items():
        for method, operation in methods.items():
            paths.setdefault(path, {}).setdefault(method, {}).update(operation)  # keeps FastAPI's operationId

    plain = {"200": {"description": "OK", "content": {JSON: {"schema": {"type": "object"}}}}}
    for path, method, responses, parameters in (
        ("/health", "get", plain, None),
        ("/v1/models", "get", plain, None),
        ("/v1/cache/stats", "get", plain, None),
        ("/v1/cache/requests", "get", {**plain, **_errors(False, 400)}, [_limit(50, 500)]),
        ("/v1/cache/requests/{request_id}/miss", "get", {**plain, **_errors(False, 404)},
         [{"name": "request_id", "in": "path", "required": True, "schema": {"type": "string"},
           "description": "the x-request-id header of a recent response"}]),
        ("/v1/cache/prefixes", "get", {**plain, **_errors(False, 400)}, [_limit(10, 100)]),
        ("/v1/cache/blocks/summary", "get", {"200": _json_response("this replica's stored block hashes", _object(
            {"replica": {"type": "string"}, "num_blocks": {"type": "integer", "minimum": 0},
             "digest": {"type": "string", "description": "sha256 hex over the sorted raw block hashes"},
             "seq": {"type": "integer", "minimum": 0,
                     "description": "the last KV event recorded (0 when KV events are off)"},
             "events": _nullable({"type": "object", "description": "KV event counters (null when off)"}),
             "hashes": {"type": "array", "items": {"type": "string"}, "description": "with full=1: hex, sorted"}},
            ("replica", "num_blocks", "digest", "seq", "events"))), **_errors(False, 400, 403)},
         [{"name": "full", "in": "query", "required": False, "schema": {"type": "integer", "default": 0},
           "description": "1: list the hashes too"}]),
        ("/metrics", "get", {"200": {"description": "Prometheus text format",
                                     "content": {"text/plain": {"schema": {"type": "string"}}}}}, None),
        ("/dashboard", "get", {"200": {"description": "the live dashboard page",
                                       "content": {"text/html": {"schema": {"type": "string"}}}}}, None),
    ):
        operation = paths.setdefault(path, {}).setdefault(method, {})
        operation["responses"] = copy.deepcopy(responses)  # replaces FastAPI's 422: validation errors are 400s
        if parameters is not None:
            operation["parameters"] = parameters

    model = _object({"id": {"type": "string"}, "object": {"type": "string", "const": "model"},
                     "created": {"type": "integer", "description": "Unix seconds"},
                     "owned_by": {"type": "string"}, "type": {"type": "string", "const": "model"},
                     "display_name": {"type": "string"},
                     "created_at": {"type": "string", "description": "RFC 3339 (Anthropic's field)"},
                     "max_model_len": {"type": "integer", "description": "the context window in tokens"}},
                    ("id", "object", "created", "owned_by", "type", "display_name", "created_at"),
                    description="OpenAI's model object and Anthropic's model info in one")
    paths.setdefault("/v1/models/{model_id}", {}).setdefault("get", {}).update({
        "summary": "Retrieve a model",
        "description": "The served model under any of its names (the served name, the model id, `default`).",
        "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": _json_response("the model", model), **_errors(False, 404)},
    })

    # Without tenant or admin keys the server has one local tenant and takes no key (a metrics key alone
    # guards /metrics only); `{}` in a security list says the key is optional.
    auth_required = getattr(state, "auth_required", bool(state.config.api_keys))
    for path, item in paths.items():
        if path in OPEN_ROUTES:
            continue
        required = auth_required or (path == "/metrics" and bool(getattr(state.config, "metrics_key", None)))
        for operation in item.values():
            ways = [{BEARER: []}, {API_KEY: []}] + ([{QUERY_KEY: []}] if path == "/dashboard" else [])
            operation["security"] = ways + ([] if required else [{}])
            operation["responses"].update(_errors(path.startswith("/v1/messages"), 401))

    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas.update(_components())
    schemas["TokenCount"] = _token_count()
    schemas.update(_responses_components())
    components["securitySchemes"] = {
        BEARER: {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY"},
        API_KEY: {"type": "apiKey", "in": "header", "name": "x-api-key", "description": "x-api-key: KEY"},
        QUERY_KEY: {"type": "apiKey", "in": "query", "name": "key", "description": "/dashboard?key=KEY"},
    }
    app.openapi_schema = doc
    return doc
