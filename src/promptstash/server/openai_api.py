"""OpenAI-compatible routes: /v1/chat/completions and /v1/completions.

Caching is automatic (every request reuses the longest cached prefix of its tenant's namespace);
`prompt_cache_retention: "24h"` protects the prompt's blocks under the 24-hour TTL class.
Usage: `prompt_tokens` includes cached tokens; `prompt_tokens_details.cached_tokens` is the engine's reuse.

Modules (chat only): a text part `{"type": "text", "text": ..., "module": true}` is a module (tokenized on its
own; its K/V are reused wherever it appears), `{"type": "module", "id": ...}` uses a module registered with
POST /v1/modules in the caller's tenant. `module_repair` picks what is recomputed where modules are assembled.
A prompt with modules gets `usage.promptstash` (prefix- and module-reused, recomputed and computed tokens).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from promptstash.cache.modules import ModuleRepair, ModuleSpan
from promptstash.engine.engine import Completion, Prompt, Usage
from promptstash.engine.sampling import SamplingParams
from promptstash.errors import ContextLengthError
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
from promptstash.server.state import ServerState, cache_namespace, registry_namespace, wait_for_completion
from promptstash.server.validate import Body, parse_json_object

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
FINISH_REASONS = {"stop": "stop", "length": "length"}


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


def _options(state: ServerState, body: Body, tenant: str) -> _Options:
    model = body.str("model", required=True)
    state.check_model(model)
    if body.int("n", 1) != 1:
        raise body.fail("n", "only n=1 is supported")
    if body.bool("logprobs", False) or body.int("top_logprobs", 0):
        raise body.fail("logprobs", "logprobs are not supported")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.num(name, 0.0, min=-2.0, max=2.0) != 0.0:
            raise body.fail(name, "penalties are not supported (only 0)")
    if body.list("tools"):  # NOTE: a tools value that is not an array is a 400 too, even an empty one
        raise body.fail("tools", "tool calling is not supported")
    response_format = body.obj("response_format")
    if response_format is not None and response_format.str("type", "text") != "text":
        raise body.fail("response_format", "only {\"type\": \"text\"} is supported")
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
    )
    salt = body.str("cache_salt")
    repair = module_repair_field(body)
    return _Options(model, stream, include_usage, sampling, cache_namespace(tenant, salt), tenant, retention,
                    max_tokens is not None, repair)


def chat_messages_of(body: Body) -> list[ChatMessage]:
    """The request's `messages` as ChatMessages (400 on malformed ones)."""
    return _chat_messages(body)


