"""Modules on a live server (issue 10, server side): marking module parts in both APIs, the per-tenant registry
(POST / GET / DELETE /v1/modules), module_repair, the usage extension, /metrics, /v1/cache/stats, "why did this
miss?", /openapi.json, and the official SDKs.

Every bad input gets a clear 4xx in its route's error format, and the server keeps serving afterwards.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import LiveServer, no_errors_logged, tiny_chat_engine
from test_dashboard import browse, text_of

from promptstash.config import ServerConfig

MODEL = "tiny-chat"
CHAT, MESSAGES, TEXT = "/v1/chat/completions", "/v1/messages", "/v1/completions"
KEYS = {"key-a": "alpha", "key-b": "beta"}
ADMIN = "admin-key"
DOCS = [f"document {name}: " + " ".join(f"hello world, {name} line {i} of a tiny corpus." for i in range(8))
        for name in ("apple", "banana", "cherry")]
EXTENSION_KEYS = {"prefix_cached_tokens", "module_cached_tokens", "recomputed_tokens", "computed_tokens",
                  "num_modules", "num_module_hits", "module_repair"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = tiny_chat_engine(tmp_path_factory.mktemp("tok"))
    with LiveServer(engine, ServerConfig(api_keys=KEYS, admin_keys=(ADMIN,), min_cacheable_tokens=16)) as srv:
        yield srv


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 256-token context window and a 320-token KV pool: one ~90-token module fits, two do not (each module
    also needs blocks of its own)."""
    engine = tiny_chat_engine(tmp_path_factory.mktemp("tok"), max_model_len=256, kv_cache_tokens=320)
    with LiveServer(engine, ServerConfig()) as srv:
        yield srv


@pytest.fixture(autouse=True)
def no_internal_errors():
    """No test may make the server log an error (a 500 from a bug, an exception escaping the app, a failed step)."""
    with no_errors_logged("promptstash.server", "uvicorn.error") as handler:
        yield handler


# ---------------------------------------------------------------------------------------------- helpers


