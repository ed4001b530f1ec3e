"""The semantic cache on the real default model and the real embedder (all-MiniLM-L6-v2), through both official
SDKs: a paraphrase is answered from the cache (labelled in the header and usage, the model does not run), a
near miss above the threshold is refused by its guard, and another tenant never sees the entry."""

from __future__ import annotations

import anthropic
import openai
import pytest
from real_model_helpers import engines
from server_helpers import LiveServer

from promptstash.config import ServerConfig
from promptstash.semantic import DEFAULT_THRESHOLD
from promptstash.server.semantic import HEADER

pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.timeout(600)]

SYSTEM = "You are a concise assistant. Answer in one short sentence."


@pytest.fixture(scope="module")
def srv():
    on, _ = engines("float32")
    config = ServerConfig(api_keys={"key-a": "semantic-a", "key-b": "semantic-b"})
    with LiveServer(on, config) as live:
        yield live


def test_openai_sdk_paraphrase_hit_near_miss_refusal_and_tenant_isolation(srv) -> None:
    def ask(key: str, text: str, semantic=True):
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=300)
        raw = client.chat.completions.with_raw_response.create(
            model=srv.state.model_name, max_tokens=12, temperature=0, extra_body={"semantic_cache": semantic},
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}])
        return raw.headers.get(HEADER), raw.parse()

    computed = srv.engine.stats().num_computed_prompt_tokens
    label, first = ask("key-a", "Give me five tips for better sleep.")
    assert label == "miss" and first.usage.model_extra["semantic_cache"]["hit"] is False
    assert srv.engine.stats().num_computed_prompt_tokens > computed
    computed = srv.engine.stats().num_computed_prompt_tokens
    # NOTE: at the default threshold (0.99, chosen by `promptstash bench semantic`) only very close rewordings hit;
    # digits for a number word is one a real user sends (similarity ~0.996).
    label, hit = ask("key-a", "Give me 5 tips for better sleep.")
    semantic = hit.usage.model_extra["semantic_cache"]
    assert label == "hit" and semantic["hit"] is True and semantic["similarity"] >= DEFAULT_THRESHOLD, semantic
    assert hit.choices[0].message.content == first.choices[0].message.content
    assert hit.usage.prompt_tokens_details.cached_tokens == hit.usage.prompt_tokens
    assert srv.engine.stats().num_computed_prompt_tokens == computed  # the model did not run
    # similarity ~0.96, a different question: below the default threshold, so ask with 0.9 to reach the guard
    label, near = ask("key-a", "Give me three tips for better sleep.", {"threshold": 0.9})
    assert label == "refused:number" and near.usage.model_extra["semantic_cache"]["guard"] == "number"
    label, other = ask("key-b", "Give me 5 tips for better sleep.")
    assert label == "miss"  # tenant b never sees tenant a's entry


def test_anthropic_sdk_paraphrase_hit_and_near_miss_refusal(srv) -> None:
    client = anthropic.Anthropic(base_url=srv.url, api_key="key-a", max_retries=0, timeout=300)

    def ask(text: str, semantic=True):
        raw = client.messages.with_raw_response.create(
            model=srv.state.model_name, max_tokens=12, system=SYSTEM, messages=[{"role": "user", "content": text}],
            extra_body={"temperature": 0, "semantic_cache": semantic})
        return raw.headers.get(HEADER), raw.parse()

    label, first = ask("Explain what a Python decorator is.")
    assert label == "miss"
    label, hit = ask("Can you explain what a Python decorator is?")  # similarity ~0.994
    assert label == "hit" and hit.usage.model_extra["semantic_cache"]["hit"] is True
    assert hit.content[0].text == first.content[0].text and hit.usage.input_tokens == 0
    label, near = ask("Explain what a Rust decorator is.", {"threshold": 0.5})
    assert label == "refused:entity"
    label, plain = ask("Can you explain what a Python decorator is?", False)
    assert label is None and "semantic_cache" not in (plain.usage.model_extra or {})
