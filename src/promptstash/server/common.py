"""What both API flavours share: submitting to the engine with errors mapped to HTTP, SSE framing."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from typing import Any

from promptstash.cache.modules import ModuleRepair, ModuleSpan
from promptstash.engine.engine import Prompt, Usage
from promptstash.engine.sampling import SamplingParams
from promptstash.errors import ContextLengthError, InvalidRequestError
from promptstash.server.errors import APIError
from promptstash.server.loop import QueueFullError, Submission, TenantQueueFullError
from promptstash.server.state import ServerState
from promptstash.server.validate import Body, type_name


def new_request_id() -> str:
    return uuid.uuid4().hex[:24]


async def submit(state: ServerState, prompt: Prompt, sampling: SamplingParams, namespace: str, *, tenant: str,
                 breakpoints: Sequence[tuple[int, str]] = (), overloaded_status: int = 429,
                 request_id: str | None = None, modules: Sequence[ModuleSpan] = (),
                 module_repair: str | ModuleRepair | None = None, param: str = "messages") -> Submission:
    """Queue a request on the engine; engine errors become 400s (naming `param`) and a full queue
    `overloaded_status`. modules / module_repair go to engine.add_request."""
    try:
        return await state.loop.submit(prompt, sampling, namespace=namespace, tenant=tenant,
                                       cache_breakpoints=breakpoints, request_id=request_id, modules=modules,
                                       module_repair=module_repair)
    except TenantQueueFullError as exc:
        limit = state.config.tenant_max_queued
        raise APIError(overloaded_status, f"tenant is at its per-tenant limit of {limit} requests in flight "
                                          f"(--tenant-max-queued): {exc}; retry shortly",
                       code="rate_limit_exceeded") from None
    except QueueFullError as exc:
        raise APIError(overloaded_status, f"server is overloaded: {exc}; retry shortly",
                       code="rate_limit_exceeded") from None
    except ContextLengthError as exc:
        raise APIError(400, str(exc), param=param, code="context_length_exceeded") from None
    except InvalidRequestError as exc:
        raise APIError(400, str(exc), param=param if modules else None) from None


def sse(data: Any, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


# none | full | legolink[:K] (K 0..4096) | cacheblend[:R] (R in [0, 1], decimal)
MODULE_REPAIR_PATTERN = re.compile(
    r"^(none|full|legolink(:(0|[1-9][0-9]{0,2}|[1-3][0-9]{3}|40[0-8][0-9]|409[0-6]))?"
    r"|cacheblend(:(0(\.[0-9]{1,6})?|1(\.0{1,6})?|\.[0-9]{1,6}))?)$")


def module_repair_field(body: Body) -> ModuleRepair | None:
    """The optional `module_repair` field ("none" | "legolink[:K]" | "cacheblend[:R]" | "full"); None when absent
    (the engine's default applies). A bad value is a 400 naming the field."""
    value = body.str("module_repair")
    if value is None:
        return None
    if not MODULE_REPAIR_PATTERN.fullmatch(value):  # the exact spellings openapi.py documents
        raise body.fail("module_repair", f"unknown module_repair {value[:40]!r}; expected none, legolink, "
                                         "legolink:K (K tokens, 0..4096), cacheblend, cacheblend:R (R a fraction "
                                         "in [0, 1], e.g. 0.15) or full")
    try:
        return ModuleRepair.parse(value)
    except InvalidRequestError as exc:
        raise body.fail("module_repair", str(exc)) from None


def module_flag(part: dict[str, Any], where: str) -> bool:
    """A content part's optional `"module"` mark: true or false (absent or null: false); any other type is a 400."""
    value = part.get("module")
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"{where}.module: expected a boolean (true marks a text part as a module), got "
                            f"{type_name(value)}", param=f"{where}.module")
    return value


def module_id_field(part: dict[str, Any], where: str) -> str:
    """The id of a `{"type": "module", "id": ...}` part (a module registered with POST /v1/modules)."""
    value = part.get("id")
    if not isinstance(value, str) or not value:
        raise APIError(400, f"{where}.id: a module part needs the 'id' string of a module registered with "
                            f"POST /v1/modules, got {type_name(value) if value is not None else 'nothing'}",
                       param=f"{where}.id")
    return value


def usage_extension(usage: Usage, had_modules: bool, repair: ModuleRepair | None, default: ModuleRepair
                    ) -> dict[str, Any] | None:
    """The `promptstash` object added to usage for a prompt with modules (None otherwise: usage unchanged).

    prefix_cached_tokens + module_cached_tokens = the cached tokens the API reports; recomputed_tokens are module
    tokens loaded from the cache but recomputed by the repair strategy (they count as computed)."""
    if not had_modules and usage.num_modules <= 0:
        return None
    return {
        "prefix_cached_tokens": usage.prefix_cached_tokens,
        "module_cached_tokens": usage.module_cached_tokens,
        "recomputed_tokens": usage.recomputed_tokens,
        "computed_tokens": usage.computed_tokens,
        "num_modules": usage.num_modules,
        "num_module_hits": usage.num_module_hits,
        "module_repair": usage.module_repair or (repair or default).label,
    }
