"""The server through the official SDKs (openai, anthropic) on a live loopback port, with a tiny chat model.

Every usage figure checked here is compared against the engine's own accounting or a recomputation.
"""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest
from server_helpers import FakeClock, LiveServer, tiny_chat_engine

from promptstash.config import EngineConfig, ServerConfig
from promptstash.engine.engine import Engine

SYSTEM = "You are a tiny model. " + " ".join(f"rule {i}: hello world, this is a tiny corpus." for i in range(40))
MODEL = "tiny-chat"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = tiny_chat_engine(tmp_path_factory.mktemp("tok"))
    with LiveServer(engine, ServerConfig(min_cacheable_tokens=64)) as srv:
        yield srv


def cache_off(engine: Engine) -> Engine:
    """The same weights and tokenizer with prefix caching off: the reference for exact outputs."""
    config = EngineConfig(dtype="float32", kv_cache_tokens=8192, max_prefill_tokens=128, enable_prefix_caching=False)
    return Engine(engine.model, engine.tokenizer, config, engine.model_id)


def oa(srv: LiveServer, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)


def an(srv: LiveServer, key: str = "none") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.url, api_key=key, max_retries=0)


def chat(system: str, question: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def test_openai_chat_shared_system_prompt_reports_engine_reuse_and_matches_caching_off(server) -> None:
    client, engine = oa(server), server.engine
    system = "openai-shared " + SYSTEM
    prefix_len = len(engine.tokenize([{"role": "system", "content": system}])) - 3  # minus the generation prompt
    first = client.chat.completions.create(model=MODEL, messages=chat(system, "first question"), max_tokens=8,
                                           temperature=0)
    before = engine.stats().num_cached_tokens
    second = client.chat.completions.create(model=MODEL, messages=chat(system, "another one"), max_tokens=8,
                                            temperature=0)
    reused = engine.stats().num_cached_tokens - before
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert cached == reused
    assert cached >= 0.9 * prefix_len
    assert second.usage.prompt_tokens == len(engine.tokenize(chat(system, "another one")))
    off = cache_off(engine)
    for response, question in ((first, "first question"), (second, "another one")):
        ref = off.generate(chat(system, question), max_tokens=8)
        assert response.choices[0].message.content == ref.text
        assert response.usage.completion_tokens == ref.usage.completion_tokens


def test_openai_streamed_and_plain_responses_agree(server) -> None:
    client = oa(server)
    messages = chat("stream " + SYSTEM, "say something")
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage is not None and not chunks[-1].choices
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the plain call cached the prompt
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason


def test_openai_completions_streamed_and_plain(server) -> None:
    client = oa(server)
    plain = client.completions.create(model=MODEL, prompt="hello world, this is", max_tokens=6, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="hello world, this is", max_tokens=6, temperature=0, stream=True) if c.choices)
    assert plain.object == "text_completion" and plain.usage.completion_tokens == 6
    assert streamed == plain.choices[0].text
    ref = cache_off(server.engine).generate("hello world, this is", max_tokens=6)
    assert plain.choices[0].text == ref.text


def test_openai_stop_sequence_and_seeded_sampling(server) -> None:
    client = oa(server)
    messages = chat("be random", "go")
    a = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=1.0, seed=7)
    b = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=1.0, seed=7)
    assert a.choices[0].message.content == b.choices[0].message.content
    text = a.choices[0].message.content
    if len(text) >= 3:
        cut = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=1.0,
                                             seed=7, stop=[text[2:4]])
        assert cut.choices[0].finish_reason == "stop"
        assert text.startswith(cut.choices[0].message.content) and text[2:4] not in cut.choices[0].message.content


