"""The ASGI app: errors, the non-model routes (/health, /v1/models, /metrics, /v1/cache/*, /dashboard) and the
--metrics-port listener. The model routes live in openai_api.py and anthropic_api.py, the module registry
(/v1/modules) in modules_api.py; the state they share (auth, tenants, namespaces, body limits) in state.py.

Every response carries x-promptstash-replica: the replica's name (--replica-id, else hostname:port), the name its KV
events and blocks summary use. A server with a Redis KV tier claims that Redis for its model at start
(cache/tiers/claim.py): create_app raises ModelMismatchError when replicas of another model hold it. The Responses
API's stored responses live in that Redis too (response_store_for), so any replica answers a follow-up."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from promptstash.cache.events import KVEventSink, RedisStreamPublisher
from promptstash.cache.tiers.claim import ModelClaim, ModelMismatchError
from promptstash.config import ServerConfig
from promptstash.engine.engine import Engine
from promptstash.server import anthropic_api, modules_api, openai_api, responses_api, tokens_api, web
from promptstash.server.dashboard import DASHBOARD_HTML
from promptstash.server.errors import APIError, error_response
from promptstash.server.loop import EngineLoop
from promptstash.server.metrics import ServerStats
from promptstash.server.openapi import build_openapi
from promptstash.server.response_store import ResponseStorage, ResponseStore
from promptstash.server.response_store_redis import RedisResponseStore
from promptstash.server.state import ServerState, model_name_for

log = logging.getLogger("promptstash.server")

REPLICA_HEADER = "x-promptstash-replica"


class ReplicaHeader:
    """Pure ASGI middleware: adds `x-promptstash-replica: <replica>` to every HTTP response, streamed ones included
    (it only touches the http.response.start message, so bodies pass through unbuffered)."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode("latin-1"), replica.encode("latin-1", errors="replace"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_replica(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_replica)


class PromptstashApp(FastAPI):
    """FastAPI with ReplicaHeader outermost.

    NOTE: outside Starlette's ServerErrorMiddleware (which app.add_middleware cannot reach), so that the 500s it
    sends for unhandled exceptions carry the header too."""

    def __init__(self, replica: str, **kwargs: Any) -> None:
        self.replica = replica
        super().__init__(**kwargs)

    def build_middleware_stack(self) -> ASGIApp:
        return ReplicaHeader(super().build_middleware_stack(), self.replica)


def metrics_response(state: ServerState, tenant: str | None) -> Response:
    """Prometheus text: every figure (tenant None), or one tenant's series of the per-request families."""
    source = state.stats.registry if tenant is None else state.stats.tenant_view(tenant)
    return Response(generate_latest(source), media_type=CONTENT_TYPE_LATEST)


class MetricsListener:
    """--metrics-port: /metrics alone, every figure and no key, on a second socket (for scrapers inside a
    trusted network), served by its own uvicorn server on its own thread, so a busy main loop never
    delays a scrape."""

    def __init__(self, state: ServerState, host: str, port: int) -> None:
        app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

        @app.get("/metrics")
        async def metrics() -> Response:
            return await asyncio.to_thread(metrics_response, state, None)

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, name="promptstash-metrics", daemon=True)

    def start(self, timeout_s: float = 10.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the metrics listener could not listen on {self.server.config.host}:"
                                   f"{self.server.config.port} (is the port in use?)")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def response_store_for(engine: Engine) -> ResponseStorage:
    """Where the Responses API keeps stored responses: the engine's shared Redis when it has one (and prefix caching,
    as for the KV tier), so every replica finds them; else this process's memory."""
    if engine.config.redis_url and engine.config.enable_prefix_caching:
        return RedisResponseStore(engine.config.redis_url)
    return ResponseStore()


