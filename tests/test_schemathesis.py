"""Schemathesis fuzzes the live server from its own /openapi.json (a tiny random-weight model behind it).

Every operation in the document gets a bounded, reproducible run (fixed seed, no shrinking) of schema-valid
("positive") and schema-invalid ("negative") requests. Every response must:
- not be a server error (no 5xx) and come back within REQUEST_TIMEOUT_S (a hang fails the test);
- have a documented status code and content type, and a body that fits the documented response schema;
- for a negative request: be a 4xx (the schema forbids nothing the server accepts);
- for a positive request: be a 2xx, or a 400 for a rule JSON Schema cannot state (prompt + max_tokens over
  the context window, Anthropic's cache_control breakpoint rules), or a 404 for an unknown request id;
- for a stream: end properly (data: [DONE] / event: message_stop) within the timeout.
With API keys configured, fuzzed requests without the key must all get a documented 401.

max_tokens is clamped to MAX_TOKENS (and is the server's default) so generation stays fast. Module parts
(`{"type": "module", "id": ...}`) name a module registered by the fixture (REGISTERED_MODULE): a random id is
unknown to the server, a state no schema can state. For a deeper run:
PROMPTSTASH_FUZZ_EXAMPLES=500 PROMPTSTASH_FUZZ_SHRINK=1 pytest tests/test_schemathesis.py
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import pytest

schemathesis = pytest.importorskip(
    "schemathesis", reason="schemathesis is not installed (it is in the `test` extra: pip install -e '.[test]')")

import requests  # noqa: E402  (schemathesis depends on it)
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from server_helpers import LiveServer, tiny_chat_engine  # noqa: E402

from promptstash.config import ServerConfig  # noqa: E402

MAX_EXAMPLES = int(os.environ.get("PROMPTSTASH_FUZZ_EXAMPLES", "50"))
SHRINK = os.environ.get("PROMPTSTASH_FUZZ_SHRINK") == "1"
REQUEST_TIMEOUT_S = 10.0
MAX_TOKENS = 4

OPERATIONS = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/messages"),
    ("POST", "/v1/messages/count_tokens"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/health"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("GET", "/metrics"),
    ("GET", "/dashboard"),
    ("GET", "/v1/cache/stats"),
    ("GET", "/v1/cache/requests"),
    ("GET", "/v1/cache/requests/{request_id}/miss"),
    ("GET", "/v1/cache/prefixes"),
    ("GET", "/v1/cache/blocks/summary"),
    ("POST", "/v1/modules"),
    ("GET", "/v1/modules"),
    ("DELETE", "/v1/modules/{module_id}"),
    ("POST", "/v1/responses"),
    ("GET", "/v1/responses/{response_id}"),
    ("DELETE", "/v1/responses/{response_id}"),
]
# Fuzzed by their own module, which stores responses for previous_response_id and knows the Responses stream's
# end (tests/test_server_responses.py::test_fuzz_responses_from_the_document).
FUZZED_ELSEWHERE = {"POST /v1/responses", "GET /v1/responses/{response_id}", "DELETE /v1/responses/{response_id}"}
# Operations with parameters or a body: the only ones with schema-invalid requests to send.
# (GET /v1/cache/requests/{request_id}/miss has none either: any string is a valid path segment.)
WITH_INPUT = {"POST /v1/chat/completions", "POST /v1/completions", "POST /v1/messages",
              "POST /v1/messages/count_tokens", "POST /tokenize", "POST /detokenize", "GET /v1/cache/requests",
              "GET /v1/cache/prefixes", "GET /v1/cache/blocks/summary", "POST /v1/modules"}
# Any string is a valid path segment: a schema-valid id may name nothing (404), so most answers are 404s.
PATH_IDS = {"/v1/cache/requests/{request_id}/miss", "/v1/modules/{module_id}", "/v1/models/{model_id}"}
REGISTERED_MODULE = "fuzz-doc"
MODULE_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")  # the documented id pattern
# A schema-valid request may still get a 400 for a rule JSON Schema cannot state; these are the messages.
# 400s for rules JSON Schema cannot state (cross-field rules, and schemas the grammar library cannot compile)
CROSS_FIELD_RULES = ("context window", "cache_control", "longer TTLs must come first", "no tool named",
                     "matches no tool call", "prompt_cache_breakpoint", "at most one output constraint",
                     "cannot be compiled into a grammar", "needs tools", "two tools are named",
                     "JSON text of an object", "duplicate", "prefill")
STREAM_END = {"/v1/chat/completions": b"data: [DONE]", "/v1/completions": b"data: [DONE]",
              "/v1/messages": b"event: message_stop"}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    engine = tiny_chat_engine(tmp_path_factory.mktemp("schemathesis"))
    with LiveServer(engine, ServerConfig(default_max_tokens=MAX_TOKENS)) as server:
        response = requests.post(server.url + "/v1/modules", timeout=REQUEST_TIMEOUT_S,
                                 json={"text": "a registered module for the fuzzer", "id": REGISTERED_MODULE,
                                       "ttl": "24h"})
        assert response.status_code == 200, response.text
        yield server


@pytest.fixture(scope="module")
def api(live):
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    schema.config.output.sanitization.update(enabled=False)  # reproducers show max_tokens (a "token" field)
    return schema


@pytest.fixture(scope="module")
def session():
    with requests.Session() as s:
        yield s


def test_document_describes_every_route(api, live):
    """The document lists exactly the routes under test (a new route must be added to OPERATIONS)."""
    labels = {op.ok().label for op in api.get_all_operations()}
    assert labels == {f"{method} {path}" for method, path in OPERATIONS}
    doc = requests.get(live.url + "/openapi.json", timeout=REQUEST_TIMEOUT_S).json()
    assert doc["openapi"].startswith("3.1")
    for path in STREAM_END:
        assert doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(doc["components"]["securitySchemes"]) == {"bearerAuth", "apiKeyHeader", "apiKeyQuery"}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _adjust(case, max_model_len: int, positive: bool = True) -> None:
    """Keep generation short: a valid max_tokens above MAX_TOKENS becomes MAX_TOKENS (invalid ones stay). A module
    part's id (when it fits the documented pattern: validity unchanged) names the registered module."""
    body = case.body
    if not isinstance(body, dict):
        return
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if _number(value) and MAX_TOKENS < value <= max_model_len and float(value).is_integer():
            body[field] = MAX_TOKENS
    if positive and case.operation.path in ("/v1/messages", "/v1/messages/count_tokens"):
        _adjust_anthropic_tools(body)  # NOTE: only schema-valid bodies: a rewrite could mend an invalid one
    contents = [body.get("system")]
    if isinstance(body.get("messages"), list):
        contents += [m.get("content") for m in body["messages"] if isinstance(m, dict)]
    for content in contents:
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") == "module" and isinstance(part.get("id"), str) \
                    and MODULE_ID.match(part["id"]):
                part["id"] = REGISTERED_MODULE


