"""Tenants on a live server: each key sees only its own figures (/v1/cache/stats, /metrics, recent requests);
the figures shared by everyone (pool, tiers, engine) need an admin key; the metrics key and the
--metrics-port listener serve every figure to a scraper; /dashboard needs a key when keys are configured."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis_helpers import free_port
from server_helpers import LiveServer, tiny_chat_engine

from promptstash.config import ServerConfig

MODEL = "tiny-chat"
KEYS = {"key-alpha": "alpha", "key-beta": "beta", "key-alpha-x": "alpha|salt=x"}
ADMIN, SCRAPER = "admin-secret", "scrape-secret"
TENANT_FAMILIES = {"promptstash_requests", "promptstash_prompt_tokens", "promptstash_cached_tokens",
                   "promptstash_generation_tokens", "promptstash_cache_write_tokens", "promptstash_cache_write_refused",
                   "promptstash_time_to_first_token_seconds", "promptstash_e2e_request_latency_seconds"}


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def complete(srv: LiveServer, key: str, prompt: str, max_tokens: int = 2) -> dict:
    response = httpx.post(srv.url + "/v1/completions", headers=auth(key), timeout=30,
                          json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()


def metrics(text: str) -> dict[str, dict[tuple, float]]:
    """family name -> {sorted label items: value}, for samples named like the family (+ _total / _count)."""
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in (family.name, family.name + "_total", family.name + "_count"):
                out.setdefault(family.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = ServerConfig(api_keys=KEYS, admin_keys=(ADMIN,), metrics_key=SCRAPER, metrics_port=free_port())
    with LiveServer(tiny_chat_engine(tmp_path_factory.mktemp("tok")), config) as srv:
        srv.alpha = [complete(srv, "key-alpha", "hello world, alpha's prompt " * 4) for _ in range(2)]
        srv.beta = [complete(srv, "key-beta", "hello world, beta's prompt " * 6, max_tokens=3)]
        yield srv


@pytest.mark.parametrize("path", ["/v1/cache/stats", "/metrics", "/dashboard", "/v1/cache/requests",
                                  "/v1/cache/prefixes"])
def test_observability_routes_need_a_key_when_keys_are_configured(server, path) -> None:
    assert httpx.get(server.url + path, timeout=10).status_code == 401
    wrong = httpx.get(server.url + path, headers=auth("not-a-key"), timeout=10)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"


def test_each_tenant_sees_only_its_own_counts_in_cache_stats(server) -> None:
    for key, tenant, responses in (("key-alpha", "alpha", server.alpha), ("key-beta", "beta", server.beta)):
        stats = httpx.get(server.url + "/v1/cache/stats", headers=auth(key), timeout=10).json()
        assert stats["tenant"] == tenant
        assert stats["num_requests"] == len(responses)
        assert stats["prompt_tokens"] == sum(r["usage"]["prompt_tokens"] for r in responses)
        assert stats["completion_tokens"] == sum(r["usage"]["completion_tokens"] for r in responses)
        assert stats["cached_tokens"] == sum(r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in responses)
        assert "pool" not in stats and "tiers" not in stats and "tenants" not in stats  # shared: admin only
    assert server.alpha[1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_each_tenant_sees_only_its_own_series_in_metrics(server) -> None:
    for key, tenant, responses in (("key-alpha", "alpha", server.alpha), ("key-beta", "beta", server.beta)):
        text = httpx.get(server.url + "/metrics", headers=auth(key), timeout=10).text
        m = metrics(text)
        assert set(m) <= TENANT_FAMILIES  # nothing engine-wide: no pool, tier or queue figures
        assert "promptstash_pool_blocks" not in text
        assert m["promptstash_prompt_tokens"] == {(("tenant", tenant),): sum(r["usage"]["prompt_tokens"]
                                                                          for r in responses)}
        assert m["promptstash_requests"] == {(("finish_reason", "length"), ("route", "text"), ("tenant", tenant)):
                                             len(responses)}
        assert m["promptstash_e2e_request_latency_seconds"] == {(("tenant", tenant),): len(responses)}
        other = "beta" if tenant == "alpha" else "alpha"
        assert f'tenant="{other}"' not in text


def test_admin_sees_every_tenant_and_the_pool(server) -> None:
    stats = httpx.get(server.url + "/v1/cache/stats", headers=auth(ADMIN), timeout=10).json()
    tenants = stats["tenants"]
    assert tenants["alpha"]["num_requests"] == 2 and tenants["beta"]["num_requests"] == 1
    assert tenants["alpha"]["prompt_tokens"] == sum(r["usage"]["prompt_tokens"] for r in server.alpha)
    assert stats["num_requests"] == sum(t["num_requests"] for t in tenants.values()) >= 3
    assert stats["prompt_tokens"] == sum(t["prompt_tokens"] for t in tenants.values())
    assert stats["pool"]["num_blocks"] == server.engine.stats().cache.usage.num_blocks
    assert stats["pool"]["cached"] > 0 and "tiers" in stats and "requests" in stats
    m = metrics(httpx.get(server.url + "/metrics", headers=auth(ADMIN), timeout=10).text)
    assert {labels for labels in m["promptstash_prompt_tokens"]} >= {(("tenant", "alpha"),), (("tenant", "beta"),)}
    assert "promptstash_pool_blocks" in m and "promptstash_requests_unfinished" in m
    recent = httpx.get(server.url + "/v1/cache/requests", headers=auth(ADMIN), timeout=10).json()["data"]
    assert {r["request_id"] for r in recent} >= {r["id"].removeprefix("cmpl-") for r in server.alpha + server.beta}


def test_admin_key_is_served_on_model_routes_as_tenant_admin(server) -> None:
    out = complete(server, ADMIN, "hello world from the admin")
    stats = httpx.get(server.url + "/v1/cache/stats", headers=auth(ADMIN), timeout=10).json()
    assert stats["tenants"]["admin"]["prompt_tokens"] >= out["usage"]["prompt_tokens"]
    alpha = httpx.get(server.url + "/v1/cache/stats", headers=auth("key-alpha"), timeout=10).json()
    assert alpha["num_requests"] == 2  # the admin's request is not alpha's


def test_metrics_key_sees_every_figure_on_metrics_and_nothing_else(server) -> None:
    m = metrics(httpx.get(server.url + "/metrics", headers=auth(SCRAPER), timeout=10).text)
    assert {(("tenant", "alpha"),), (("tenant", "beta"),)} <= set(m["promptstash_prompt_tokens"])
    assert "promptstash_pool_blocks" in m
    for path in ("/v1/cache/stats", "/dashboard", "/v1/models"):
        assert httpx.get(server.url + path, headers=auth(SCRAPER), timeout=10).status_code == 401
    refused = httpx.post(server.url + "/v1/completions", headers=auth(SCRAPER), timeout=10,
                         json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
    assert refused.status_code == 401


def test_metrics_port_serves_every_figure_without_a_key(server) -> None:
    port = server.state.config.metrics_port
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    m = metrics(response.text)
    assert {(("tenant", "alpha"),), (("tenant", "beta"),)} <= set(m["promptstash_prompt_tokens"])
    assert "promptstash_pool_blocks" in m
    assert httpx.get(f"http://127.0.0.1:{port}/v1/cache/stats", timeout=10).status_code == 404  # /metrics alone


def test_dashboard_is_served_with_the_key_in_the_query_or_a_header(server) -> None:
    for key in ("key-alpha", ADMIN):
        page = httpx.get(server.url + "/dashboard", params={"key": key}, timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert httpx.get(server.url + "/dashboard", headers=auth(key), timeout=10).status_code == 200
    assert httpx.get(server.url + "/dashboard", params={"key": "nope"}, timeout=10).status_code == 401


@pytest.mark.slow  # headless Chromium
def test_dashboard_in_chromium_with_a_tenant_key_shows_its_own_figures_and_no_pool(server) -> None:
    from test_dashboard import browse, text_of

    dom = browse(f"{server.url}/dashboard?key=key-beta", "--dump-dom")
    assert text_of(dom, "num-requests") == "1"
    assert text_of(dom, "prompt-tokens") == f"{server.beta[0]['usage']['prompt_tokens']:,}"
    assert "open the dashboard with an admin key" in dom
    assert server.beta[0]["id"].removeprefix("cmpl-") in dom and server.alpha[0]["id"].removeprefix("cmpl-") not in dom


def test_recent_requests_are_filtered_by_tenant_not_by_namespace_prefix(server) -> None:
    """Tenant "alpha|salt=x" has a namespace that starts like alpha's would with a salt: still not alpha's."""
    mine = complete(server, "key-alpha-x", "hello world from a look-alike tenant")
    alpha = httpx.get(server.url + "/v1/cache/requests", headers=auth("key-alpha"), timeout=10).json()["data"]
    assert len(alpha) == 2 and all(r["request_id"] != mine["id"].removeprefix("cmpl-") for r in alpha)
    other = httpx.get(server.url + "/v1/cache/requests", headers=auth("key-alpha-x"), timeout=10).json()["data"]
    assert [r["request_id"] for r in other] == [mine["id"].removeprefix("cmpl-")]
    assert httpx.get(f"{server.url}/v1/cache/requests/{other[0]['request_id']}/miss", headers=auth("key-alpha"),
                     timeout=10).status_code == 404


def test_without_keys_every_route_is_open_and_shows_every_figure(tmp_path) -> None:
    with LiveServer(tiny_chat_engine(tmp_path)) as srv:
        httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 1}, timeout=30)
        stats = httpx.get(srv.url + "/v1/cache/stats", timeout=10).json()
        assert stats["num_requests"] == 1 and "pool" in stats and stats["tenants"]["local"]["num_requests"] == 1
        assert httpx.get(srv.url + "/dashboard", timeout=10).status_code == 200
        assert "promptstash_pool_blocks" in httpx.get(srv.url + "/metrics", timeout=10).text


def test_a_metrics_key_alone_guards_metrics_only(tmp_path) -> None:
    with LiveServer(tiny_chat_engine(tmp_path), ServerConfig(metrics_key=SCRAPER)) as srv:
        assert httpx.get(srv.url + "/metrics", timeout=10).status_code == 401
        assert httpx.get(srv.url + "/metrics", headers=auth(SCRAPER), timeout=10).status_code == 200
        assert httpx.get(srv.url + "/v1/cache/stats", timeout=10).status_code == 200


def test_a_tenant_over_its_queue_limit_gets_429_or_529_while_others_are_served(tmp_path) -> None:
    config = ServerConfig(api_keys={"key-alpha": "alpha", "key-beta": "beta"}, tenant_max_queued=1,
                          stream_idle_timeout_s=7.5)
    with LiveServer(tiny_chat_engine(tmp_path), config) as srv:
        assert (srv.state.loop.tenant_max_queued, srv.state.loop.stream_idle_timeout_s) == (1, 7.5)
        hold = {"model": MODEL, "prompt": "hello", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            with client.stream("POST", "/v1/completions", json=hold, headers=auth("key-alpha")) as stream:
                assert stream.status_code == 200
                lines = stream.iter_lines()  # kept: a dropped iterator would close the stream
                assert next(line for line in lines if line.startswith("data:"))  # generating
                bodies = {"/v1/completions": {"model": MODEL, "max_tokens": 1, "prompt": "hi"},
                          "/v1/messages": {"model": MODEL, "max_tokens": 1,
                                           "messages": [{"role": "user", "content": "hi"}]}}
                for path, status in (("/v1/completions", 429), ("/v1/messages", 529)):
                    refused = client.post(path, json=bodies[path], headers=auth("key-alpha"))
                    assert refused.status_code == status, refused.text
                    assert "per-tenant limit of 1" in refused.text and refused.headers["retry-after"] == "1"
                for path, body in bodies.items():
                    assert client.post(path, json=body, headers=auth("key-beta")).status_code == 200
                assert srv.engine.num_unfinished("alpha") == 1  # the held stream ran throughout