def auth(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def post(srv: LiveServer, path: str, body: Any, key: str | None = "key-a") -> httpx.Response:
    return httpx.post(srv.url + path, content=json.dumps(body).encode(), timeout=60,
                      headers={"content-type": "application/json", **auth(key)})


def get(srv: LiveServer, path: str, key: str | None = "key-a") -> httpx.Response:
    return httpx.get(srv.url + path, headers=auth(key), timeout=30)


def delete(srv: LiveServer, path: str, key: str | None = "key-a") -> httpx.Response:
    return httpx.delete(srv.url + path, headers=auth(key), timeout=30)


def chat_body(content: Any, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2, "temperature": 0,
            **extra}


def messages_body(content: Any, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def body_for(path: str, content: Any, **extra: Any) -> dict[str, Any]:
    return chat_body(content, **extra) if path == CHAT else messages_body(content, **extra)


def assert_error(response: httpx.Response, path: str, status: int, *mentions: str, param: str | None = None,
                 code: str | None = None) -> str:
    """The status and exactly the error shape of `path`'s API flavour; returns the message."""
    assert response.status_code == status, response.text
    body = response.json()
    if path.startswith(MESSAGES):
        assert set(body) == {"type", "error"} and body["type"] == "error", body
        error = body["error"]
        assert set(error) == {"type", "message"}, body
        assert error["type"] == {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error",
                                 500: "api_error", 529: "overloaded_error"}[status], body
    else:
        assert set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, body
        assert error["type"] == {400: "invalid_request_error", 404: "invalid_request_error",
                                 429: "rate_limit_error", 500: "server_error"}[status], body
        if param is not None:
            assert error["param"] == param, body
        if code is not None:
            assert error["code"] == code, body
    for word in mentions:
        assert word in error["message"], (word, error["message"])
    return error["message"]


def assert_serving(srv: LiveServer, key: str | None = "key-a") -> None:
    """The engine is still usable: a request with a module succeeds, and nothing is left in flight."""
    response = post(srv, CHAT, chat_body([{"type": "text", "text": DOCS[0], "module": True},
                                          {"type": "text", "text": "still there?"}]), key)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert srv.state.loop.num_active == 0


def register(srv: LiveServer, text: str, key: str | None = "key-a", **fields: Any) -> dict[str, Any]:
    response = post(srv, "/v1/modules", {"text": text, **fields}, key)
    assert response.status_code == 200, response.text
    return response.json()


def extension(usage: dict[str, Any]) -> dict[str, Any]:
    ext = usage["promptstash"]
    assert set(ext) == EXTENSION_KEYS, ext
    return ext


def metric_values(text: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.labels:
                out[s.name] = s.value
    return out


# ---------------------------------------------------------------------------------------------- marking modules


BAD_PARTS = [  # (content parts, words the message names, OpenAI param)
    ([{"type": "text", "text": "doc", "module": "yes"}, {"type": "text", "text": "q"}],
     ("content[0].module", "boolean", "string"), "messages[0].content[0].module"),
    ([{"type": "text", "text": "doc", "module": 1}], ("content[0].module", "boolean"), "messages[0].content[0].module"),
    ([{"type": "text", "text": "doc", "module": {"on": True}}], ("module", "boolean", "object"),
     "messages[0].content[0].module"),
    ([{"type": "image", "source": {}, "module": True}], ("only text", "module", "'image'"),
     "messages[0].content[0].module"),
    ([{"type": "module", "id": "no-such-module"}, {"type": "text", "text": "q"}],
     ("unknown module id", "no-such-module"), "messages"),
    ([{"type": "module"}], ("content[0].id", "module part", "POST /v1/modules"), "messages[0].content[0].id"),
    ([{"type": "module", "id": 7}], ("content[0].id", "number"), "messages[0].content[0].id"),
    ([{"type": "text", "text": "", "module": True}], ("module must not be empty",), "messages[0].content[0].text"),
]


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
@pytest.mark.parametrize("parts,mentions,param", BAD_PARTS,
                         ids=["module-string", "module-int", "module-object", "not-text", "unknown-id", "no-id",
                              "id-number", "empty-module"])
def test_bad_module_parts_get_a_400_in_each_api_format_and_the_server_keeps_serving(server, path, parts, mentions,
                                                                                     param) -> None:
    response = post(server, path, body_for(path, parts))
    assert_error(response, path, 400, *mentions, param=param if path == CHAT else None)
    assert_serving(server)


def test_anthropic_system_blocks_take_module_marks_too(server) -> None:
    bad = post(server, MESSAGES, messages_body("q", system=[{"type": "text", "text": DOCS[0], "module": "true"}]))
    assert_error(bad, MESSAGES, 400, "system[0].module", "boolean")
    unknown = post(server, MESSAGES, messages_body("q", system=[{"type": "module", "id": "missing"}]))
    assert_error(unknown, MESSAGES, 400, "unknown module id 'missing'")
    good = post(server, MESSAGES, messages_body("q", system=[
        {"type": "text", "text": DOCS[1], "module": True, "cache_control": {"type": "ephemeral", "ttl": "1h"}},
        {"type": "text", "text": "be brief"}]))
    assert good.status_code == 200, good.text
    ext = extension(good.json()["usage"])
    assert ext["prefix_cached_tokens"] + ext["module_cached_tokens"] == good.json()["usage"]["cache_read_input_tokens"]


@pytest.mark.parametrize("path", [CHAT, MESSAGES, TEXT])
@pytest.mark.parametrize("value,mentions", [
    ("bogus", ("module_repair", "bogus", "legolink")),
    ("legolink:x", ("module_repair", "legolink:K")),
    ("legolink:5000", ("module_repair",)),
    ("cacheblend:1.5", ("module_repair", "cacheblend:R")),
    ("none:3", ("module_repair",)),
    (5, ("module_repair", "string")),
    (True, ("module_repair", "string")),
], ids=["unknown", "bad-k", "k-too-big", "r-too-big", "arg-on-none", "number", "bool"])
def test_bad_module_repair_gets_a_400_naming_the_field(server, path, value, mentions) -> None:
    if path == TEXT:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 2, "module_repair": value}
    else:
        body = body_for(path, [{"type": "text", "text": DOCS[0], "module": True}, {"type": "text", "text": "q"}],
                        module_repair=value)
    assert_error(post(server, path, body), path, 400, *mentions, param="module_repair" if path != MESSAGES else None)
    assert_serving(server)


def test_module_longer_than_the_window_or_too_many_for_the_pool_is_a_400(small) -> None:
    tokenizer = small.engine.tokenizer
    long_doc = " ".join(f"hello world line {i}." for i in range(200))
    assert len(tokenizer.encode(long_doc, add_special_tokens=False)) > small.engine.max_model_len
    short = [" ".join(f"{name} hello world {i}." for i in range(10)) for name in ("one", "two")]
    lengths = [len(tokenizer.encode(s, add_special_tokens=False)) for s in short]
    assert all(70 <= n <= 120 for n in lengths), lengths
    for path in (CHAT, MESSAGES):
        too_long = post(small, path, body_for(path, [{"type": "text", "text": long_doc, "module": True},
                                                     {"type": "text", "text": "q"}]), key=None)
        assert_error(too_long, path, 400, "context window", code="context_length_exceeded")
        both = [{"type": "text", "text": s, "module": True} for s in short] + [{"type": "text", "text": "q"}]
        too_many = post(small, path, body_for(path, both), key=None)
        assert_error(too_many, path, 400, "modules", "pool", code="context_length_exceeded")
        one = post(small, path, body_for(path, both[:1] + both[2:]), key=None)
        assert one.status_code == 200, one.text
        registered = post(small, "/v1/modules", {"text": long_doc}, key=None)
        assert_error(registered, "/v1/modules", 400, "text", "context window", param="text",
                     code="context_length_exceeded")
    assert get(small, "/v1/modules", key=None).json()["data"] == []
    assert small.state.loop.num_active == 0


# ---------------------------------------------------------------------------------------------- usage


def test_usage_extension_appears_only_for_prompts_with_modules_and_reports_module_repair(server) -> None:
    plain = post(server, CHAT, chat_body("hello world"))
    assert plain.status_code == 200 and "promptstash" not in plain.json()["usage"]
    plain = post(server, MESSAGES, messages_body("hello world"))
    assert plain.status_code == 200 and "promptstash" not in plain.json()["usage"]
    parts = [{"type": "text", "text": DOCS[2], "module": True}, {"type": "text", "text": "what is it?"}]
    default = server.engine.default_module_repair.label
    for path, repair, label in ((CHAT, None, default), (CHAT, "legolink:8", "legolink:8"),
                                (CHAT, "full", "full"), (MESSAGES, "cacheblend:0.25", "cacheblend:0.25"),
                                (MESSAGES, "none", "none"), (MESSAGES, None, default)):
        extra = {} if repair is None else {"module_repair": repair}
        response = post(server, path, body_for(path, parts, **extra))
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        ext = extension(usage)
        assert ext["module_repair"] == label
        cached = usage["prompt_tokens_details"]["cached_tokens"] if path == CHAT else usage["cache_read_input_tokens"]
        prompt = usage["prompt_tokens"] if path == CHAT else (
            usage["input_tokens"] + usage["cache_read_input_tokens"] + usage["cache_creation_input_tokens"])
        assert ext["prefix_cached_tokens"] + ext["module_cached_tokens"] == cached
        assert ext["computed_tokens"] == prompt - cached
        assert 0 <= ext["num_module_hits"] <= ext["num_modules"] <= 1


def test_streamed_usage_carries_the_extension_in_both_apis(server) -> None:
    parts = [{"type": "text", "text": DOCS[0], "module": True}, {"type": "text", "text": "stream it"}]
    with httpx.stream("POST", server.url + CHAT, headers=auth("key-a"), timeout=60,
                      json=chat_body(parts, stream=True, stream_options={"include_usage": True},
                                     module_repair="legolink:4")) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    usage = [e["usage"] for e in events if e.get("usage")]
    assert len(usage) == 1 and extension(usage[0])["module_repair"] == "legolink:4"
    with httpx.stream("POST", server.url + MESSAGES, headers=auth("key-a"), timeout=60,
                      json=messages_body(parts, stream=True, module_repair="full")) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    start = next(e for e in events if e["type"] == "message_start")["message"]["usage"]
    end = next(e for e in events if e["type"] == "message_delta")["usage"]
    assert extension(start)["module_repair"] == extension(end)["module_repair"] == "full"


def test_automatic_cache_control_keeps_the_last_block_a_module(server) -> None:
    """Anthropic's top-level cache_control moves a breakpoint onto the last block; a module stays a module."""
    response = post(server, MESSAGES, messages_body([{"type": "text", "text": "q"},
                                                     {"type": "text", "text": DOCS[1], "module": True}],
                                                    cache_control={"type": "ephemeral"}))
    assert response.status_code == 200, response.text
    extension(response.json()["usage"])


# ---------------------------------------------------------------------------------------------- the registry


def test_registry_post_get_use_delete(server) -> None:
    made = register(server, DOCS[0], id="doc-apple", ttl="1h")
    assert made["id"] == "doc-apple" and made["object"] == "module" and made["ttl"] == "1h"
    assert made["num_tokens"] == len(server.engine.tokenizer.encode(DOCS[0], add_special_tokens=False))
    assert made["expires_at"] - made["created_at"] in (3600, 3601)
    generated = register(server, DOCS[1])
    assert generated["id"].startswith("mod_") and generated["ttl"] == "5m"
    listed = get(server, "/v1/modules").json()
    assert listed["object"] == "list"
    ids = [m["id"] for m in listed["data"]]
    assert "doc-apple" in ids and generated["id"] in ids
    assert all(set(m) == {"id", "object", "num_tokens", "ttl", "created_at", "expires_at"} for m in listed["data"])

    for path in (CHAT, MESSAGES):  # used by id, in another position and next to an inline module
        response = post(server, path, body_for(path, [{"type": "text", "text": "first"},
                                                      {"type": "module", "id": "doc-apple"},
                                                      {"type": "text", "text": DOCS[2], "module": True},
                                                      {"type": "module", "id": generated["id"]},
                                                      {"type": "text", "text": "which fruits?"}]))
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        ext = extension(usage)
        assert ext["num_modules"] <= 3
        prompt = usage.get("prompt_tokens") or (usage["input_tokens"] + usage["cache_read_input_tokens"]
                                                + usage["cache_creation_input_tokens"])
        assert prompt > made["num_tokens"] + generated["num_tokens"]
    salted = post(server, CHAT, chat_body([{"type": "module", "id": "doc-apple"}, {"type": "text", "text": "q"}],
                                          cache_salt="s1"))
    assert salted.status_code == 200, salted.text  # ids resolve for the tenant's salted requests too

    gone = delete(server, "/v1/modules/doc-apple")
    assert gone.status_code == 200 and gone.json() == {"id": "doc-apple", "object": "module", "deleted": True}
    assert_error(delete(server, "/v1/modules/doc-apple"), "/v1/modules", 404, "doc-apple", code="module_not_found")
    assert "doc-apple" not in [m["id"] for m in get(server, "/v1/modules").json()["data"]]
    for path in (CHAT, MESSAGES):
        stale = post(server, path, body_for(path, [{"type": "module", "id": "doc-apple"},
                                                   {"type": "text", "text": "q"}]))
        assert_error(stale, path, 400, "unknown module id 'doc-apple'")
    assert delete(server, "/v1/modules/" + generated["id"]).status_code == 200
    assert_serving(server)


@pytest.mark.parametrize("body,mentions,param", [
    ({}, ("text", "required"), "text"),
    ({"text": ""}, ("text", "empty"), "text"),
    ({"text": 5}, ("text", "string"), "text"),
    ({"text": "doc", "id": "has space"}, ("id", "1-128 characters"), "id"),
    ({"text": "doc", "id": "x" * 129}, ("id",), "id"),
    ({"text": "doc", "id": 3}, ("id", "string"), "id"),
    ({"text": "doc", "ttl": "2h"}, ("ttl", "'5m'", "'24h'"), "ttl"),
], ids=["no-text", "empty", "text-number", "id-space", "id-long", "id-number", "ttl"])
def test_registry_post_rejects_bad_bodies(server, body, mentions, param) -> None:
    before = get(server, "/v1/modules").json()["data"]
    assert_error(post(server, "/v1/modules", body), "/v1/modules", 400, *mentions, param=param)
    assert get(server, "/v1/modules").json()["data"] == before
    assert_serving(server)


def test_registry_post_rejects_bad_json_and_needs_a_key(server) -> None:
    response = httpx.post(server.url + "/v1/modules", content=b"{not json", timeout=10,
                          headers={"content-type": "application/json", **auth("key-a")})
    assert_error(response, "/v1/modules", 400, "not valid JSON")
    response = httpx.post(server.url + "/v1/modules", content=b"[1, 2]", timeout=10, headers=auth("key-a"))
    assert_error(response, "/v1/modules", 400, "JSON object")
    for call in (lambda: post(server, "/v1/modules", {"text": "doc"}, key=None),
                 lambda: get(server, "/v1/modules", key=None), lambda: delete(server, "/v1/modules/x", key=None),
                 lambda: get(server, "/v1/modules", key="wrong")):
        response = call()
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_tenants_never_see_use_or_delete_each_others_modules_by_id(server) -> None:
    register(server, DOCS[0], "key-a", id="shared-name")
    for path in (CHAT, MESSAGES):
        stolen = post(server, path, body_for(path, [{"type": "module", "id": "shared-name"},
                                                    {"type": "text", "text": "q"}]), "key-b")
        assert_error(stolen, path, 400, "unknown module id 'shared-name'")
    assert "shared-name" not in [m["id"] for m in get(server, "/v1/modules", "key-b").json()["data"]]
    assert_error(delete(server, "/v1/modules/shared-name", "key-b"), "/v1/modules", 404, "shared-name")
    # beta may register the same id: its own module, alpha's is untouched
    theirs = register(server, DOCS[1], "key-b", id="shared-name")
    mine = next(m for m in get(server, "/v1/modules", "key-a").json()["data"] if m["id"] == "shared-name")
    assert theirs["num_tokens"] != mine["num_tokens"]
    assert delete(server, "/v1/modules/shared-name", "key-b").status_code == 200
    assert "shared-name" in [m["id"] for m in get(server, "/v1/modules", "key-a").json()["data"]]
    ok = post(server, CHAT, chat_body([{"type": "module", "id": "shared-name"}, {"type": "text", "text": "q"}]))
    assert ok.status_code == 200, ok.text
    # the admin key is a tenant of its own on these routes
    assert "shared-name" not in [m["id"] for m in get(server, "/v1/modules", ADMIN).json()["data"]]
    assert delete(server, "/v1/modules/shared-name", "key-a").status_code == 200


def test_registry_post_with_a_full_queue_is_a_429_and_registers_nothing(server) -> None:
    loop = server.state.loop
    limit = loop.max_queued_requests
    loop.max_queued_requests = 0
    try:
        response = post(server, "/v1/modules", {"text": DOCS[2], "id": "queued-out"})
    finally:
        loop.max_queued_requests = limit
    assert_error(response, "/v1/modules", 429, "overloaded", code="rate_limit_exceeded")
    assert response.headers["retry-after"] == "1"
    assert "queued-out" not in [m["id"] for m in get(server, "/v1/modules").json()["data"]]
    assert_serving(server)


def test_registry_post_whose_precompute_fails_is_a_500_and_registers_nothing(server, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    with monkeypatch.context() as m:
        m.setattr(server.engine.runner, "run", broken)
        response = post(server, "/v1/modules", {"text": DOCS[2] + " failing", "id": "broken-doc"})
    assert_error(response, "/v1/modules", 500, "computing the module failed", "simulated device failure")
    assert "broken-doc" not in [m["id"] for m in get(server, "/v1/modules").json()["data"]]
    assert_serving(server)


# ---------------------------------------------------------------------------------------------- observability


def test_metrics_and_cache_stats_show_module_figures_to_admins_only(server) -> None:
    assert post(server, CHAT, chat_body([{"type": "text", "text": DOCS[0], "module": True},
                                         {"type": "text", "text": "count me"}])).status_code == 200
    families = metric_values(get(server, "/metrics", ADMIN).text)
    for name in ("promptstash_module_lookups_total", "promptstash_module_hits_total",
                 "promptstash_module_tier_hits_total", "promptstash_module_reused_tokens_total",
                 "promptstash_module_recomputed_tokens_total", "promptstash_module_stored_total",
                 "promptstash_module_cached", "promptstash_module_blocks", "promptstash_module_bytes",
                 "promptstash_module_registered"):
        assert name in families, name
    engine_modules = server.engine.stats().modules
    assert families["promptstash_module_hits_total"] <= engine_modules.num_hits
    assert "promptstash_module" not in get(server, "/metrics", "key-a").text  # engine-wide: admin only

    admin = get(server, "/v1/cache/stats", ADMIN).json()
    assert set(admin["modules"]) == {"lookups", "hits", "tier_hits", "hit_rate", "reused_tokens", "recomputed_tokens",
                                     "stored", "cached", "blocks", "bytes", "registered"}
    mine = get(server, "/v1/cache/stats", "key-a").json()
    assert "modules" not in mine and "pool" not in mine
    usage = mine["module_usage"]
    assert set(usage) == {"lookups", "hits", "hit_rate", "reused_tokens", "recomputed_tokens"}
    assert 0 <= usage["hits"] <= usage["lookups"]
    assert mine["prefix_cached_tokens"] + usage["reused_tokens"] == mine["cached_tokens"]
    assert "module-hit-rate" in get(server, "/dashboard?key=key-a").text


@pytest.mark.slow  # headless Chromium
def test_dashboard_in_headless_chromium_shows_module_figures(server) -> None:
    assert post(server, CHAT, chat_body([{"type": "text", "text": DOCS[1], "module": True},
                                         {"type": "text", "text": "for the dashboard"}])).status_code == 200
    dom = browse(server.url + f"/dashboard?key={ADMIN}", "--dump-dom")
    stats = get(server, "/v1/cache/stats", ADMIN).json()
    usage = stats["module_usage"]
    assert text_of(dom, "module-hit-rate") == (f"{100 * usage['hit_rate']:.1f}%" if usage["lookups"] else "–")
    assert text_of(dom, "module-lookups") == f"{usage['lookups']:,}"
    assert text_of(dom, "module-reused") == f"{usage['reused_tokens']:,}"
    assert text_of(dom, "modules-cached") == f"{stats['modules']['cached']:,}"
    assert text_of(dom, "module-bytes").endswith("B")
    tenant = browse(server.url + "/dashboard?key=key-a", "--dump-dom")
    assert text_of(tenant, "modules-cached") == "admin key needed"
    mine = get(server, "/v1/cache/stats").json()["module_usage"]
    assert text_of(tenant, "module-reused") == f"{mine['reused_tokens']:,}"


def test_why_miss_explains_modules(server) -> None:
    parts = [{"type": "text", "text": DOCS[1], "module": True}, {"type": "text", "text": DOCS[2], "module": True},
             {"type": "text", "text": "compare them"}]
    first = post(server, CHAT, chat_body(parts, cache_salt="why"))
    assert first.status_code == 200
    swapped = [parts[1], parts[0], {"type": "text", "text": "the other way round"}]
    second = post(server, CHAT, chat_body(swapped, cache_salt="why"))
    assert second.status_code == 200
    rid = second.headers["x-request-id"]
    report = get(server, f"/v1/cache/requests/{rid}/miss").json()
    modules = report["modules"]
    assert modules["num_modules"] == 2 and "module" in report["explanation"]
    assert modules["num_hits"] + modules["num_misses"] == modules["num_looked_up"]
    assert [m["seen_in_request_id"] for m in modules["modules"]] == [first.headers["x-request-id"]] * 2
    assert modules["modules"][0]["first_tokens"].startswith("document cherry")
    assert_error(get(server, f"/v1/cache/requests/{rid}/miss", "key-b"), "/v1/cache", 404, rid)
    recent = get(server, "/v1/cache/requests?limit=1").json()["data"][0]
    assert recent["request_id"] == rid and recent["num_modules"] == 2


def test_openapi_documents_modules(server) -> None:
    doc = get(server, "/openapi.json").json()
    paths = doc["paths"]
    assert {"post", "get"} <= set(paths["/v1/modules"]) and "delete" in paths["/v1/modules/{module_id}"]
    post_body = paths["/v1/modules"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert post_body["required"] == ["text"] and post_body["properties"]["ttl"]["anyOf"][0]["enum"] == ["5m", "1h",
                                                                                                         "24h"]
    assert "429" in paths["/v1/modules"]["post"]["responses"]
    for path in (CHAT, MESSAGES, TEXT):
        schema = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert "module_repair" in schema["properties"], path
    text = json.dumps(paths[CHAT]) + json.dumps(paths[MESSAGES])
    assert '"const": "module"' in text and '"module": {"type": "boolean", "const": true' in text
    schemas = doc["components"]["schemas"]
    assert set(schemas["UsageExtension"]["required"]) == EXTENSION_KEYS
    assert "promptstash" in json.dumps(schemas["ChatCompletion"]) and "promptstash" in json.dumps(schemas["Message"])


# ---------------------------------------------------------------------------------------------- official SDKs


def test_official_sdks_pass_module_parts_and_module_repair_through(server) -> None:
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="key-a", max_retries=0)
    an = anthropic.Anthropic(base_url=server.url, api_key="key-a", max_retries=0)
    registered = register(server, DOCS[2], id="sdk-doc")
    r = oa.chat.completions.create(
        model=MODEL, max_tokens=2, temperature=0, extra_body={"module_repair": "legolink:8"},
        messages=[{"role": "system", "content": [{"type": "text", "text": DOCS[0], "module": True}]},
                  {"role": "user", "content": [{"type": "module", "id": "sdk-doc"},  # type: ignore[list-item]
                                               {"type": "text", "text": "summarize"}]}])
    ext = r.usage.model_dump()["promptstash"]
    assert set(ext) == EXTENSION_KEYS and ext["module_repair"] == "legolink:8"
    assert r.usage.prompt_tokens > registered["num_tokens"]
    m = an.messages.create(
        model=MODEL, max_tokens=2, extra_body={"module_repair": "none"},
        system=[{"type": "text", "text": DOCS[0], "module": True}],  # type: ignore[typeddict-unknown-key]
        messages=[{"role": "user", "content": [{"type": "module", "id": "sdk-doc"},  # type: ignore[list-item]
                                               {"type": "text", "text": "summarize"}]}])
    ext = m.usage.model_dump()["promptstash"]
    assert set(ext) == EXTENSION_KEYS and ext["module_repair"] == "none"
    with pytest.raises(anthropic.BadRequestError, match="unknown module id"):
        an.messages.create(model=MODEL, max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "module", "id": "nope"}]}])  # type: ignore[list-item]
    with pytest.raises(openai.BadRequestError, match="module_repair"):
        oa.chat.completions.create(model=MODEL, max_tokens=2, extra_body={"module_repair": "sometimes"},
                                   messages=[{"role": "user", "content": "hi"}])
    assert delete(server, "/v1/modules/sdk-doc").status_code == 200