def _adjust_anthropic_tools(body: dict) -> None:
    """Schema-valid Anthropic bodies mostly break tool rules no schema can state; mend them (validity unchanged)
    so that most reach the engine: tool names and tool_use ids distinct, each tool_result answering an earlier
    tool_use (else a text block), no tool_use in a final assistant message, tool_choice naming a real tool, and no
    output format together with constrained tools."""
    tools = body.get("tools") if isinstance(body.get("tools"), list) else []
    names = []
    for i, tool in enumerate(tools):
        if isinstance(tool, dict) and isinstance(tool.get("name"), str):
            tool["name"] = f"{tool['name'][:40]}_{i}"
            names.append(tool["name"])
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "tool" and names:
        choice["name"] = names[0]
    formatted = any(isinstance(body.get(k), dict) and body[k].get("format" if k == "output_config" else "type")
                    for k in ("output_config", "output_format"))
    if formatted and tools:
        body["tool_choice"] = {"type": "none"}
    messages = body.get("messages") if isinstance(body.get("messages"), list) else []
    seen: list[str] = []
    for m, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        last_assistant = m == len(messages) - 1 and message.get("role") == "assistant"
        for j, block in enumerate(content):
            if not isinstance(block, dict):
                continue
            if block.get("type") == "tool_use" and isinstance(block.get("id"), str):
                if last_assistant:
                    content[j] = {"type": "text", "text": "ok"}
                    continue
                block["id"] = f"{block['id'][:40]}_{m}_{j}"
                seen.append(block["id"])
            elif block.get("type") == "tool_result" and isinstance(block.get("tool_use_id"), str):
                if seen:
                    block["tool_use_id"] = seen.pop(0)
                else:
                    content[j] = {"type": "text", "text": "r"}
        if last_assistant and content and isinstance(content[-1], dict) and content[-1].get("type") == "module":
            content.append({"type": "text", "text": "ok"})


