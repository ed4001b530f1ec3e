"""Web clients: CORS (--cors-allow-origin) with preflights, in headless Chromium too; GET /v1/models/{id} through
both SDKs; the /docs and /redoc pages served with local assets (no CDN), rendered by a real browser."""

from __future__ import annotations

import http.server
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest
from server_helpers import LiveServer, tiny_chat_engine

from promptstash.cli import main as cli_main
from promptstash.config import ServerConfig
from promptstash.errors import InvalidRequestError

ALLOWED = "http://localhost:3000"
SDK_HEADERS = ("authorization, x-api-key, content-type, anthropic-version, anthropic-beta, openai-beta, "
               "x-stainless-os, x-stainless-lang, x-stainless-retry-count, x-stainless-helper-method")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A fresh engine for each server. NOTE: two live servers on one engine run two engine loops, and each
    loop aborts the requests the other one tracks as orphans (the 500 'finish reason abort' once seen here)."""
    return lambda: tiny_chat_engine(tmp_path_factory.mktemp("web"))


@pytest.fixture(scope="module")
def plain(engine) -> Iterator[LiveServer]:
    with LiveServer(engine()) as srv:
        yield srv


@pytest.fixture(scope="module")
def cors(engine) -> Iterator[LiveServer]:
    with LiveServer(engine(), ServerConfig(cors_allow_origins=(ALLOWED, "https://app.example.com"))) as srv:
        yield srv


def preflight(url: str, origin: str, method: str = "POST", headers: str = SDK_HEADERS) -> httpx.Response:
    return httpx.options(url, headers={"Origin": origin, "Access-Control-Request-Method": method,
                                       "Access-Control-Request-Headers": headers}, timeout=10)


def chat(url: str, **headers: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers=headers, timeout=30,
                      json={"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})


# -- CORS -------------------------------------------------------------------------------------------------------

def test_without_the_flag_no_cors_headers_and_a_preflight_is_refused(plain) -> None:
    response = preflight(plain.url + "/v1/chat/completions", ALLOWED)
    assert response.status_code == 405
    assert "access-control-allow-origin" not in response.headers
    response = chat(plain.url, Origin=ALLOWED)
    assert response.status_code == 200
    assert not any(h.startswith("access-control-") for h in response.headers)


@pytest.mark.parametrize("path,method", [("/v1/chat/completions", "POST"), ("/v1/messages", "POST"),
                                         ("/v1/messages/count_tokens", "POST"), ("/v1/models", "GET"),
                                         ("/v1/models/default", "GET"), ("/v1/modules/x", "DELETE")])
def test_preflight_from_an_allowed_origin_allows_the_sdk_headers(cors, path: str, method: str) -> None:
    response = preflight(cors.url + path, ALLOWED, method)
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert method in response.headers["access-control-allow-methods"]
    allowed = {h.strip() for h in response.headers["access-control-allow-headers"].lower().split(",")}
    assert {h.strip() for h in SDK_HEADERS.split(",")} <= allowed
    assert "origin" in response.headers["vary"].lower()


def test_preflight_from_another_origin_is_refused(cors) -> None:
    response = preflight(cors.url + "/v1/chat/completions", "http://evil.example.com")
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers
    response = chat(cors.url, Origin="http://evil.example.com")
    assert response.status_code == 200  # the browser, not the server, withholds the answer from that page
    assert "access-control-allow-origin" not in response.headers


def test_responses_and_errors_carry_the_cors_headers(cors) -> None:
    response = chat(cors.url, Origin="https://app.example.com")
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://app.example.com"
    exposed = response.headers["access-control-expose-headers"].lower()
    assert "x-request-id" in exposed and "retry-after" in exposed
    bad = httpx.post(cors.url + "/v1/chat/completions", headers={"Origin": ALLOWED}, json={"model": "default"},
                     timeout=10)
    assert bad.status_code == 400 and bad.headers["access-control-allow-origin"] == ALLOWED  # readable by the page
    with httpx.stream("POST", cors.url + "/v1/chat/completions", headers={"Origin": ALLOWED}, timeout=30,
                      json={"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                            "stream": True}) as streamed:
        assert streamed.status_code == 200 and streamed.headers["access-control-allow-origin"] == ALLOWED
        assert b"[DONE]" in streamed.read()


def test_any_origin_with_star(engine) -> None:
    with LiveServer(engine(), ServerConfig(cors_allow_origins=("*",), api_keys={"sk-web": "web"})) as srv:
        response = preflight(srv.url + "/v1/messages", "https://anything.example.org")
        assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "*"
        assert "authorization" in response.headers["access-control-allow-headers"].lower()
        missing_key = chat(srv.url, Origin="https://anything.example.org")
        assert missing_key.status_code == 401 and missing_key.headers["access-control-allow-origin"] == "*"
        ok = chat(srv.url, Origin="https://anything.example.org", Authorization="Bearer sk-web")
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "*"


def test_origins_are_checked_and_normalised() -> None:
    config = ServerConfig(cors_allow_origins=["HTTP://LocalHost:3000/", "*"])
    assert config.cors_allow_origins == ("http://localhost:3000", "*")
    for bad in ("localhost:3000", "http://localhost:3000/app", "", "http://"):
        with pytest.raises(InvalidRequestError, match="cors_allow_origins"):
            ServerConfig(cors_allow_origins=(bad,))


def test_serve_refuses_a_bad_origin_before_loading_the_model(capsys) -> None:
    assert cli_main(["serve", "--cors-allow-origin", "http://ok.example.com,localhost:3000"]) == 1
    assert "error: cors_allow_origins: 'localhost:3000' is not an origin" in capsys.readouterr().err


# -- GET /v1/models/{id} ----------------------------------------------------------------------------------------

def test_retrieve_model_with_both_sdks(plain) -> None:
    name = plain.state.model_name
    client = openai.OpenAI(base_url=plain.url + "/v1", api_key="unused", max_retries=0)
    model = client.models.retrieve(name)
    assert (model.id, model.object, model.owned_by) == (name, "model", "promptstash")
    assert client.models.retrieve("default").id == "default"
    assert [m.id for m in client.models.list()] == [name]
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4o")
    assert info.value.code == "model_not_found" and "gpt-4o" in info.value.message
    claude = anthropic.Anthropic(base_url=plain.url, api_key="unused", max_retries=0)
    info_ = claude.models.retrieve(name)
    assert (info_.id, info_.type, info_.display_name) == (name, "model", name)
    assert info_.created_at.timestamp() == plain.state.created
    assert [m.id for m in claude.models.list()] == [name]


def test_retrieve_model_needs_a_key_when_keys_are_set(engine) -> None:
    with LiveServer(engine(), ServerConfig(api_keys={"sk-a": "a"})) as srv:
        assert httpx.get(srv.url + "/v1/models/default", timeout=10).status_code == 401
        ok = httpx.get(srv.url + "/v1/models/default", headers={"x-api-key": "sk-a"}, timeout=10)
        assert ok.status_code == 200 and ok.json()["id"] == "default"
        gone = httpx.get(srv.url + "/v1/models/a/b%2Fc", headers={"x-api-key": "sk-a"}, timeout=10)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


# -- /docs and /redoc -------------------------------------------------------------------------------------------

def local_assets(page: str) -> list[str]:
    """Every script / stylesheet / icon URL of the page; all must be local paths."""
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page) + re.findall(r"""url: ?["']([^"']+)["']""", page)
    assert urls
    external = [u for u in urls if re.match(r"^(https?:)?//", u)]
    assert not external, f"the page loads assets from elsewhere: {external}"
    return urls


@pytest.mark.parametrize("page,scripts", [("/docs", ("swagger-ui-bundle.js", "swagger-ui.css")),
                                          ("/redoc", ("redoc.standalone.js",))])
def test_docs_pages_load_local_assets(plain, page: str, scripts: tuple[str, ...]) -> None:
    response = httpx.get(plain.url + page, timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in response.text
    urls = local_assets(response.text)
    for name in scripts:
        assert f"/docs/assets/{name}" in urls
    for url in urls:
        if url.startswith("/"):
            asset = httpx.get(plain.url + url, timeout=10)
            assert asset.status_code == 200, url
            assert len(asset.content) > 1000, url
    doc = httpx.get(plain.url + "/openapi.json", timeout=10).json()
    assert "/v1/models/{model_id}" in doc["paths"] and "/docs" not in doc["paths"]


def chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    return binary


def dump_dom(url: str, budget_ms: int = 8000) -> str:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--virtual-time-budget={budget_ms}", "--dump-dom", url]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow  # headless Chromium
def test_swagger_ui_renders_the_routes_offline_in_chromium(plain) -> None:
    dom = dump_dom(plain.url + "/docs")
    for path in ("/v1/chat/completions", "/v1/messages", "/v1/models/{model_id}"):
        assert f'data-path="{path}"' in dom, f"{path} not rendered by Swagger UI"
    assert "Unable to render this definition" not in dom


class _PageHandler(http.server.BaseHTTPRequestHandler):
    """Serves one page that calls the API with fetch() from another origin, as a browser app would."""
    api_url = ""

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        script = f"""
          fetch("{self.api_url}/v1/chat/completions", {{method: "POST",
              headers: {{"Content-Type": "application/json", "Authorization": "Bearer sk-page",
                         "x-stainless-lang": "js"}},
              body: JSON.stringify({{model: "default", messages: [{{role: "user", content: "hi"}}], max_tokens: 2}})}})
            .then(r => r.json().then(j => [r.headers.get("x-request-id"), j, r.status]))
            .then(([id, j, status]) => {{ document.getElementById("out").textContent = "OK " + j.object + " " + id
                + (status === 200 ? "" : " status " + status + " " + JSON.stringify(j).slice(0, 300)); }})
            .catch(e => {{ document.getElementById("out").textContent = "FAILED " + e; }});"""
        body = f'<html><body><div id="out">pending</div><script>{script}</script></body></html>'.encode()
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.slow  # headless Chromium
def test_a_page_on_another_origin_calls_the_api_only_when_allowed(engine) -> None:
    page_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PageHandler)
    threading.Thread(target=page_server.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{page_server.server_address[1]}"
    try:
        keys = {"sk-page": "page"}
        # allowed: the page reads the answer and the exposed x-request-id header; not allowed: fetch() fails
        for origins, expected in (((), r"FAILED TypeError: Failed to fetch"),
                                  ((origin,), r"OK chat\.completion [0-9a-f]{24}")):
            with LiveServer(engine(), ServerConfig(api_keys=keys, cors_allow_origins=origins)) as srv:
                _PageHandler.api_url = srv.url
                out = re.search(r'id="out">([^<]*)<', dump_dom(origin + "/"))
                assert out and re.fullmatch(expected, out.group(1)), (origins, out and out.group(1))
    finally:
        page_server.shutdown()
