"""The ASGI app: shared state, auth, errors, and the non-model routes; the model routes live in
openai_api.py and anthropic_api.py."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from promptstash.config import ServerConfig
from promptstash.engine.engine import Completion, Engine
from promptstash.server.dashboard import DASHBOARD_HTML
from promptstash.server.errors import APIError, error_response
from promptstash.server.loop import EngineLoop, Submission
from promptstash.server.metrics import ServerStats
from promptstash.server.openapi import build_openapi
from promptstash.server.validate import parse_json_object

log = logging.getLogger("promptstash.server")
LOCAL_TENANT = "local"


@dataclass
class ServerState:
    engine: Engine
    config: ServerConfig
    loop: EngineLoop
    stats: ServerStats
    model_name: str
    created: int

    def model_names(self) -> set[str]:
        return {self.model_name, self.engine.model_id, "default"}

    def check_model(self, name: str, param: str = "model") -> None:
        if name not in self.model_names():
            raise APIError(404, f"model {name!r} not found; this server serves {self.model_name!r}",
                           param=param, code="model_not_found")

    def tenant(self, request: Request) -> str:
        """The tenant of the request's API key (Authorization: Bearer KEY, or x-api-key: KEY)."""
        keys = self.config.api_keys
        if not keys:
            return LOCAL_TENANT
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not given:
            raise APIError(401, "missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                           code="invalid_api_key")
        for key, tenant in keys.items():
            if hmac.compare_digest(key.encode(), given.encode()):
                return tenant
        raise APIError(401, "invalid API key", code="invalid_api_key")

    async def body(self, request: Request) -> dict[str, Any]:
        return parse_json_object(await request.body(), self.config.max_body_bytes)


def cache_namespace(tenant: str, cache_salt: str | None) -> str:
    """NOTE: the namespace is part of every block hash: tenants (and salts) never share blocks."""
    return f"tenant={tenant}" + (f"|salt={cache_salt}" if cache_salt else "")


async def wait_for_completion(submission: Submission, request: Request) -> Completion | None:
    """Wait for a non-streamed request; None (and the request aborted) if the client went away."""
    try:
        while not submission.finished:
            if await submission.next_update(timeout=0.5) is None and await request.is_disconnected():
                await submission.abort()
                return None
        return await submission.completion()
    except BaseException:
        await submission.abort()
        raise


def model_name_for(engine: Engine) -> str:
    return engine.model_id.split("@", 1)[0]


def create_app(engine: Engine, config: ServerConfig | None = None) -> FastAPI:
    """An app serving `engine`. The engine thread starts and stops with the app's lifespan."""
    from promptstash.server import anthropic_api, openai_api

    config = config or ServerConfig()
    state = ServerState(
        engine=engine, config=config, loop=EngineLoop(engine, config.max_queued_requests),
        stats=ServerStats(engine, config.prices),
        model_name=config.served_model_name or model_name_for(engine), created=int(time.time()),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.loop.start()
        try:
            yield
        finally:
            state.loop.stop()
            engine.close(flush_timeout_s=30)  # queued tier writes reach disk / Redis before we exit

    app = FastAPI(title="promptstash", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.promptstash = state
    app.openapi = lambda: build_openapi(app)  # adds the model routes' bodies, status codes and keys (openapi.py)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(APIError(exc.status_code, str(exc.detail)), request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(APIError(400, str(exc)), request.url.path)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s", request.url.path)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}"), request.url.path)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": state.model_name, "requests_in_flight": state.loop.num_active}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        state.tenant(request)
        entry = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "promptstash",
                 "max_model_len": engine.max_model_len}
        return {"object": "list", "data": [entry]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.stats.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/cache/stats")
    async def cache_stats() -> JSONResponse:
        return JSONResponse(state.stats.snapshot())

    @app.get("/v1/cache/requests")
    async def recent_requests(request: Request, limit: int = 50) -> dict[str, Any]:
        """This tenant's recent requests, newest first, with their cached / uncached split."""
        tenant = state.tenant(request)
        return {"data": state.stats.recent.recent(cache_namespace(tenant, None), max(1, min(limit, 500)))}

    @app.get("/v1/cache/requests/{request_id}/miss")
    async def why_miss(request: Request, request_id: str) -> dict[str, Any]:
        """Why did this request miss? Where its prompt first diverged from the closest earlier prompt."""
        tenant = state.tenant(request)
        report = state.stats.recent.divergence(request_id, cache_namespace(tenant, None))
        if report is None:
            raise APIError(404, f"no recent request {request_id!r} for this API key (the server keeps the last 512)")
        return report

    @app.get("/v1/cache/prefixes")
    async def top_prefixes(request: Request, limit: int = 10) -> dict[str, Any]:
        tenant = state.tenant(request)
        data = await asyncio.to_thread(state.stats.recent.top_prefixes, cache_namespace(tenant, None),
                                       engine.locate_prefix, max(1, min(limit, 100)))
        return {"data": data}

    @app.get("/dashboard")
    async def dashboard() -> Response:
        return HTMLResponse(DASHBOARD_HTML)

    openai_api.register(app, state)
    anthropic_api.register(app, state)
    return app