def _chat_messages(body: Body) -> list[ChatMessage]:
    raw = body.list("messages", required=True)
    if not raw:
        raise body.fail("messages", "must contain at least one message")
    messages = []
    for i, item in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{where}: expected an object", param=where)
        m = Body(item, where)
        role = m.str("role", required=True)
        if role not in ROLES:
            raise m.fail("role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        content = item.get("content")
        if isinstance(content, str):
            blocks = (TextBlock(content),)
        elif isinstance(content, list):
            blocks = tuple(_content_part(part, f"{where}.content[{j}]", f"{where}.content")
                           for j, part in enumerate(content))
        elif content is None and role == "assistant":
            blocks = (TextBlock(""),)
        else:
            raise m.fail("content", "expected a string or an array of text parts")
        messages.append(ChatMessage(ROLES[role], blocks))
    return messages


def _content_part(part: Any, where: str, param: str) -> TextBlock:
    """A text part (`"module": true` makes it a module) or `{"type": "module", "id": ...}`."""
    if not isinstance(part, dict):
        raise APIError(400, f"{where}: only text parts are supported ({{\"type\": \"text\", \"text\": ...}}), "
                            "and module parts ({\"type\": \"module\", \"id\": ...})", param=param)
    module = module_flag(part, where)
    kind = part.get("type")
    if kind == "module":
        return TextBlock("", module_id=module_id_field(part, where))
    if kind == "text" and isinstance(part.get("text"), str):
        if module and not part["text"]:
            raise APIError(400, f"{where}.text: a module must not be empty", param=f"{where}.text")
        return TextBlock(part["text"], module=module)
    if module and kind != "text":
        raise APIError(400, f"{where}: only text parts can be modules (\"module\": true), got type {kind!r}",
                       param=f"{where}.module")
    raise APIError(400, f"{where}: only text parts are supported ({{\"type\": \"text\", \"text\": ...}}), "
                        "and module parts ({\"type\": \"module\", \"id\": ...})", param=param)


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


def _prepare_chat(state: ServerState, raw: bytes, tenant: str) -> tuple[_Options, list[int], tuple[ModuleSpan, ...]]:
    """Body bytes -> options, prompt tokens and module spans: JSON, validation, the character cap, the chat
    template and the tokenizer (module ids resolve in the request's namespace). Runs on a worker thread: none
    of it may hold up the event loop."""
    body = Body(parse_json_object(raw, state.config.max_body_bytes))
    opts = _options(state, body, tenant)
    messages = _chat_messages(body)
    state.check_prompt_chars(sum(len(b.text) for m in messages for b in m.blocks), "messages")
    try:
        rendered = state.engine.render(messages, registry_namespace(tenant))
        return opts, rendered.token_ids, rendered.modules
    except ContextLengthError as exc:
        raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from None
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None


def _prepare_completion(state: ServerState, raw: bytes, tenant: str
                        ) -> tuple[_Options, list[int], tuple[ModuleSpan, ...]]:
    """As _prepare_chat, for /v1/completions (a text prompt or token ids)."""
    body = Body(parse_json_object(raw, state.config.max_body_bytes))
    opts = _options(state, body, tenant)
    if body.bool("echo", False):
        raise body.fail("echo", "echo is not supported")
    if body.str("suffix"):
        raise body.fail("suffix", "suffix is not supported")
    if body.int("best_of", 1) != 1:
        raise body.fail("best_of", "only best_of=1 is supported")
    prompt = _completion_prompt(body)
    if not isinstance(prompt, str):
        return opts, list(prompt), ()
    state.check_prompt_chars(len(prompt), "prompt")
    try:
        return opts, state.engine.tokenize(prompt), ()
    except ContextLengthError as exc:
        raise APIError(400, str(exc), param="prompt", code="context_length_exceeded") from None
    except ValueError as exc:
        raise APIError(400, str(exc), param="prompt") from None


def register(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        tenant = state.tenant(request)
        raw = await state.read_body(request)
        opts, token_ids, modules = await asyncio.to_thread(_prepare_chat, state, raw, tenant)
        return await _respond(state, request, "chat", token_ids, opts, modules)

    @app.post("/v1/completions")
    async def completions(request: Request):
        tenant = state.tenant(request)
        raw = await state.read_body(request)
        opts, token_ids, modules = await asyncio.to_thread(_prepare_completion, state, raw, tenant)
        return await _respond(state, request, "text", token_ids, opts, modules)


async def _respond(state: ServerState, request: Request, kind: str, token_ids: list[int], opts: _Options,
                   modules: tuple[ModuleSpan, ...] = ()):
    breakpoints = [(len(token_ids), "24h")] if opts.retention == "24h" else []
    if not opts.max_tokens_given:  # as OpenAI does: never more than the context window leaves
        room = max(1, state.engine.max_model_len - len(token_ids))
        opts = replace(opts, sampling=replace(opts.sampling, max_tokens=min(opts.sampling.max_tokens, room)))
    rid = new_request_id()
    submission = await submit(state, token_ids, opts.sampling, opts.namespace, tenant=opts.tenant,
                              breakpoints=breakpoints, request_id=rid, modules=modules,
                              module_repair=opts.module_repair if modules else None)

    def usage(u: Usage) -> dict[str, Any]:
        return usage_json(u, usage_extension(u, bool(modules), opts.module_repair, state.engine.default_module_repair))

    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    obj = "chat.completion" if kind == "chat" else "text_completion"
    created = int(time.time())
    headers = {"x-request-id": rid}
    base = {"id": prefix + rid, "object": obj, "created": created, "model": opts.model, "system_fingerprint": None}

    if not opts.stream:
        completion = await wait_for_completion(submission, request)
        if completion is None:
            return JSONResponse({}, status_code=499)  # the client has gone; nobody reads this
        state.stats.record(kind, completion, opts.tenant, modules=modules)
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": completion.text, "refusal": None},
                      "logprobs": None, "finish_reason": _finish_reason(completion)}
        else:
            choice = {"index": 0, "text": completion.text, "logprobs": None,
                      "finish_reason": _finish_reason(completion)}
        return JSONResponse({**base, "choices": [choice], "usage": usage(completion.usage)}, headers=headers)

    chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    extra = {"usage": None} if opts.include_usage else {}

    def chunk(text: str | None, finish_reason: str | None, first: bool = False) -> str:
        if kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return sse({**base, "object": chunk_obj, "choices": [choice], **extra})

    async def events() -> AsyncIterator[str]:
        try:
            if kind == "chat":
                yield chunk(None, None, first=True)
            async for update in submission.updates():
                if update.new_text:
                    yield chunk(update.new_text, None)
            completion = await submission.completion()
            reason = completion.finish_reason
            if reason not in FINISH_REASONS:
                yield sse({"error": {"message": f"generation failed ({reason})", "type": "server_error",
                                     "param": None, "code": None}})
                return
            state.stats.record(kind, completion, opts.tenant, modules=modules)
            yield chunk(None, FINISH_REASONS[reason])
            if opts.include_usage:
                yield sse({**base, "object": chunk_obj, "choices": [], "usage": usage(completion.usage)})
            yield sse("[DONE]")
        finally:
            submission.abort_soon()  # a client that went away frees its blocks now (no-op once complete)

    return StreamingResponse(events(), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
