"""What browsers and API explorers need: CORS (--cors-allow-origin), GET /v1/models/{id}, and the API reference
pages /docs (Swagger UI) and /redoc (ReDoc) describing /openapi.json.

FastAPI's own pages load their JavaScript from a CDN, which a machine without internet access cannot reach; these
load it from /docs/assets/, files shipped by the fastapi-offline package and served by this server.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.cors import CORSMiddleware

from promptstash.server.errors import APIError
from promptstash.server.state import ServerState

ASSETS_URL = "/docs/assets"
# Response headers a browser page may read: the request id (for /v1/cache/requests/{id}/miss), the retry hint and
# the replica that answered.
EXPOSED_HEADERS = ("x-request-id", "retry-after", "x-promptstash-replica")


def install_cors(app: FastAPI, origins: tuple[str, ...]) -> None:
    """Answer CORS preflights and add CORS headers for `origins` ("*" = any); nothing when `origins` is empty.

    Any request header is allowed (a preflight's Access-Control-Request-Headers are echoed back): the SDKs send
    authorization / x-api-key, content-type, anthropic-version, anthropic-beta, openai-beta and a family of
    x-stainless-* headers that grows with each release. No credentials (cookies): keys travel in headers.
    A page on a public origin calling a server on localhost is allowed too (Private Network Access), since the
    origin was allowed explicitly. Must be called before the app starts.
    """
    if not origins:
        return
    app.add_middleware(CORSMiddleware, allow_origins=list(origins), allow_methods=["GET", "POST", "DELETE"],
                       allow_headers=["*"], expose_headers=list(EXPOSED_HEADERS), allow_private_network=True,
                       max_age=600)


def model_object(state: ServerState, model_id: str) -> dict[str, Any]:
    """The served model as both SDKs read it: OpenAI's model object (id, object, created, owned_by) and
    Anthropic's (id, type, display_name, created_at), plus the context window."""
    created = datetime.fromtimestamp(state.created, UTC).isoformat().replace("+00:00", "Z")
    return {"id": model_id, "object": "model", "created": state.created, "owned_by": "promptstash",
            "type": "model", "display_name": state.model_name, "created_at": created,
            "max_model_len": state.engine.max_model_len}


def _assets_dir() -> Path | None:
    try:
        import fastapi_offline
    except ImportError:
        return None
    path = Path(fastapi_offline.__file__).parent / "static"
    return path if (path / "swagger-ui-bundle.js").is_file() else None


def register(app: FastAPI, state: ServerState) -> None:
    """GET /v1/models/{model_id}, /docs, /redoc and their assets."""

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(request: Request, model_id: str) -> dict[str, Any]:
        """The served model under any of its names; another id is a 404 in OpenAI's error format."""
        state.tenant(request)
        if model_id not in state.model_names():
            raise APIError(404, f"model {model_id!r} not found; this server serves {state.model_name!r}",
                           param="model", code="model_not_found")
        return model_object(state, model_id)

    assets = _assets_dir()

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        _require(assets)
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} API",
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js", swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
            swagger_ui_parameters={"persistAuthorization": True, "displayRequestDuration": True})

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        _require(assets)
        return get_redoc_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} API",
                              redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
                              redoc_favicon_url=f"{ASSETS_URL}/favicon.png", with_google_fonts=False)

    if assets is not None:
        app.mount(ASSETS_URL, StaticFiles(directory=assets), name="docs-assets")


def _require(assets: Path | None) -> None:
    if assets is None:
        raise APIError(404, "the API reference pages need the fastapi-offline package (pip install fastapi-offline); "
                            "the document itself is at /openapi.json")
