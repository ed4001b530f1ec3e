"""Token counting: Anthropic's POST /v1/messages/count_tokens, and vLLM's POST /tokenize and /detokenize.

    POST /v1/messages/count_tokens {model, messages, system?}  -> {"input_tokens": N, "cache_breakpoints": [...]}
        the body of /v1/messages (max_tokens optional), validated and rendered the same way, without running the
        model; each breakpoint says whether its prefix reaches --min-cacheable-tokens (shorter ones write nothing)
    POST /tokenize {prompt | messages + tools?, add_special_tokens?} -> {"count", "max_model_len", "tokens"}
    POST /detokenize {tokens}                                   -> {"prompt"}

All of it runs on a worker thread (JSON, template, tokenizer), never on the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request

from promptstash.errors import ContextLengthError
from promptstash.server import anthropic_api, openai_api
from promptstash.server.errors import APIError
from promptstash.server.state import ServerState, registry_namespace
from promptstash.server.validate import Body, parse_json_object


def _render(state: ServerState, messages: list, tenant: str, param: str, tools: tuple = ()) -> Any:
    state.check_prompt_chars(sum(len(b.text) for m in messages for b in m.blocks), param)
    try:
        return state.engine.render(messages, registry_namespace(tenant), tools=tools)
    except ContextLengthError as exc:
        raise APIError(400, str(exc), param=param, code="context_length_exceeded") from None
    except ValueError as exc:
        raise APIError(400, str(exc), param=param) from None


def tokenize(state: ServerState, raw: bytes, tenant: str) -> dict[str, Any]:
    body = Body(parse_json_object(raw, state.config.max_body_bytes))
    model = body.str("model")
    if model is not None:
        state.check_model(model)
    add_special = body.bool("add_special_tokens", True)
    if "messages" in body.data:
        if "prompt" in body.data:
            raise body.fail("prompt", "give either prompt or messages, not both")
        tools = openai_api.tools_of(body)
        tokens = _render(state, openai_api.chat_messages_of(body), tenant, "messages", tools).token_ids
    else:
        if body.data.get("tools") is not None:
            raise body.fail("tools", "tools go with messages (they are rendered by the chat template)")
        prompt = body.str("prompt", required=True)
        state.check_prompt_chars(len(prompt), "prompt")
        if state.engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer", param="prompt")
        tokens = state.engine.tokenizer.encode(prompt, add_special_tokens=add_special)
    return {"count": len(tokens), "max_model_len": state.engine.max_model_len, "tokens": tokens}


def detokenize(state: ServerState, raw: bytes) -> dict[str, Any]:
    body = Body(parse_json_object(raw, state.config.max_body_bytes))
    model = body.str("model")
    if model is not None:
        state.check_model(model)
    tokens = body.list("tokens", required=True)
    vocab = state.engine.model.config.vocab_size
    assert tokens is not None
    if len(tokens) > state.engine.max_model_len:
        raise body.fail("tokens", f"at most {state.engine.max_model_len} tokens (the context window)")
    for i, t in enumerate(tokens):
        if isinstance(t, float) and t.is_integer():
            tokens[i] = t = int(t)  # 263.0 is the integer 263, as JSON Schema (and every other route) has it
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise body.fail("tokens", f"expected token ids in [0, {vocab}), got {t!r}")
    if state.engine.tokenizer is None:
        raise APIError(400, "this model has no tokenizer", param="tokens")
    return {"prompt": state.engine.tokenizer.decode(tokens, skip_special_tokens=False)}


def register(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/messages/count_tokens")
    async def messages_count_tokens(request: Request) -> dict[str, Any]:
        tenant = state.tenant(request)
        raw = await state.read_body(request)
        return await asyncio.to_thread(anthropic_api.count_tokens, state, raw, tenant)

    @app.post("/tokenize")
    async def tokenize_route(request: Request) -> dict[str, Any]:
        tenant = state.tenant(request)
        raw = await state.read_body(request)
        return await asyncio.to_thread(tokenize, state, raw, tenant)

    @app.post("/detokenize")
    async def detokenize_route(request: Request) -> dict[str, Any]:
        state.tenant(request)
        raw = await state.read_body(request)
        return await asyncio.to_thread(detokenize, state, raw)
