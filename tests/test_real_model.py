"""Every reuse path on the real default model (Qwen2.5-Coder-0.5B-Instruct, converted from its GGUF)."""

from __future__ import annotations

import pytest

from promptstash.config import EngineConfig

pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.timeout(600)]  # up to ~100 s each here

from real_model_helpers import SYSTEM, engines  # noqa: E402

DEFAULT_DTYPE = str(EngineConfig().torch_dtype).removeprefix("torch.")
DTYPES = sorted({"float32", DEFAULT_DTYPE, "bfloat16"})


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_default_model_answers_a_chat_prompt() -> None:
    on, _ = engines(DEFAULT_DTYPE)
    out = on.generate([{"role": "user", "content": "What is the capital of France?"}], max_tokens=30)
    assert out.text.strip() == "The capital of France is Paris."
    assert out.finish_reason == "stop"


@pytest.mark.parametrize("dtype", DTYPES)
def test_shared_system_prompt_is_reused_and_greedy_output_is_unchanged(dtype: str) -> None:
    on, off = engines(dtype)
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Review: def add(a,b): return a+b"}]
    second = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What does rule 7 say?"}]
    shared = _common_prefix_len(on.tokenize(first), on.tokenize(second))
    assert shared >= 1000

    on.generate(first, max_tokens=8, namespace=f"sys-{dtype}")
    hit = on.generate(second, max_tokens=40, namespace=f"sys-{dtype}")
    ref = off.generate(second, max_tokens=40)

    assert hit.usage.cached_tokens >= 0.9 * shared
    assert ref.usage.cached_tokens == 0
    assert hit.token_ids == ref.token_ids, f"{dtype}: cached {hit.text!r} vs recomputed {ref.text!r}"


def test_suffix_logits_after_a_hit_equal_full_prefill_in_float32() -> None:
    on, off = engines("float32")
    prompt = on.tokenize([{"role": "system", "content": SYSTEM[:1500]}, {"role": "user", "content": "Hello"}])
    on.generate(prompt[:-7] + [13] * 7, max_tokens=0, namespace="logits")
    hit = on.prompt_logits(prompt, namespace="logits")
    full = off.prompt_logits(prompt)
    assert hit.num_cached_tokens >= len(prompt) - 7 - 16
    diff = (hit.logits - full.logits[hit.num_cached_tokens:]).abs().max().item()
    assert diff <= 1e-4


def test_multi_turn_chat_reuses_the_previous_turns() -> None:
    on, off = engines(DEFAULT_DTYPE)
    messages = [{"role": "system", "content": SYSTEM[:2000]}, {"role": "user", "content": "Name a sorting algorithm."}]
    turn1 = on.generate(messages, max_tokens=24, namespace="chat")
    messages += [{"role": "assistant", "content": turn1.text}, {"role": "user", "content": "Its complexity?"}]
    turn2 = on.generate(messages, max_tokens=24, namespace="chat")
    assert turn2.usage.cached_tokens >= turn1.usage.prompt_tokens - 16
    assert turn2.token_ids == off.generate(messages, max_tokens=24).token_ids


def test_concurrent_requests_compute_a_shared_prefix_once_on_the_real_model() -> None:
    on, off = engines(DEFAULT_DTYPE)
    questions = ["What is rule 3?", "Summarize rule 12.", "Is rule 40 strict?", "Which rule covers tests?"]
    prompts = [on.tokenize([{"role": "system", "content": SYSTEM[:2500]}, {"role": "user", "content": q}])
               for q in questions]
    shared = min(_common_prefix_len(prompts[0], p) for p in prompts[1:])
    before = on.stats().num_computed_prompt_tokens
    outs = on.generate_many(prompts, max_tokens=12, namespace="concurrent")
    computed = on.stats().num_computed_prompt_tokens - before
    total = sum(len(p) for p in prompts)
    assert computed <= total - (len(prompts) - 1) * (shared - 16)  # the shared prefix was computed once
    for out in outs[1:]:
        assert out.usage.cached_tokens >= shared - 16
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == off.generate(prompt, max_tokens=12).token_ids
    on.check_integrity()
