"""A request's cost is bounded before the work is done: the body by its Content-Length (or, chunked, as it
streams in), the prompt by its characters before any tokenizing; and JSON, the chat template and the
tokenizer run on worker threads, so a big prompt never stalls the event loop (/health keeps answering)."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from server_helpers import LiveServer, tiny_chat_engine

from promptstash.config import ServerConfig
from promptstash.server.app import create_app

MODEL = "tiny-chat"
CHAT, TEXT, MESSAGES = "/v1/chat/completions", "/v1/completions", "/v1/messages"
ALL_ROUTES = (CHAT, TEXT, MESSAGES)
CAP = 64 * 1024  # max_body_bytes of these servers


def body_for(path: str, text: Any, **extra: Any) -> dict[str, Any]:
    if path == TEXT:
        return {"model": MODEL, "prompt": text, "max_tokens": 1, **extra}
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 1, **extra}


def error_of(path: str, data: dict[str, Any]) -> tuple[str, str | None]:
    """(message, code) from either route format."""
    if path == MESSAGES:
        assert data["type"] == "error"
        return data["error"]["message"], None
    return data["error"]["message"], data["error"]["code"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A 256-token context window (so a small character cap) and a 64 KiB body limit."""
    engine = tiny_chat_engine(tmp_path_factory.mktemp("tok"), max_model_len=256)
    with LiveServer(engine, ServerConfig(max_body_bytes=CAP)) as srv:
        yield srv


# --------------------------------------------------------------------------- the raw HTTP/1.1 socket