def create_app(engine: Engine, config: ServerConfig | None = None) -> FastAPI:
    """An app serving `engine`. The engine thread (and the --metrics-port listener, and the model claim's refresh
    thread) start and stop with the app's lifespan.

    With a Redis KV tier, claims that Redis for the engine's model id and KV layout first (cache/tiers/claim.py):
    raises ModelMismatchError when replicas of another model or layout hold it; a Redis that cannot be reached
    only logs a warning (the refresh thread claims it later)."""
    config = config or ServerConfig()
    state = ServerState(
        engine=engine, config=config,
        loop=EngineLoop(engine, max_queued_requests=config.max_queued_requests,
                        tenant_max_queued=config.tenant_max_queued,
                        stream_idle_timeout_s=config.stream_idle_timeout_s),
        stats=ServerStats(engine, config.prices),
        model_name=config.served_model_name or model_name_for(engine), created=int(time.time()),
    )
    replica = config.replica_id or f"{socket.gethostname()}:{config.port}"
    claim = None
    if engine.config.redis_url and engine.config.enable_prefix_caching:
        claim = ModelClaim(engine.config.redis_url, engine.model_id, engine.cache.kv_layout, replica)
        try:
            claim.claim()  # NOTE: before anything else starts: a mismatch stops the server here
        except ModelMismatchError:
            claim.stop()
            raise
    responses = response_store_for(engine)
    kv_events = None
    if config.kv_events_url:  # KV events for external routers (cache/events.py; README "KV events")
        kv_events = KVEventSink(RedisStreamPublisher(config.kv_events_url), replica)
        engine.set_kv_events(kv_events)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        listener = None
        if config.metrics_port is not None:
            listener = MetricsListener(state, config.host, config.metrics_port)
            await asyncio.to_thread(listener.start)
        if kv_events is not None:
            kv_events.start()  # its first batch resets this replica's state in consumers
        if claim is not None:
            claim.start()
        state.loop.start()
        try:
            yield
        finally:
            state.loop.stop()
            if listener is not None:
                await asyncio.to_thread(listener.stop)
            engine.close(flush_timeout_s=30)  # queued tier writes reach disk / Redis before we exit
            if kv_events is not None:
                await asyncio.to_thread(kv_events.close)  # ["cleared"]: this replica's blocks are gone
            if claim is not None:
                await asyncio.to_thread(claim.stop)
            await asyncio.to_thread(responses.close)

    app = PromptstashApp(replica, title="promptstash", lifespan=lifespan, docs_url=None, redoc_url=None,
                         openapi_url="/openapi.json")
    app.state.promptstash = state
    web.install_cors(app, config.cors_allow_origins)
    app.openapi = lambda: build_openapi(app)  # adds the model routes' bodies, status codes and keys (openapi.py)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=499)  # the client hung up mid-body: nobody reads this, nothing to log

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
        return {"object": "list", "data": [web.model_object(state, state.model_name)],
                "has_more": False, "first_id": state.model_name, "last_id": state.model_name}  # Anthropic's list

    def scope(request: Request) -> str | None:
        """Whose figures the caller may see: its tenant, or None (all) for an admin or the local tenant."""
        caller = state.caller(request)
        return None if caller.sees_all else caller.tenant

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        """Every figure for an admin or the metrics key (or without keys); a tenant's own series for its key."""
        caller = state.caller(request, metrics=True)
        return await asyncio.to_thread(metrics_response, state, None if caller.sees_all else caller.tenant)

    @app.get("/v1/cache/stats")
    async def cache_stats(request: Request) -> JSONResponse:
        return JSONResponse(await asyncio.to_thread(state.stats.snapshot, scope(request)))

    @app.get("/v1/cache/blocks/summary")
    async def blocks_summary(request: Request, full: int = 0) -> dict[str, Any]:
        """This replica's stored block hashes (the set KV events describe): count, digest, last event seq; with
        full=1 the hashes themselves (at most the pool's block count). Pool-wide: admins and all-figure callers."""
        if scope(request) is not None:
            raise APIError(403, "the blocks summary is pool-wide: it needs an admin key")
        summary = await asyncio.to_thread(engine.kv_blocks_summary, replica, bool(full))
        body: dict[str, Any] = {"replica": summary.replica, "num_blocks": summary.num_blocks,
                                "digest": summary.digest, "seq": summary.seq,
                                "events": None if kv_events is None else kv_events.stats()}
        if summary.hashes is not None:
            body["hashes"] = list(summary.hashes)
        return body

    @app.get("/v1/cache/requests")
    async def recent_requests(request: Request, limit: int = 50) -> dict[str, Any]:
        """This tenant's recent requests (an admin: everyone's), newest first, with their cached / uncached split."""
        return {"data": state.stats.recent.recent(scope(request), max(1, min(limit, 500)))}

    @app.get("/v1/cache/requests/{request_id}/miss")
    async def why_miss(request: Request, request_id: str) -> dict[str, Any]:
        """Why did this request miss? Where its prompt first diverged from the closest earlier prompt, and what
        became of its modules (hits, misses, reused and recomputed tokens)."""
        who = scope(request)
        report = await asyncio.to_thread(state.stats.recent.divergence, request_id, who)
        if report is None:
            raise APIError(404, f"no recent request {request_id!r} for this API key (the server keeps the last 512)")
        return report

    @app.get("/v1/cache/prefixes")
    async def top_prefixes(request: Request, limit: int = 10) -> dict[str, Any]:
        data = await asyncio.to_thread(state.stats.recent.top_prefixes, scope(request), engine.locate_prefix,
                                       max(1, min(limit, 100)))
        return {"data": data}

    @app.get("/dashboard")
    async def dashboard(request: Request) -> Response:
        """The page is static, but it is only served to a key holder (open it as /dashboard?key=KEY)."""
        state.caller(request, query_key=True)
        return HTMLResponse(DASHBOARD_HTML)

    openai_api.register(app, state)
    anthropic_api.register(app, state)
    modules_api.register(app, state)
    tokens_api.register(app, state)
    web.register(app, state)
    responses_api.register(app, state, responses)
    return app
