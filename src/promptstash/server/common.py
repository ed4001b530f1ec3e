"""What both API flavours share: submitting to the engine with errors mapped to HTTP, SSE framing."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from promptstash.engine.engine import Prompt
from promptstash.engine.sampling import SamplingParams
from promptstash.errors import ContextLengthError, InvalidRequestError
from promptstash.server.errors import APIError
from promptstash.server.loop import QueueFullError, Submission, TenantQueueFullError
from promptstash.server.state import ServerState


def new_request_id() -> str:
    return uuid.uuid4().hex[:24]


async def submit(state: ServerState, prompt: Prompt, sampling: SamplingParams, namespace: str, *, tenant: str,
                 breakpoints: Sequence[tuple[int, str]] = (), overloaded_status: int = 429,
                 request_id: str | None = None) -> Submission:
    """Queue a request on the engine; engine errors become 400s and a full queue `overloaded_status`."""
    try:
        return await state.loop.submit(prompt, sampling, namespace=namespace, tenant=tenant,
                                       cache_breakpoints=breakpoints, request_id=request_id)
    except TenantQueueFullError as exc:
        limit = state.config.tenant_max_queued
        raise APIError(overloaded_status, f"tenant is at its per-tenant limit of {limit} requests in flight "
                                          f"(--tenant-max-queued): {exc}; retry shortly",
                       code="rate_limit_exceeded") from None
    except QueueFullError as exc:
        raise APIError(overloaded_status, f"server is overloaded: {exc}; retry shortly",
                       code="rate_limit_exceeded") from None
    except ContextLengthError as exc:
        raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from None
    except InvalidRequestError as exc:
        raise APIError(400, str(exc)) from None


def sse(data: Any, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
