"""The module registry, per tenant: POST /v1/modules, GET /v1/modules, DELETE /v1/modules/{module_id}.

    POST /v1/modules {"text": ..., "id"?: ..., "ttl"?: "5m" | "1h" | "24h"}
        tokenizes the text on its own, registers it in the caller's namespace and precomputes its K/V (a
        max_tokens=0 request through the engine loop, queued like any other: a full queue is a 429), then
        answers {"id", "object": "module", "num_tokens", "ttl", "created_at", "expires_at"}
    a chat part {"type": "module", "id": ...} then uses it without resending the text (both APIs)

NOTE: the registry namespace is the tenant's (registry_namespace: no cache_salt), so another tenant never sees,
uses or deletes a module by id, while every request of the tenant resolves its ids (a salted request computes
the module's K/V in its own salted namespace). An entry expires its TTL after its last use. Errors use the
OpenAI format.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from promptstash.cache.modules import ModuleRegistry, RegisteredModule
from promptstash.cache.ttl import TTL_SECONDS
from promptstash.engine.sampling import SamplingParams
from promptstash.errors import ContextLengthError, InvalidRequestError
from promptstash.server.common import new_request_id, submit
from promptstash.server.errors import APIError
from promptstash.server.state import ServerState, registry_namespace, wait_for_completion
from promptstash.server.validate import Body, parse_json_object

TTLS = tuple(TTL_SECONDS)  # "5m", "1h", "24h"


def module_json(module: RegisteredModule) -> dict[str, Any]:
    return {"id": module.module_id, "object": "module", "num_tokens": module.num_tokens, "ttl": module.ttl_class,
            "created_at": int(module.created_at), "expires_at": math.ceil(module.expires_at)}


def _prepare(state: ServerState, raw: bytes, namespace: str) -> tuple[RegisteredModule, list[int], tuple]:
    """Body bytes -> the registered module and what precomputes it. Runs on a worker thread (tokenizing)."""
    body = Body(parse_json_object(raw, state.config.max_body_bytes))
    text = body.str("text", required=True)
    if not text:
        raise body.fail("text", "must not be empty")
    module_id = body.str("id")
    if module_id is not None:
        try:
            ModuleRegistry.check_id(module_id)
        except InvalidRequestError as exc:
            raise body.fail("id", str(exc)) from None
    ttl = body.str("ttl", "5m", choices=TTLS)
    state.check_prompt_chars(len(text), "text")
    try:
        return state.engine.prepare_module(text, namespace=namespace, module_id=module_id, ttl=ttl)
    except ContextLengthError as exc:
        raise APIError(400, f"text: {exc}", param="text", code="context_length_exceeded") from None
    except InvalidRequestError as exc:
        raise APIError(400, str(exc), param="text") from None


def register(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/modules")
    async def create_module(request: Request) -> JSONResponse:
        tenant = state.tenant(request)
        namespace = registry_namespace(tenant)
        raw = await state.read_body(request)
        module, token_ids, spans = await asyncio.to_thread(_prepare, state, raw, namespace)
        done = False
        try:
            submission = await submit(state, token_ids, SamplingParams(max_tokens=0), namespace, tenant=tenant,
                                      request_id=new_request_id(), modules=spans, module_repair="none",
                                      param="text")
            completion = await wait_for_completion(submission, request)
            if completion is None:
                return JSONResponse({}, status_code=499)  # the client has gone; nobody reads this
            if completion.finish_reason in ("error", "abort"):
                why = completion.error or f"finish reason {completion.finish_reason!r}"
                raise APIError(500, f"computing the module failed: {why}")
            done = True
        finally:
            if not done:  # a module that was not stored is not registered either
                state.engine.delete_module(module.module_id, namespace)
        return JSONResponse(module_json(module))

    @app.get("/v1/modules")
    async def list_modules(request: Request) -> dict[str, Any]:
        namespace = registry_namespace(state.tenant(request))
        return {"object": "list", "data": [module_json(m) for m in state.engine.list_modules(namespace)]}

    @app.delete("/v1/modules/{module_id}")
    async def delete_module(request: Request, module_id: str) -> dict[str, Any]:
        namespace = registry_namespace(state.tenant(request))
        if not state.engine.delete_module(module_id, namespace):
            raise APIError(404, f"no module {module_id!r} for this API key (modules expire after their TTL)",
                           param="module_id", code="module_not_found")
        return {"id": module_id, "object": "module", "deleted": True}
