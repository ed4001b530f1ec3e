"""Many clients at once: 32 concurrent streams with overlapping prefixes, disconnects, and the server's
metrics checked against the sum of the usage fields it returned."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import LiveServer, tiny_chat_engine
from test_server_api import MODEL, SYSTEM, cache_off

from promptstash.config import ServerConfig


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = tiny_chat_engine(tmp_path_factory.mktemp("tok"))
    with LiveServer(engine, ServerConfig(min_cacheable_tokens=64)) as srv:
        yield srv


def wait_idle(engine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.num_unfinished() or engine.stats().cache.usage.num_in_use:
        assert time.monotonic() < deadline, "requests or blocks still held"
        time.sleep(0.05)


def metric_values(text: str) -> dict[str, float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + "".join(f"[{k}={v}]" for k, v in sorted(sample.labels.items()))
            values[key] = sample.value
    return values


async def _stream(client: openai.AsyncOpenAI, messages: list[dict]) -> tuple[str, object]:
    stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    return text, usage


def test_32_concurrent_streams_complete_exactly_and_metrics_agree(server) -> None:
    engine = server.engine
    prompts = [[{"role": "system", "content": f"persona {p}. " + SYSTEM},
                {"role": "user", "content": f"question {q} about hello world"}] for p in range(4) for q in range(8)]

    async def run_all():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                                      http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=64),
                                                                    timeout=120)) as client:
            return await asyncio.gather(*(_stream(client, m) for m in prompts))

    results = asyncio.run(run_all())
    off = cache_off(engine)
    for messages, (text, usage) in zip(prompts, results, strict=True):
        ref = off.generate(messages, max_tokens=8)
        assert text == ref.text
        assert usage.prompt_tokens == ref.usage.prompt_tokens and usage.completion_tokens == 8
    cached = [u.prompt_tokens_details.cached_tokens for _, u in results]
    assert sum(cached) >= 0.5 * sum(u.prompt_tokens for _, u in results)  # 8 questions per shared persona
    wait_idle(engine)
    engine.check_integrity()

    # /v1/cache/stats and /metrics agree with the sum of the usage fields returned
    stats = httpx.get(server.url + "/v1/cache/stats").json()
    metrics = metric_values(httpx.get(server.url + "/metrics").text)
    prompt_tokens = sum(u.prompt_tokens for _, u in results)
    completion_tokens = sum(u.completion_tokens for _, u in results)
    assert stats["num_requests"] == 32
    assert stats["prompt_tokens"] == prompt_tokens == metrics["promptstash_prompt_tokens_total[tenant=local]"]
    assert stats["cached_tokens"] == sum(cached) == metrics["promptstash_cached_tokens_total[tenant=local]"]
    generated = metrics["promptstash_generation_tokens_total[tenant=local]"]
    assert stats["completion_tokens"] == completion_tokens == generated
    assert stats["hit_rate"] == pytest.approx(sum(cached) / prompt_tokens)
    assert metrics["promptstash_time_to_first_token_seconds_count[tenant=local]"] == 32
    assert metrics["promptstash_e2e_request_latency_seconds_count[tenant=local]"] == 32
    assert metrics["promptstash_requests_total[finish_reason=length][route=chat][tenant=local]"] == 32
    assert metrics["promptstash_pool_blocks[state=used]"] == 0
    assert metrics["promptstash_pool_blocks[state=cached]"] == stats["pool"]["cached"] > 0
    assert stats["savings"]["openai_style"]["saved"] == pytest.approx(
        sum(cached) * 0.5 * stats["savings"]["prices"]["input_per_mtok"] / 1e6)
    assert stats["savings"]["prefill_seconds_saved"] > 0


def test_client_disconnect_mid_stream_frees_blocks_at_once(server) -> None:
    engine = server.engine
    before = engine.stats().num_generated_tokens
    body = {"model": MODEL, "prompt": "hello " * 200, "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for i, _ in enumerate(response.iter_lines()):
            if i > 5:
                break
    wait_idle(engine, timeout=5)
    assert engine.stats().num_generated_tokens - before < 3000
    engine.check_integrity()
    ok = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 2})
    assert ok.status_code == 200
