"""Modules on the real default model (float32): every reuse path, and `full` equal to caching off."""

from __future__ import annotations

import pytest
import torch
from real_model_helpers import engines

from promptstash.engine.sampling import SamplingParams

pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.timeout(600)]

DOCS = [f"Document {i}: the warehouse in city {c} stores {n} crates of {item}; it opened in {1990 + i}.\n"
        for i, (c, n, item) in enumerate([("Oslo", 120, "apples"), ("Lima", 75, "copper"), ("Pune", 310, "tea"),
                                          ("Kiev", 42, "grain"), ("Quito", 99, "roses")])]


def messages(order: list[int], question: str) -> list[dict]:
    parts = [{"type": "text", "text": DOCS[i], "module": True} for i in order]
    return [{"role": "system", "content": "Answer from the documents in a few words."},
            {"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


def test_modules_seen_in_other_requests_are_reused_and_full_equals_caching_off() -> None:
    on, off = engines("float32")
    ns = "modules-real"
    on.generate(messages([4, 2, 0], "Which city stores tea?"), namespace=ns, max_tokens=1, module_repair="none")
    on.generate(messages([1, 3], "Which city stores grain?"), namespace=ns, max_tokens=1, module_repair="none")
    question = messages([3, 0, 4, 1, 2], "How many crates does the warehouse in Pune store?")
    for repair in ("none", "legolink:16", "cacheblend:0.15"):
        out = on.generate(question, namespace=ns, max_tokens=16, temperature=0, module_repair=repair)
        assert out.usage.num_modules == 5 and out.usage.num_module_hits == 5, repair
        assert out.usage.module_cached_tokens > 0 and out.finish_reason in ("stop", "length"), repair
        # NOTE: approximate strategies' answer quality is measured by `promptstash bench modules`, not assumed
    rendered = on.render(question, ns)
    full = on.prompt_logits(rendered.token_ids, namespace=ns, modules=rendered.modules, module_repair="full")
    ref = off.prompt_logits(rendered.token_ids)
    torch.testing.assert_close(full.logits, ref.logits[full.num_cached_tokens:], atol=1e-4, rtol=0)
    greedy = SamplingParams(max_tokens=16, temperature=0)
    rid = on.add_request(rendered.token_ids, greedy, namespace=ns, modules=rendered.modules, module_repair="full")
    ref_rid = off.add_request(rendered.token_ids, greedy)
    assert on.run_until_done([rid])[0].token_ids == off.run_until_done([ref_rid])[0].token_ids
    on.check_integrity()
