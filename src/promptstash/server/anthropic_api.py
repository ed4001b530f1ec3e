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
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from promptstash.cache.manager import TTL_SECONDS
from promptstash.cache.modules import ModuleRepair, ModuleSpan
from promptstash.engine.engine import Completion, Usage
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

MAX_BREAKPOINTS = 4
TTLS = ("5m", "1h")


def _cache_control(value: Any, where: str) -> str | None:
    """The TTL class of a cache_control value, None if absent; 400 if malformed."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise APIError(400, f"{where}: expected an object like {{\"type\": \"ephemeral\"}}")
    cc = Body(value, where)
    cc.str("type", required=True, choices=("ephemeral",))
    return cc.str("ttl", "5m", choices=TTLS)


def _blocks(content: Any, where: str) -> tuple[TextBlock, ...]:
    if isinstance(content, str):
        return (TextBlock(content),)
    if not isinstance(content, list):
        raise APIError(400, f"{where}: expected a string or an array of content blocks")
    if not content:
        raise APIError(400, f"{where}: must not be empty")
    blocks = []
    for j, raw in enumerate(content):
        w = f"{where}[{j}]"
        if not isinstance(raw, dict):
            raise APIError(400, f"{w}: expected a content block object")
        block = Body(raw, w)
        module = module_flag(raw, w)
        kind = block.str("type", required=True)
        if kind == "module":
            blocks.append(TextBlock("", _cache_control(raw.get("cache_control"), f"{w}.cache_control"),
                                    module_id=module_id_field(raw, w)))
            continue
        if kind != "text":
            if module:
                raise block.fail("module", f"only text blocks can be modules (\"module\": true), got type {kind!r}")
            raise block.fail("type", f"only text content blocks (and {{\"type\": \"module\", \"id\": ...}}) are "
                                     f"supported, got {kind!r}")
        text = block.str("text", required=True)
        if module and not text:
            raise block.fail("text", "a module must not be empty")
        blocks.append(TextBlock(text, _cache_control(raw.get("cache_control"), f"{w}.cache_control"), module=module))
    return tuple(blocks)


def count_tokens(state: ServerState, raw: bytes, tenant: str) -> dict[str, Any]:
    """POST /v1/messages/count_tokens: the prompt's tokens as /v1/messages would compute them, and whether each
    cache_control breakpoint reaches --min-cacheable-tokens (a shorter one writes nothing)."""
    p = _prepare(state, raw, tenant, count_only=True)
    minimum = state.config.min_cacheable_tokens
    return {"input_tokens": len(p.token_ids),
            "cache_breakpoints": [{"prefix_tokens": n, "ttl": ttl, "cacheable": n >= minimum}
                                  for n, ttl in p.all_breakpoints],
            "min_cacheable_tokens": minimum}


def _messages(body: Body) -> list[ChatMessage]:
    messages: list[ChatMessage] = []
    system = body.data.get("system")
    if system is not None and system != "":
        messages.append(ChatMessage("system", _blocks(system, "system")))
    raw = body.list("messages", required=True)
    if not raw:
        raise body.fail("messages", "must contain at least one message")
    for i, item in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{where}: expected an object")
        m = Body(item, where)
        role = m.str("role", required=True, choices=("user", "assistant"))
        messages.append(ChatMessage(role, _blocks(item.get("content"), f"{where}.content")))
    ttls = [b.ttl_class for m in messages for b in m.blocks if b.ttl_class is not None]
    automatic = _cache_control(body.data.get("cache_control"), "cache_control")
    if automatic is not None:  # automatic mode: one more breakpoint, on the last cacheable block
        ttls.append(automatic)
        last = messages[-1]
        if last.blocks[-1].ttl_class is None:
            messages[-1] = ChatMessage(last.role, last.blocks[:-1] + (replace(last.blocks[-1], ttl_class=automatic),))
    if len(ttls) > MAX_BREAKPOINTS:
        raise APIError(400, f"a maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided; "
                            f"found {len(ttls)}")
    for earlier, later in zip(ttls, ttls[1:], strict=False):
        if TTL_SECONDS[later] > TTL_SECONDS[earlier]:
            raise APIError(400, f"a cache_control breakpoint with ttl='{later}' may not come after one with "
                                f"ttl='{earlier}': longer TTLs must come first")
    return messages


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

    def usage(self, state: ServerState, usage: Usage) -> dict[str, Any]:
        return usage_json(usage, usage_extension(usage, bool(self.modules), self.module_repair,
                                                 state.engine.default_module_repair))


def _prepare(state: ServerState, raw: bytes, tenant: str, *, count_only: bool = False) -> _Prepared:
    """Body bytes -> what to submit: JSON, validation, the character cap, the chat template and the
    tokenizer. Runs on a worker thread: none of it may hold up the event loop. count_only: for
    count_tokens, where max_tokens is optional (the same body is otherwise validated the same way)."""
    body = Body(parse_json_object(raw, state.config.max_body_bytes))
    if count_only and body.data.get("max_tokens") is None:
        body.data["max_tokens"] = 0
    model = body.str("model", required=True)
    state.check_model(model)
    max_tokens = body.int("max_tokens", required=True, min=0, max=state.engine.max_model_len)
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=body.num("temperature", 1.0, min=0.0, max=1.0),
        top_p=max(body.num("top_p", 1.0, min=0.0, max=1.0), 1e-9),
        top_k=body.int("top_k", 0, min=0),
        stop=tuple(_stop_sequences(body)),
    )
    stream = body.bool("stream", False)
    metadata = body.obj("metadata")
    if metadata is not None:
        metadata.str("user_id")
    if body.list("tools"):  # NOTE: a tools value that is not an array is a 400 too, even an empty one
        raise body.fail("tools", "tool use is not supported")
    namespace = cache_namespace(tenant, body.str("cache_salt"))
    repair = module_repair_field(body)
    messages = _messages(body)
    state.check_prompt_chars(sum(len(b.text) for m in messages for b in m.blocks), "messages")
    try:
        prompt = state.engine.render(messages, registry_namespace(tenant))
    except ContextLengthError as exc:
        raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from None
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None
    minimum = state.config.min_cacheable_tokens
    breakpoints = [(n, ttl) for n, ttl in prompt.breakpoints if n >= minimum]
    return _Prepared(model, sampling, stream, namespace, prompt.token_ids, breakpoints, prompt.modules, repair,
                     prompt.breakpoints)


def register(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/messages")
    async def messages(request: Request):
        tenant = state.tenant(request)
        raw = await state.read_body(request)
        p = await asyncio.to_thread(_prepare, state, raw, tenant)
        rid = new_request_id()
        submission = await submit(state, p.token_ids, p.sampling, p.namespace, tenant=tenant,
                                  breakpoints=p.breakpoints, overloaded_status=529, request_id=rid,
                                  modules=p.modules, module_repair=p.module_repair if p.modules else None)
        base = {"id": "msg_" + rid, "type": "message", "role": "assistant", "model": p.model}
        headers = {"x-request-id": rid, "request-id": rid}
        if not p.stream:
            completion = await wait_for_completion(submission, request)
            if completion is None:
                return JSONResponse({}, status_code=499)  # the client has gone; nobody reads this
            stop_reason, stop_sequence = _stop(completion)
            state.stats.record("messages", completion, tenant, modules=p.modules)
            content = [{"type": "text", "text": completion.text}] if completion.usage.completion_tokens else []
            return JSONResponse({**base, "content": content, "stop_reason": stop_reason,
                                 "stop_sequence": stop_sequence, "usage": p.usage(state, completion.usage)},
                                headers=headers)
        return StreamingResponse(_events(state, submission, base, tenant, p), media_type="text/event-stream",
                                 headers={**SSE_HEADERS, **headers})


def _stop_sequences(body: Body) -> list[str]:
    items = body.list("stop_sequences") or []
    if not all(isinstance(s, str) and s for s in items):
        raise body.fail("stop_sequences", "expected an array of non-empty strings")
    return items


async def _events(state: ServerState, submission, base: dict[str, Any], tenant: str, p: _Prepared
                  ) -> AsyncIterator[str]:
    """message_start, content_block_start, content_block_delta*, content_block_stop, message_delta, message_stop.

    message_start waits for the first update, so its usage already holds the real cache read and write.
    """
    try:
        started = block_open = False
        async for update in submission.updates():
            if not started:
                started = True
                usage = p.usage(state, submission.usage())
                usage["output_tokens"] = 0
                yield sse({"type": "message_start", "message": {**base, "content": [], "stop_reason": None,
                                                                "stop_sequence": None, "usage": usage}},
                          "message_start")
            if update.new_text:
                if not block_open:
                    block_open = True
                    yield sse({"type": "content_block_start", "index": 0,
                               "content_block": {"type": "text", "text": ""}}, "content_block_start")
                yield sse({"type": "content_block_delta", "index": 0,
                           "delta": {"type": "text_delta", "text": update.new_text}}, "content_block_delta")
        completion = await submission.completion()
        try:
            stop_reason, stop_sequence = _stop(completion)
        except APIError as exc:
            yield sse({"type": "error", "error": {"type": "api_error", "message": exc.message}}, "error")
            return
        state.stats.record("messages", completion, tenant, modules=p.modules)
        if completion.usage.completion_tokens and not block_open:
            block_open = True
            yield sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                      "content_block_start")
        if block_open:
            yield sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
        yield sse({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                   "usage": p.usage(state, completion.usage)}, "message_delta")
        yield sse({"type": "message_stop"}, "message_stop")
    finally:
        submission.abort_soon()
