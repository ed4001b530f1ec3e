"""Regression tests for the hardening defects, seen from outside: real HTTP against a live server with the tiny
chat model. Each test is named after the defect it proves fixed (a tiny temperature hung the request, in-flight
slots leaked when clients disconnected, damaged tier entries found at load time were not counted, a slow tier
load stalled the server, a client that never reads held a generation slot until max_tokens), or that it
exposes (a client hanging up mid-body is logged as an internal error; a slow tier load holds up new requests).
The engine-level tests of the same defects are in test_engine_hardening.py."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import LiveServer, no_errors_logged, tiny_chat_engine

from promptstash.cache.hashing import extend_hashes, root_hash
from promptstash.cache.tiers.disk import DiskTier
from promptstash.config import ServerConfig
from promptstash.engine.engine import Engine
from promptstash.server.state import LOCAL_TENANT, cache_namespace

pytestmark = pytest.mark.timeout(90)

MODEL = "tiny-chat"
CHAT, TEXT, MESSAGES = "/v1/chat/completions", "/v1/completions", "/v1/messages"
ALL_ROUTES = (CHAT, TEXT, MESSAGES)
OPENAI_ROUTES = (CHAT, TEXT)
TINY_TEMPERATURES = (1e-300, 1e-45, 1e-39, 5e-324)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def no_internal_errors():
    """No test may make the server log an error (a 500, an exception escaping the app, a failed step)."""
    with no_errors_logged("promptstash.server", "promptstash.engine", "uvicorn.error") as handler:
        yield handler


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = tiny_chat_engine(tmp_path_factory.mktemp("tok"))
    with LiveServer(engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def bounded(tmp_path_factory):
    """At most 64 requests in flight; a pool big enough that 64 held streams never preempt each other."""
    engine = tiny_chat_engine(tmp_path_factory.mktemp("tok"), kv_cache_tokens=32768)
    with LiveServer(engine, ServerConfig(max_queued_requests=64)) as srv:
        yield srv


# ---------------------------------------------------------------------------------------------- helpers


def body_for(path: str, text: str, *, max_tokens: int, stream: bool = False, **fields: Any) -> dict[str, Any]:
    """A request for `path`; `ignore_eos` is only sent to the OpenAI routes (Anthropic's has no such field)."""
    if path == TEXT:
        body: dict[str, Any] = {"model": MODEL, "prompt": text}
    else:
        body = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    body.update(max_tokens=max_tokens, stream=stream, **fields)
    if path == MESSAGES:
        body.pop("ignore_eos", None)
        body.pop("seed", None)
    return body


def parse_response(path: str, response: httpx.Response, stream: bool) -> tuple[str, str]:
    """(generated text, finish reason) of a 200, streamed or not; a stream must end properly."""
    assert response.status_code == 200, response.text
    if not stream:
        data = response.json()
        if path == MESSAGES:
            return "".join(part["text"] for part in data["content"]), data["stop_reason"]
        choice = data["choices"][0]
        return (choice["message"]["content"] if path == CHAT else choice["text"]), choice["finish_reason"]
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = [line[len("data:"):].strip() for line in response.text.splitlines() if line.startswith("data:")]
    text, finish = [], None
    if path == MESSAGES:
        events = [json.loads(p) for p in payloads]
        assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop", events
        for event in events:
            if event["type"] == "content_block_delta":
                text.append(event["delta"]["text"])
            elif event["type"] == "message_delta":
                finish = event["delta"]["stop_reason"]
    else:
        assert payloads[-1] == "[DONE]", payloads[-3:]
        for payload in payloads[:-1]:
            choice = json.loads(payload)["choices"][0]
            text.append((choice["delta"].get("content") or "") if path == CHAT else choice["text"])
            finish = choice["finish_reason"] or finish
    assert finish is not None, payloads
    return "".join(text), finish


def held_by_requests(srv: LiveServer) -> int:
    """Blocks in use beyond the pins of TTL protection (cache_control / 24h retention hold one reference each)."""
    cache = srv.engine.stats().cache
    return cache.usage.num_in_use - sum(cache.num_protected_blocks.values())


def wait_idle(srv: LiveServer, timeout: float = 10.0) -> None:
    """Every request released (the in-flight count is 0) and no KV block held by a request, within `timeout`."""
    deadline = time.monotonic() + timeout
    while srv.state.loop.num_active or srv.engine.num_unfinished() or held_by_requests(srv):
        assert time.monotonic() < deadline, (f"after {timeout} s: {srv.state.loop.num_active} in flight, "
                                             f"{srv.engine.num_unfinished()} unfinished, "
                                             f"{held_by_requests(srv)} blocks held")
        time.sleep(0.02)


def host_port(srv: LiveServer) -> tuple[str, int]:
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def raw_request(srv: LiveServer, path: str, body: dict[str, Any]) -> tuple[bytes, bytes]:
    """(head, body) of an HTTP/1.1 POST, written by hand."""
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {srv.url.removeprefix('http://')}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    return head, payload


# ------------------------------------------------------------------------- 1. tiny temperatures


_greedy: dict[tuple[str, str], tuple[str, str]] = {}


def _greedy_reference(srv: LiveServer, path: str, prompt: str) -> tuple[str, str]:
    key = (path, prompt)
    if key not in _greedy:
        body = body_for(path, prompt, max_tokens=12, temperature=0.0, ignore_eos=True)
        _greedy[key] = parse_response(path, httpx.post(srv.url + path, json=body, timeout=30), False)
    return _greedy[key]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("path", ALL_ROUTES)
@pytest.mark.parametrize("temperature", TINY_TEMPERATURES, ids=str)
def test_tiny_temperature_no_longer_hangs_the_request_or_spins_the_engine(server, temperature, path,
                                                                          stream) -> None:
    prompt = "tell me about prompt caches"
    reference = _greedy_reference(server, path, prompt)
    body = body_for(path, prompt, max_tokens=12, stream=stream, temperature=temperature, ignore_eos=True, seed=7)
    assert json.loads(json.dumps(body))["temperature"] == temperature  # sent as written, not rounded to 0
    start = time.monotonic()
    text, finish = parse_response(path, httpx.post(server.url + path, json=body, timeout=30), stream)
    assert time.monotonic() - start < 20
    assert finish in (("max_tokens", "end_turn") if path == MESSAGES else ("length", "stop"))
    assert (text, finish) == reference  # greedy: exactly the temperature-0 output
    wait_idle(server, timeout=5)
    assert server.state.loop.num_active == 0 and server.engine.num_unfinished() == 0
    steps = server.engine.stats().num_steps
    time.sleep(0.2)
    assert server.engine.stats().num_steps == steps  # nothing left stepping in the background
    assert server.state.loop.num_step_errors == 0
    server.engine.check_integrity()


# ----------------------------------------------------------------- 2. slots leaked on disconnects


async def _client(client: httpx.AsyncClient, srv: LiveServer, i: int, how: str) -> str:
    """One streaming client of a disconnect round; returns what it did.

    how: "read"          read the whole stream and check that it ended properly
         "leave-after-N" close the stream after N data chunks (1-3)
         "leave-at-headers"  close the stream as soon as the response headers arrived
         "leave-unread"  send the whole request, then hang up without reading anything (raw socket)
    """
    path = ALL_ROUTES[i % 3]
    prompt = f"shared instructions for every client. client number {i} asks a question {i * 7}"
    body = body_for(path, prompt, max_tokens=20 + i % 21, stream=True, ignore_eos=True)
    if how == "leave-unread":
        head, payload = raw_request(srv, path, body)
        _, writer = await asyncio.open_connection(*host_port(srv))
        writer.write(head + payload)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        return how
    async with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, await response.aread()
        if how == "leave-at-headers":
            return how
        if how.startswith("leave-after-"):
            wanted, seen = int(how.rsplit("-", 1)[1]), 0
            async for line in response.aiter_lines():
                seen += line.startswith("data:")
                if seen >= wanted:
                    return how
            return how
        lines = [line async for line in response.aiter_lines()]
    assert lines and any(line.startswith("data:") for line in lines)
    last = [line for line in lines if line.startswith("data:")][-1]
    assert last in ("data: [DONE]", 'data: {"type":"message_stop"}'), lines[-4:]
    return how


def _plan(round_no: int, n: int = 48) -> list[str]:
    """10 (~20%) leave mid-stream, 4 more leave before any chunk, the rest read to the end; shuffled per round."""
    leavers = [f"leave-after-{1 + k % 3}" for k in range(10)]
    leavers += ["leave-at-headers", "leave-at-headers", "leave-unread", "leave-unread"]
    plan = leavers + ["read"] * (n - len(leavers))
    random.Random(round_no).shuffle(plan)
    return plan


async def _disconnect_round(srv: LiveServer, round_no: int) -> list[str]:
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=srv.url, timeout=30, limits=limits) as client:
        plan = _plan(round_no)
        return await asyncio.gather(*(_client(client, srv, i, how) for i, how in enumerate(plan)))