def test_anthropic_breakpoint_writes_then_reads_with_ttl_split(server) -> None:
    client, engine = an(server), server.engine
    system = [{"type": "text", "text": "anthropic " + SYSTEM, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    kwargs = dict(model=MODEL, max_tokens=6, system=system, extra_body={"temperature": 0})
    first = client.messages.create(messages=[{"role": "user", "content": "question one"}], **kwargs)
    second = client.messages.create(messages=[{"role": "user", "content": "question two"}], **kwargs)
    u1, u2 = first.usage, second.usage
    prompt_len = len(engine.tokenize([{"role": "system", "content": "anthropic " + SYSTEM},
                                      {"role": "user", "content": "question one"}]))
    assert u1.cache_creation_input_tokens > 0 and u1.cache_read_input_tokens == 0
    assert u1.cache_creation.ephemeral_1h_input_tokens == u1.cache_creation_input_tokens
    assert u1.cache_creation.ephemeral_5m_input_tokens == 0
    assert u1.input_tokens + u1.cache_creation_input_tokens + u1.cache_read_input_tokens == prompt_len
    assert u2.cache_read_input_tokens >= u1.cache_creation_input_tokens
    assert u2.cache_creation_input_tokens == 0
    prompt_len2 = len(engine.tokenize([{"role": "system", "content": "anthropic " + SYSTEM},
                                       {"role": "user", "content": "question two"}]))
    assert u2.input_tokens == prompt_len2 - u2.cache_read_input_tokens
    assert engine.stats().cache.num_protected_blocks["1h"] >= u1.cache_creation_input_tokens // 16
    prefixes = httpx.get(server.url + "/v1/cache/prefixes").json()["data"]
    mine = next(p for p in prefixes if "anthropic" in p["first_tokens"])
    assert (mine["tier"], mine["ttl_class"]) == ("pool", "1h")  # the dashboard's top-prefix row
    # a streamed repeat agrees with a plain repeat (both now read the whole cached prompt)
    third = client.messages.create(messages=[{"role": "user", "content": "question two"}], **kwargs)
    with client.messages.stream(messages=[{"role": "user", "content": "question two"}], **kwargs) as stream:
        final = stream.get_final_message()
    assert third.usage.cache_read_input_tokens > u2.cache_read_input_tokens
    assert final.usage.model_dump() == third.usage.model_dump()
    assert final.content[0].text == third.content[0].text == second.content[0].text
    assert final.stop_reason == third.stop_reason == "max_tokens"


def test_anthropic_5m_and_1h_breakpoints_split_the_write(server) -> None:
    client = an(server)
    long_a, long_b = "split-a " + SYSTEM, "split-b " + SYSTEM
    system = [{"type": "text", "text": long_a, "cache_control": {"type": "ephemeral", "ttl": "1h"}},
              {"type": "text", "text": long_b, "cache_control": {"type": "ephemeral"}}]
    out = client.messages.create(model=MODEL, max_tokens=1, system=system,
                                 messages=[{"role": "user", "content": "hi"}])
    split = out.usage.cache_creation
    assert split.ephemeral_1h_input_tokens > 0 and split.ephemeral_5m_input_tokens > 0
    assert split.ephemeral_1h_input_tokens + split.ephemeral_5m_input_tokens == out.usage.cache_creation_input_tokens


def test_anthropic_breakpoint_below_minimum_writes_nothing(server) -> None:
    out = an(server).messages.create(
        model=MODEL, max_tokens=2, system=[{"type": "text", "text": "short", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "hi"}])
    assert out.usage.cache_creation_input_tokens == 0


def test_anthropic_max_tokens_zero_only_warms_the_cache(server) -> None:
    client = an(server)
    system = [{"type": "text", "text": "warm " + SYSTEM, "cache_control": {"type": "ephemeral"}}]
    warm = client.messages.create(model=MODEL, max_tokens=0, system=system,
                                  messages=[{"role": "user", "content": "q"}])
    assert warm.content == [] and warm.usage.output_tokens == 0 and warm.usage.cache_creation_input_tokens > 0
    hit = client.messages.create(model=MODEL, max_tokens=3, system=system, messages=[{"role": "user", "content": "q"}])
    assert hit.usage.cache_read_input_tokens >= warm.usage.cache_creation_input_tokens


def test_anthropic_automatic_cache_control_marks_the_last_block(server) -> None:
    client = an(server)
    messages = [{"role": "user", "content": "automatic " + SYSTEM}]
    first = client.messages.create(model=MODEL, max_tokens=2, messages=messages,
                                   extra_body={"cache_control": {"type": "ephemeral"}})
    assert first.usage.cache_creation.ephemeral_5m_input_tokens > 0


def test_openai_24h_retention_protects_the_prompt(tmp_path) -> None:
    with LiveServer(tiny_chat_engine(tmp_path)) as srv:
        out = oa(srv).chat.completions.create(
            model=MODEL, messages=chat("24h " + SYSTEM, "q"), max_tokens=2,
            extra_body={"prompt_cache_retention": "24h", "prompt_cache_key": "k1"})
        protected = httpx.get(srv.url + "/v1/cache/stats").json()["pool"]["protected_blocks"]
    assert protected["24h"] == out.usage.prompt_tokens // 16 and protected["5m"] == protected["1h"] == 0
    assert out.usage.prompt_tokens_details.cache_write_tokens == protected["24h"] * 16


def test_tenants_never_share_cache(tmp_path) -> None:
    engine = tiny_chat_engine(tmp_path)
    with LiveServer(engine, ServerConfig(api_keys={"key-a": "a", "key-b": "b"})) as srv:
        messages = chat("tenant " + SYSTEM, "secret question")
        a1 = oa(srv, "key-a").chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        b1 = oa(srv, "key-b").chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        b_anthropic = an(srv, "key-b").messages.create(
            model=MODEL, max_tokens=2, system="tenant " + SYSTEM,
            messages=[{"role": "user", "content": "secret question"}])
        a2 = oa(srv, "key-a").chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        salted = oa(srv, "key-a").chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                                          extra_body={"cache_salt": "s1"})
    assert a1.usage.prompt_tokens_details.cached_tokens == 0
    assert b1.usage.prompt_tokens_details.cached_tokens == 0
    assert b_anthropic.usage.cache_read_input_tokens > 0  # B's own earlier request, not A's
    assert a2.usage.prompt_tokens_details.cached_tokens > 0.9 * a2.usage.prompt_tokens
    assert salted.usage.prompt_tokens_details.cached_tokens == 0


def test_ttl_protects_until_expiry_and_a_hit_refreshes_it(tmp_path) -> None:
    clock = FakeClock()
    engine = tiny_chat_engine(tmp_path, clock=clock, kv_cache_tokens=1024)  # 64 blocks of 16 tokens
    with LiveServer(engine, ServerConfig(min_cacheable_tokens=16)) as srv:
        client = an(srv)
        system = [{"type": "text", "text": SYSTEM[:500], "cache_control": {"type": "ephemeral", "ttl": "5m"}}]

        def ask(question: str):
            return client.messages.create(model=MODEL, max_tokens=1, system=system,
                                          messages=[{"role": "user", "content": question}])

        def flood(tag: str) -> None:  # distinct prompts that need every unprotected block of the pool
            for i in range(6):
                oa(srv).completions.create(model=MODEL, prompt=f"{tag} {i} " + "the lazy dog " * 150, max_tokens=1)

        written = ask("q").usage.cache_creation_input_tokens
        assert written > 0
        num_protected = engine.stats().cache.num_protected_blocks["5m"]
        assert num_protected == written // 16
        clock.advance(200)
        flood("a")
        assert engine.stats().cache.num_evictions > 0
        assert ask("q").usage.cache_read_input_tokens >= written  # protected, and the hit refreshes the TTL
        clock.advance(200)  # 400 s after the write, 200 s after the last use
        flood("b")
        assert ask("q").usage.cache_read_input_tokens >= written
        clock.advance(301)
        flood("c")
        assert engine.stats().cache.num_protected_blocks["5m"] == 0
        assert ask("q").usage.cache_read_input_tokens < written  # expired, then evicted by the flood
        engine.check_integrity()


def test_refused_write_when_protection_would_exceed_the_pool(tmp_path) -> None:
    engine = tiny_chat_engine(tmp_path, kv_cache_tokens=1024, max_protected_fraction=0.1)  # 6 blocks
    with LiveServer(engine, ServerConfig(min_cacheable_tokens=16)) as srv:
        out = an(srv).messages.create(
            model=MODEL, max_tokens=1, messages=[{"role": "user", "content": [
                {"type": "text", "text": SYSTEM[:600], "cache_control": {"type": "ephemeral"}}]}])
        stats = httpx.get(srv.url + "/v1/cache/stats").json()
        metrics = httpx.get(srv.url + "/metrics").text
    assert out.usage.cache_creation_input_tokens == 0 and out.content  # the request itself succeeds
    assert stats["refused_writes"] == 1
    assert 'promptstash_cache_write_refused_total{tenant="local"} 1.0' in metrics


def test_cache_stats_report_the_weight_format_and_the_process_memory(server) -> None:
    process = httpx.get(server.url + "/v1/cache/stats").json()["process"]
    assert process["weights"] == "float32" and process["dtype"] == "float32"
    assert 0 < process["weight_bytes"] and 0 < process["kv_pool_bytes"]
    assert 0 < process["rss_bytes"] <= process["peak_rss_bytes"]
    assert process["rss_bytes"] > process["weight_bytes"]  # the weights are part of what the process holds
