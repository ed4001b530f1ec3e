"""Modules on the real default model (float32) through the server and the official SDKs: a question over 5
modules that were each seen in other requests (other orders and combinations) reports module-reused tokens
through both SDKs, and `module_repair: "full"` answers exactly what the engine with caching off answers for the
same tokens."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest
from real_model_helpers import engines
from server_helpers import LiveServer

from promptstash.config import ServerConfig
from promptstash.engine.sampling import SamplingParams

pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.timeout(600)]

DOCS = [f"Record {i}: the depot in {c} holds {n} barrels of {item}; its manager is {who}.\n"
        for i, (c, n, item, who) in enumerate([("Bergen", 140, "olive oil", "Ana"), ("Cusco", 65, "cider", "Ben"),
                                               ("Nagpur", 410, "molasses", "Chen"), ("Lviv", 38, "vinegar", "Dora"),
                                               ("Cuenca", 205, "honey", "Emil")])]
INSTRUCTIONS = "Answer from the records in a few words."
QUESTION = "How many barrels does the depot in Nagpur hold?"


def parts(order: list[int], question: str) -> list[dict[str, Any]]:
    return [{"type": "text", "text": DOCS[i], "module": True} for i in order] + [{"type": "text", "text": question}]


def chat(order: list[int], question: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": parts(order, question)}]


@pytest.fixture(scope="module")
def served():
    on, off = engines("float32")
    with LiveServer(on, ServerConfig()) as srv:
        yield srv, off


def test_sdks_report_module_reuse_over_five_documents_and_full_equals_caching_off(served) -> None:
    srv, off = served
    model = srv.state.model_name
    oa = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=300)
    an = anthropic.Anthropic(base_url=srv.url, api_key="none", max_retries=0, timeout=300)
    # each record is seen in another request first, in other combinations and orders, through either SDK
    oa.chat.completions.create(model=model, messages=chat([4, 2, 0], "Who manages Bergen?"),  # type: ignore
                               max_tokens=1, temperature=0)
    an.messages.create(model=model, max_tokens=1, system=INSTRUCTIONS,
                       messages=[{"role": "user", "content": parts([1, 3], "What is in Lviv?")}])  # type: ignore

    r = oa.chat.completions.create(model=model, messages=chat([3, 0, 4, 1, 2], QUESTION),  # type: ignore
                                   max_tokens=16, temperature=0, extra_body={"module_repair": "legolink:16"})
    ext = r.usage.model_dump()["promptstash"]
    assert ext["num_modules"] == 5 and ext["num_module_hits"] == 5, ext
    assert ext["module_cached_tokens"] > 0 and ext["module_repair"] == "legolink:16", ext
    assert r.usage.prompt_tokens_details.cached_tokens == ext["prefix_cached_tokens"] + ext["module_cached_tokens"]
    assert "410" in r.choices[0].message.content, r.choices[0].message.content

    m = an.messages.create(model=model, max_tokens=16, system=INSTRUCTIONS,
                           extra_body={"module_repair": "cacheblend:0.15", "temperature": 0},
                           messages=[{"role": "user", "content": parts([2, 4, 1, 0, 3], QUESTION)}])  # type: ignore
    ext = m.usage.model_dump()["promptstash"]
    assert ext["num_module_hits"] == 5 and ext["module_cached_tokens"] > 0, ext
    assert m.usage.cache_read_input_tokens == ext["prefix_cached_tokens"] + ext["module_cached_tokens"]
    assert "410" in m.content[0].text, m.content[0].text

    full = oa.chat.completions.create(model=model, messages=chat([3, 0, 4, 1, 2], QUESTION),  # type: ignore
                                      max_tokens=16, temperature=0, extra_body={"module_repair": "full"})
    assert full.usage.model_dump()["promptstash"]["module_repair"] == "full"
    rendered = srv.engine.render(chat([3, 0, 4, 1, 2], QUESTION))  # the same tokens: modules tokenized alone
    assert full.usage.prompt_tokens == len(rendered.token_ids)
    rid = off.add_request(rendered.token_ids, SamplingParams(max_tokens=16, temperature=0))
    reference = off.run_until_done([rid])[0]
    assert full.choices[0].message.content == reference.text