async def _hold_full_queue(srv: LiveServer, limit: int) -> None:
    """`limit` long streams at once (all admitted), one more refused on each route, then every stream closed."""
    limits = httpx.Limits(max_connections=limit + 10, max_keepalive_connections=limit + 10)
    async with httpx.AsyncClient(base_url=srv.url, timeout=30, limits=limits) as client:
        held: list[httpx.Response] = []
        try:
            async def open_one(i: int) -> httpx.Response:
                path = OPENAI_ROUTES[i % 2]
                body = body_for(path, f"hold the line {i}", max_tokens=1500, stream=True, ignore_eos=True)
                response = await client.send(client.build_request("POST", path, json=body), stream=True)
                held.append(response)
                return response

            responses = await asyncio.gather(*(open_one(i) for i in range(limit)))
            statuses = [r.status_code for r in responses]
            assert statuses == [200] * limit, statuses  # the slots of every earlier round came back
            assert srv.state.loop.num_active == limit
            for path, status in ((TEXT, 429), (CHAT, 429), (MESSAGES, 529)):
                refused = await client.post(path, json=body_for(path, "one too many", max_tokens=4))
                assert refused.status_code == status, refused.text
        finally:
            for response in held:
                await response.aclose()


def test_in_flight_slots_no_longer_leak_when_clients_disconnect_under_concurrency(bounded) -> None:
    srv, engine = bounded, bounded.engine
    start = time.monotonic()
    for round_no in range(3):
        done = asyncio.run(_disconnect_round(srv, round_no))
        assert len(done) == 48 and sum(how != "read" for how in done) == 14
        wait_idle(srv, timeout=10)
        engine.check_integrity()
    limit = srv.state.config.max_queued_requests
    assert limit == 64
    asyncio.run(_hold_full_queue(srv, limit))  # a round of 64 that is not refused, then 64 more disconnects
    wait_idle(srv, timeout=10)
    engine.check_integrity()
    assert srv.state.loop.num_step_errors == 0 and srv.state.loop.num_reconciled == 0
    for path in ALL_ROUTES:  # still serving
        response = httpx.post(srv.url + path, json=body_for(path, "after the storm", max_tokens=4), timeout=30)
        parse_response(path, response, False)
    wait_idle(srv, timeout=10)
    assert time.monotonic() - start < 30