def test_official_sdks_report_module_reuse_in_another_order(server) -> None:
    """Modules seen in one request are reused, at other positions, by the next (needs the engine's module
    assembly): both SDKs report module-reused tokens, and the API's cached figure includes them."""
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="key-b", max_retries=0)
    an = anthropic.Anthropic(base_url=server.url, api_key="key-b", max_retries=0)
    docs = [d + " (sdk reuse)" for d in DOCS]

    def parts(order: list[int], question: str) -> list[dict[str, Any]]:
        return [{"type": "text", "text": docs[i], "module": True} for i in order] + [{"type": "text", "text": question}]

    oa.chat.completions.create(model=MODEL, max_tokens=1, temperature=0,
                               messages=[{"role": "user", "content": parts([0, 1, 2], "first")}])  # type: ignore
    r = oa.chat.completions.create(model=MODEL, max_tokens=1, temperature=0, extra_body={"module_repair": "none"},
                                   messages=[{"role": "user", "content": parts([2, 0, 1], "second")}])  # type: ignore
    ext = r.usage.model_dump()["promptstash"]
    assert ext["num_module_hits"] >= 2 and ext["module_cached_tokens"] > 0, ext
    assert r.usage.prompt_tokens_details.cached_tokens == ext["prefix_cached_tokens"] + ext["module_cached_tokens"]
    m = an.messages.create(model=MODEL, max_tokens=1, extra_body={"module_repair": "none"},
                           messages=[{"role": "user", "content": parts([1, 2, 0], "third")}])  # type: ignore
    ext = m.usage.model_dump()["promptstash"]
    assert ext["module_cached_tokens"] > 0, ext
    assert m.usage.cache_read_input_tokens == ext["prefix_cached_tokens"] + ext["module_cached_tokens"]
