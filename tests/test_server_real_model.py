"""The server on the real default model, through the official SDKs: reported reuse is the engine's real
reuse, and cached responses equal those of the engine with caching off."""

from __future__ import annotations

import anthropic
import openai
import pytest
from real_model_helpers import SYSTEM, engines
from server_helpers import LiveServer

from promptstash.config import ServerConfig

pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.timeout(600)]  # up to ~100 s each here


@pytest.fixture(scope="module")
def served():
    on, off = engines("float32")
    with LiveServer(on, ServerConfig(min_cacheable_tokens=1024)) as srv:
        yield srv, off


def test_openai_sdk_reports_real_reuse_and_cached_output_equals_caching_off(served) -> None:
    srv, off = served
    engine = srv.engine
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=300)
    system = "OpenAI session. " + SYSTEM
    shared_len = len(engine.tokenize([{"role": "system", "content": system}])) - 3  # minus generation prompt
    assert shared_len > 1000
    outputs = []
    for question in ("Name one rule about tests.", "What does rule 7 ask for?"):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        before = engine.stats().num_cached_tokens
        response = client.chat.completions.create(model=srv.state.model_name, messages=messages, max_tokens=16,
                                                  temperature=0)
        reused = engine.stats().num_cached_tokens - before
        assert response.usage.prompt_tokens_details.cached_tokens == reused
        outputs.append((messages, response))
    first, second = outputs[0][1], outputs[1][1]
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens >= 0.9 * shared_len
    for messages, response in outputs:
        ref = off.generate(messages, max_tokens=16)
        assert response.choices[0].message.content == ref.text
        assert response.usage.prompt_tokens == ref.usage.prompt_tokens
    # streamed: same text, usage on the last chunk
    stream = client.chat.completions.create(model=srv.state.model_name, messages=outputs[1][0], max_tokens=16,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == second.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens_details.cached_tokens


def test_anthropic_sdk_cache_control_write_then_read(served) -> None:
    srv, off = served
    engine = srv.engine
    client = anthropic.Anthropic(base_url=srv.url, api_key="none", max_retries=0, timeout=300)
    system = [{"type": "text", "text": "Anthropic session. " + SYSTEM,
               "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    kwargs = dict(model=srv.state.model_name, max_tokens=16, system=system, extra_body={"temperature": 0})
    first = client.messages.create(messages=[{"role": "user", "content": "Name one rule about docs."}], **kwargs)
    second = client.messages.create(messages=[{"role": "user", "content": "What is rule 3 about?"}], **kwargs)
    u1, u2 = first.usage, second.usage
    assert u1.cache_read_input_tokens == 0 and u1.cache_creation_input_tokens >= 1024
    assert u1.cache_creation.ephemeral_1h_input_tokens == u1.cache_creation_input_tokens
    assert u1.cache_creation.ephemeral_5m_input_tokens == 0
    assert u2.cache_read_input_tokens >= u1.cache_creation_input_tokens and u2.cache_creation_input_tokens == 0
    messages2 = [{"role": "system", "content": system[0]["text"]}, {"role": "user", "content": "What is rule 3 about?"}]
    ref = off.generate(messages2, max_tokens=16)
    assert u2.input_tokens == ref.usage.prompt_tokens - u2.cache_read_input_tokens
    assert second.content[0].text == ref.text
    with client.messages.stream(messages=[{"role": "user", "content": "What is rule 3 about?"}], **kwargs) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == ref.text
    assert final.usage.cache_read_input_tokens >= u2.cache_read_input_tokens
    assert final.usage.input_tokens == ref.usage.prompt_tokens - final.usage.cache_read_input_tokens
    engine.check_integrity()