def wait_http_tasks(srv: LiveServer, running: bool, timeout: float = 10.0) -> None:
    """Until a request handler is running (running=True), or every one has ended, having logged what it logs."""
    deadline = time.monotonic() + timeout
    while bool(srv._server.server_state.tasks) != running:
        assert time.monotonic() < deadline, "a request handler is still running" if not running else "none started"
        time.sleep(0.01)


@pytest.mark.parametrize("path", ALL_ROUTES)
def test_a_client_that_hangs_up_while_sending_its_body_is_not_an_internal_error(server, path,
                                                                               no_internal_errors) -> None:
    """A disconnect while the body is being read is the client's doing: no 500 and no error logged (the
    no_internal_errors fixture), and nothing is left in flight."""
    head, payload = raw_request(server, path, body_for(path, "never finished", max_tokens=4, stream=True))
    with socket.create_connection(host_port(server)) as sock:
        sock.sendall(head + payload[: len(payload) // 2])  # Content-Length promises the rest
        wait_http_tasks(server, running=True)  # its handler is reading the body
    wait_http_tasks(server, running=False)
    logged, no_internal_errors.records[:] = [r.getMessage() for r in no_internal_errors.records], []
    assert not logged, logged
    wait_idle(server)
    response = httpx.post(server.url + path, json=body_for(path, "still serving", max_tokens=4), timeout=30)
    parse_response(path, response, False)


# ------------------------------------------------------------ 3. damaged entries found at load time

LONG_PROMPT = " ".join(f"paragraph {i} of a long shared document about caching." for i in range(12))


def _tiered_server(tok_dir, disk_dir) -> LiveServer:
    return LiveServer(tiny_chat_engine(tok_dir, kv_disk_dir=str(disk_dir)))


def test_damaged_entries_found_at_load_time_are_counted_in_stats_and_metrics(tmp_path) -> None:
    tok_dir, disk_dir = tmp_path / "tok", tmp_path / "kv"
    body = body_for(TEXT, LONG_PROMPT, max_tokens=8, temperature=0.0, ignore_eos=True)
    with _tiered_server(tok_dir, disk_dir) as first:
        reference = httpx.post(first.url + TEXT, json=body, timeout=30)
        assert reference.status_code == 200, reference.text
        token_ids = first.engine.tokenize(LONG_PROMPT)
        assert len(token_ids) >= 5 * 16
        assert first.engine.flush_tiers()
        engine: Engine = first.engine
        hashes: list[bytes] = []
        extend_hashes(hashes, root_hash(engine.model_id, engine.cache.kv_layout,
                                        cache_namespace(LOCAL_TENANT, None)), token_ids, 16)
    # the first server has closed its engine: every entry is on disk
    assert len(hashes) >= 5
    victim = next(disk_dir.rglob(f"{hashes[2].hex()}.kv"))  # a block in the middle of the prompt
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0x01  # in the payload: the header still parses, so only a verifying load finds it
    victim.write_bytes(bytes(data))

    with _tiered_server(tok_dir, disk_dir) as second:
        assert second.engine.stats().tiers[0].num_corrupt == 0  # not found at start-up
        again = httpx.post(second.url + TEXT, json=body, timeout=30)
        assert again.status_code == 200, again.text
        assert parse_response(TEXT, again, False) == parse_response(TEXT, reference, False)
        usage = again.json()["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == 2 * 16  # the two blocks before the damage
        wait_idle(second)

        stats = httpx.get(second.url + "/v1/cache/stats", timeout=30)
        assert stats.status_code == 200, stats.text
        disk = stats.json()["tiers"][0]
        assert disk["name"] == "disk"
        assert disk["num_corrupt"] == 1
        assert disk["num_loaded_blocks"] == 2

        metrics = httpx.get(second.url + "/metrics", timeout=30)
        assert metrics.status_code == 200
        assert 'promptstash_tier_corrupt_total{tier="disk"} 1.0' in metrics.text.splitlines()
        samples = {(s.name, s.labels.get("tier")): s.value
                   for family in text_string_to_metric_families(metrics.text) for s in family.samples}
        assert samples[("promptstash_tier_corrupt_total", "disk")] == 1.0
        assert samples[("promptstash_tier_loaded_blocks_total", "disk")] == 2.0
        second.engine.check_integrity()


# ------------------------------------------------------- 4. tier loads stalling the server (optional)


class GatedDiskTier(DiskTier):
    """A disk tier whose reads wait for `gate` (a slow network store)."""

    gate: threading.Event

    def get(self, block_hash: bytes) -> bytes | None:
        self.gate.wait(30)
        return super().get(block_hash)


def _prime_disk(tmp_path, body: dict[str, Any]) -> httpx.Response:
    """Compute `body` on a first server with a disk tier (closed on return: every entry is on disk)."""
    with _tiered_server(tmp_path / "tok", tmp_path / "kv") as first:
        response = httpx.post(first.url + TEXT, json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response


@contextmanager
def _blocked_load(srv: LiveServer, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Block the server's tier reads, send `body` (its prefix is on disk) from a thread, and wait until it is
    loading; the reads resume when the block ends. Yields a dict that gets "response" once the request returns."""
    tier = srv.engine.kv_store.chain.tiers[0]
    tier.__class__ = GatedDiskTier
    tier.gate = threading.Event()
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(response=httpx.post(srv.url + TEXT, json=body,
                                                                                  timeout=60)))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not srv.engine.stats().num_loading:
            assert time.monotonic() < deadline, "the request never started loading"
            time.sleep(0.005)
        yield result
    finally:
        tier.gate.set()
        thread.join(30)


def test_a_slow_tier_load_does_not_stall_running_streams_or_the_stats_routes(tmp_path) -> None:
    body = body_for(TEXT, LONG_PROMPT, max_tokens=4, temperature=0.0, ignore_eos=True)
    reference = parse_response(TEXT, _prime_disk(tmp_path, body), False)
    with _tiered_server(tmp_path / "tok", tmp_path / "kv") as srv, httpx.Client(base_url=srv.url,
                                                                                 timeout=30) as client:
        runner_body = body_for(TEXT, "a short unrelated prompt", max_tokens=60, stream=True, ignore_eos=True)
        with client.stream("POST", TEXT, json=runner_body) as runner:
            lines = runner.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # decoding: its tier lookup is done
            with _blocked_load(srv, body) as result:
                for route in ("/health", "/v1/cache/stats", "/metrics"):  # the last two take the engine lock
                    start = time.monotonic()
                    assert client.get(route).status_code == 200
                    assert time.monotonic() - start < 2.0, route
                rest = [line for line in lines if line.startswith("data:")]  # the runner finishes meanwhile
                assert rest[-1] == "data: [DONE]"
                assert srv.engine.stats().num_loading == 1  # while the load is still blocked on its reads
        assert parse_response(TEXT, result["response"], False) == reference
        assert result["response"].json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 5 * 16
        wait_idle(srv)
        srv.engine.check_integrity()


def test_a_slow_tier_load_does_not_hold_up_a_new_request(tmp_path) -> None:
    body = body_for(TEXT, LONG_PROMPT, max_tokens=4, temperature=0.0, ignore_eos=True)
    _prime_disk(tmp_path, body)
    with _tiered_server(tmp_path / "tok", tmp_path / "kv") as srv:
        with _blocked_load(srv, body):
            start = time.monotonic()
            try:
                response = httpx.post(srv.url + TEXT, json=body_for(TEXT, "a new short prompt", max_tokens=4),
                                      timeout=3)
            except httpx.TimeoutException:
                response = None
            assert response is not None and response.status_code == 200, "the new request waited for the load"
            assert time.monotonic() - start < 3.0
        wait_idle(srv)


# ------------------------------------------------------------- 5. a client that never reads its stream


def test_a_client_that_never_reads_its_stream_no_longer_holds_a_slot_until_max_tokens(tmp_path) -> None:
    engine = tiny_chat_engine(tmp_path / "tok")
    with LiveServer(engine, ServerConfig(stream_idle_timeout_s=1.0)) as srv:
        # NOTE: accepted sockets inherit the listener's buffer sizes. Loopback buffers autotune up to megabytes,
        # more than the whole stream of this tiny model; with a small send buffer the server's writes block
        # after a few kilobytes, as they do for a real client that stops reading a long stream.
        listener = srv._server.servers[0].sockets[0]
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        prompt = "hi"
        max_tokens = engine.max_model_len - len(engine.tokenize(prompt))  # the longest the window allows
        assert max_tokens >= 3000
        head, payload = raw_request(srv, TEXT, {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                                                "ignore_eos": True, "stream": True})
        generated_before = engine.stats().num_generated_tokens
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(host_port(srv))
            sock.sendall(head + payload)  # ... and never read a byte
            deadline = time.monotonic() + 10
            while engine.stats().num_generated_tokens == generated_before:
                assert time.monotonic() < deadline, "the request never started generating"
                time.sleep(0.01)
            deadline = time.monotonic() + 15
            while engine.num_unfinished():
                assert time.monotonic() < deadline, "the unread stream still holds its slot"
                time.sleep(0.05)
            assert srv.state.loop.num_idle_aborts == 1
            generated = engine.stats().num_generated_tokens - generated_before
            assert 0 < generated < max_tokens  # aborted, not run to max_tokens
            wait_idle(srv, timeout=5)
            assert srv.state.loop.num_active == 0
            assert engine.stats().cache.usage.num_in_use == 0
        # the server still serves, and a reading client is never idle-aborted
        body = body_for(TEXT, "hello", max_tokens=200, stream=True, ignore_eos=True)
        _, finish = parse_response(TEXT, httpx.post(srv.url + TEXT, json=body, timeout=30), True)
        assert finish == "length" and srv.state.loop.num_idle_aborts == 1
        wait_idle(srv)
        engine.check_integrity()
