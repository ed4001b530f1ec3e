"""The /dashboard page in real headless Chromium, and the "why did this miss?" report."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from server_helpers import LiveServer, tiny_chat_engine

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LiveServer(tiny_chat_engine(tmp_path_factory.mktemp("tok"))) as srv:
        yield srv


def complete(srv: LiveServer, prompt) -> httpx.Response:
    response = httpx.post(srv.url + "/v1/completions", json={"model": "default", "prompt": prompt, "max_tokens": 2},
                          timeout=30)
    assert response.status_code == 200, response.text
    return response


def chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    return binary


def browse(url: str, *args: str) -> str:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--virtual-time-budget=5000", *args, url]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def text_of(dom: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert match, f"#{element_id} not found in the rendered page"
    return html.unescape(match.group(1))


@pytest.mark.slow  # headless Chromium
def test_dashboard_in_headless_chromium_shows_the_live_figures(server) -> None:
    shared = "hello world, this is a tiny corpus. " * 30
    ids = [complete(server, shared + q).headers["x-request-id"] for q in ("one", "two", "three")]
    dom = browse(server.url + "/dashboard", "--dump-dom")
    stats = httpx.get(server.url + "/v1/cache/stats").json()
    assert stats["num_requests"] == 3 and stats["cached_tokens"] > 0
    assert text_of(dom, "hit-rate") == f"{100 * stats['hit_rate']:.1f}%"
    assert text_of(dom, "prompt-tokens") == f"{stats['prompt_tokens']:,}"
    assert text_of(dom, "cached-tokens") == f"{stats['cached_tokens']:,}"
    assert text_of(dom, "num-requests") == "3"
    assert text_of(dom, "saved-openai") == f"${stats['savings']['openai_style']['saved']:.4f}"
    assert text_of(dom, "pool-cached") == str(stats["pool"]["cached"])
    assert all(f"<code>{request_id}</code>" in dom for request_id in ids)  # the recent requests
    assert "hello world" in dom  # a top cached prefix, decoded
    prefixes = httpx.get(server.url + "/v1/cache/prefixes").json()["data"]
    assert prefixes[0]["hits"] == 2 and prefixes[0]["tier"] == "pool" and prefixes[0]["ttl_class"] is None
    assert prefixes[0]["size_tokens"] == stats["cached_tokens"] // 2
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    browse(server.url + "/dashboard", f"--screenshot={shot}", "--window-size=1280,1300")
    assert shot.stat().st_size > 10_000


def test_divergence_report_finds_the_changed_token(server) -> None:
    base = [(i * 7 + 11) % 300 + 20 for i in range(200)]
    complete(server, base)
    changed = list(base)
    changed[100] = (changed[100] + 1) % 300 + 20
    response = complete(server, changed)
    request_id = response.headers["x-request-id"]
    assert response.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 96  # 6 whole blocks before 100
    report = httpx.get(f"{server.url}/v1/cache/requests/{request_id}/miss").json()
    assert report["diverged_at_token"] == 100 and report["reusable_tokens"] == 96
    assert report["cached_tokens"] == 96 and report["closest_request_id"] is not None
    assert (report["this_token_id"], report["earlier_token_id"]) == (changed[100], base[100])
    assert report["text_before"] and report["this_text_after"]
    missing = httpx.get(f"{server.url}/v1/cache/requests/nope/miss")
    assert missing.status_code == 404 and "error" in missing.json()