def _error_message(response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except Exception:
        return response.text[:500]


def _check(case, response, elapsed: float, mode: GenerationMode) -> None:
    label = case.operation.label
    where = f"{label} ({mode.value}): {case.as_curl_command()}"
    assert elapsed < REQUEST_TIMEOUT_S, f"took {elapsed:.1f} s (a hang?): {where}"
    status = response.status_code
    assert status < 500, f"server error {status} {response.text[:500]!r}: {where}"
    # negative_data_rejection: a schema-invalid request gets a 4xx (it knows when serialization made it valid,
    # e.g. a query string that only adds unknown parameters)
    case.validate_response(response, checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                             response_schema_conformance, negative_data_rejection])
    if mode is GenerationMode.POSITIVE:
        ok = 200 <= status < 300
        ok = ok or (status == 400 and any(rule in _error_message(response) for rule in CROSS_FIELD_RULES))
        ok = ok or (status == 404 and case.operation.path in PATH_IDS)
        assert ok, f"schema-valid request rejected with {status} {_error_message(response)!r}: {where}"
    if status == 200 and "text/event-stream" in response.headers.get("content-type", ""):
        assert not response.stream_cut_short, f"stream did not end within {REQUEST_TIMEOUT_S} s: {where}"
        assert response.content.rstrip().endswith(STREAM_END[case.operation.path]), \
            f"stream ended without its final event {response.content[-300:]!r}: {where}"


MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]


@pytest.mark.parametrize("mode", MODES, ids=[m.value for m in MODES])
@pytest.mark.parametrize("method,path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzz(api, live, session, method: str, path: str, mode: GenerationMode) -> None:
    if f"{method} {path}" in FUZZED_ELSEWHERE:
        pytest.skip("fuzzed by tests/test_server_responses.py")
    if mode is GenerationMode.NEGATIVE and f"{method} {path}" not in WITH_INPUT:
        pytest.skip("no parameters or body: nothing schema-invalid to send")
    operation = api[path][method]
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if SHRINK else [])
    seen: dict[str, Any] = {"n": 0, "statuses": {}}

    @settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None, phases=phases,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        _adjust(case, live.engine.max_model_len, mode is GenerationMode.POSITIVE)
        start = time.monotonic()
        response = case.call(base_url=live.url, session=session, timeout=REQUEST_TIMEOUT_S)
        elapsed = time.monotonic() - start
        seen["n"] += 1
        seen["statuses"][response.status_code] = seen["statuses"].get(response.status_code, 0) + 1
        _check(case, response, elapsed, mode)

    run()
    print(f"{method} {path} {mode.value}: {seen['n']} requests, statuses {dict(sorted(seen['statuses'].items()))}")
    assert seen["n"] > 0
    if mode is GenerationMode.POSITIVE and path not in PATH_IDS:  # fuzzing reaches the engine, not just 400s
        # NOTE: a third, not a half: which examples hypothesis draws differs between checkouts (seen: 29 and 20
        # of 50 answered 200 for /v1/chat/completions; the rest broke cross-field rules, a correct 400)
        assert seen["statuses"].get(200, 0) >= seen["n"] // 3, seen
    # The server must still answer, and must have finished (or aborted) every request it was sent.
    assert session.get(live.url + "/health", timeout=REQUEST_TIMEOUT_S).status_code == 200
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while live.state.loop.num_active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live.state.loop.num_active == 0, "requests still in flight after the run"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    engine = tiny_chat_engine(tmp_path_factory.mktemp("schemathesis-keys"))
    config = ServerConfig(default_max_tokens=MAX_TOKENS, api_keys={"sk-fuzz-secret": "fuzz"})
    with LiveServer(engine, config) as server:
        schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
        schema.config.output.sanitization.update(enabled=False)
        yield server, schema


KEYED = [("POST", "/v1/chat/completions"), ("POST", "/v1/messages"), ("GET", "/v1/cache/requests")]


@pytest.mark.parametrize("method,path", KEYED, ids=[f"{m} {p}" for m, p in KEYED])
def test_fuzz_with_api_keys(keyed, session, method: str, path: str) -> None:
    """With keys configured the document makes a key required, and every fuzzed request (random or no
    credentials) gets a documented 401, never a 5xx."""
    server, schema = keyed
    operation = schema[path][method]
    assert {} not in operation.definition.raw["security"]
    statuses: dict[int, int] = {}

    @settings(max_examples=max(5, MAX_EXAMPLES // 3), derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck), print_blob=False)
    @given(case=operation.as_strategy())
    def run(case) -> None:
        start = time.monotonic()
        response = case.call(base_url=server.url, session=session, timeout=REQUEST_TIMEOUT_S)
        elapsed = time.monotonic() - start
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        where = f"{case.operation.label}: {case.as_curl_command()}"
        assert elapsed < REQUEST_TIMEOUT_S, f"took {elapsed:.1f} s (a hang?): {where}"
        case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                 content_type_conformance, response_schema_conformance])
        assert response.status_code == 401, f"{response.status_code} without the key: {where}"

    run()
    print(f"{method} {path} with keys: statuses {statuses}")
    assert statuses