def raw_response(sock: socket.socket, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """Read one response (the server closes the connection after a 413)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:length]


def connect(srv: LiveServer) -> socket.socket:
    host, port = srv.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


@pytest.mark.parametrize("path", ALL_ROUTES)
def test_31_mb_content_length_is_413_before_the_body_is_sent(server, path) -> None:
    declared = 31 * 1024 * 1024
    with connect(server) as sock:  # the headers only: a server that waited for the body would never answer
        sock.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     f"content-length: {declared}\r\n\r\n".encode())
        start = time.monotonic()
        status, headers, payload = raw_response(sock, timeout=5)
    assert status == 413 and time.monotonic() - start < 5
    assert headers["connection"] == "close"
    message, _ = error_of(path, json.loads(payload))
    assert str(declared) in message and str(CAP) in message


@pytest.mark.parametrize("path", ALL_ROUTES)
def test_chunked_body_over_the_limit_is_413_while_it_is_still_streaming(server, path) -> None:
    with connect(server) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     "transfer-encoding: chunked\r\n\r\n".encode())
        stop = threading.Event()

        def send_forever() -> None:  # never ends the body: only a server that stops reading can answer
            piece = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
            try:
                for _ in range(100 * CAP // 0x4000):
                    if stop.is_set():
                        return
                    sock.sendall(piece)
            except OSError:
                pass  # the server answered and closed the connection

        sender = threading.Thread(target=send_forever, daemon=True)
        sender.start()
        try:
            status, headers, payload = raw_response(sock, timeout=5)
        finally:
            stop.set()
    assert status == 413 and headers["connection"] == "close"
    message, _ = error_of(path, json.loads(payload))
    assert f"limit of {CAP} bytes" in message


# ------------------------------------------------------------------------- the ASGI app, no socket


async def call_asgi(app, path: str, headers: dict[str, str], chunks) -> tuple[int, dict[str, Any], int]:
    """POST to the app directly; returns (status, JSON body, number of body chunks the app took)."""
    taken = 0
    source = iter(chunks)

    async def receive():
        nonlocal taken
        await asyncio.sleep(0)
        chunk = next(source, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        taken += 1
        return {"type": "http.request", "body": chunk, "more_body": True}

    sent: dict[str, Any] = {"body": b""}

    async def send(message):
        if message["type"] == "http.response.start":
            sent["status"] = message["status"]
        elif message["type"] == "http.response.body":
            sent["body"] += message.get("body", b"")

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return sent["status"], json.loads(sent["body"]), taken


@pytest.fixture(scope="module")
def app(server):
    """The same engine in a second app that is never started: nothing here may reach the engine loop."""
    return create_app(server.engine, ServerConfig(max_body_bytes=CAP))


def test_content_length_over_the_limit_is_refused_without_taking_any_body(app) -> None:
    status, data, taken = asyncio.run(call_asgi(app, CHAT, {"content-length": str(31 * 1024 * 1024)},
                                                itertools.repeat(b"x" * 0x4000, 100 * CAP // 0x4000)))
    assert (status, taken) == (413, 0)
    assert data["error"]["type"] == "invalid_request_error"


def test_chunked_body_is_read_only_up_to_the_limit(app) -> None:
    chunk = 0x4000
    status, data, taken = asyncio.run(call_asgi(app, MESSAGES, {}, itertools.repeat(b"x" * chunk, 100 * CAP // chunk)))
    assert status == 413 and data["error"]["type"] == "request_too_large"
    assert taken * chunk <= CAP + chunk  # stopped at the first chunk past the limit


@pytest.mark.parametrize("value", ["12abc", "-5", "1e3", " ", "0x10"])
def test_malformed_content_length_is_400(app, value) -> None:
    body = json.dumps(body_for(CHAT, "hi")).encode()
    status, data, taken = asyncio.run(call_asgi(app, CHAT, {"content-length": value}, [body]))
    assert status == 400 and "Content-Length" in data["error"]["message"] and taken == 0


# --------------------------------------------------------------------------------- prompt characters


@pytest.fixture
def tokenizer_calls(server, monkeypatch) -> list[str]:
    """Every call into the tokenizer (or the chat template) from now on."""
    calls: list[str] = []
    tok = server.engine.tokenizer
    for name in ("encode", "token_ends", "apply_chat_template"):
        original = getattr(tok, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(tok, name, spy)
    return calls


@pytest.mark.parametrize("path", ALL_ROUTES)
def test_prompt_over_the_character_cap_is_400_without_tokenizing(server, tokenizer_calls, path) -> None:
    limit = server.engine.max_prompt_chars
    text = "y" * (limit + 1)
    if path == MESSAGES:  # every block counts: the system prompt's and the messages'
        body = body_for(path, [{"type": "text", "text": text[: limit // 2]}], system=text[limit // 2:])
    else:
        body = body_for(path, text)
    start = time.monotonic()
    response = httpx.post(server.url + path, json=body, timeout=30)
    assert response.status_code == 400, response.text
    message, code = error_of(path, response.json())
    assert f"prompt has {limit + 1} characters" in message and f"at most {limit} characters" in message
    if path != MESSAGES:
        assert code == "context_length_exceeded"
    assert tokenizer_calls == []
    assert time.monotonic() - start < 5
    ok = httpx.post(server.url + path, json=body_for(path, "hello world"), timeout=30)  # a small one still runs
    assert ok.status_code == 200 and tokenizer_calls


# --------------------------------------------------------------------------------- the event loop


@pytest.mark.parametrize("path", ALL_ROUTES)
def test_health_answers_within_1s_while_a_large_prompt_is_being_tokenized(server, monkeypatch, path) -> None:
    entered, release = threading.Event(), threading.Event()
    tok = server.engine.tokenizer
    for name in ("encode", "token_ends"):  # tokenizing takes as long as the test wants
        original = getattr(tok, name)

        def slow(*args, _original=original, **kwargs):
            entered.set()
            release.wait(10)
            return _original(*args, **kwargs)

        monkeypatch.setattr(tok, name, slow)
    text = "hello world " * (server.engine.max_prompt_chars // 24)  # under the cap; 277 tokens, over the window
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, server.url + path, json=body_for(path, text), timeout=30)
        try:
            assert entered.wait(10), "the request never reached the tokenizer"
            start = time.monotonic()
            health = httpx.get(server.url + "/health", timeout=1)
            elapsed = time.monotonic() - start
        finally:
            release.set()
        response = pending.result(timeout=30)
    assert health.status_code == 200 and elapsed < 1
    assert response.status_code == 400  # tokenized in full: more tokens than the 256-token window
    message, code = error_of(path, response.json())
    assert "tokens" in message and "context window" in message
