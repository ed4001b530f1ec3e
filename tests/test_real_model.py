"""Every reuse path on the real default model (Qwen2.5-Coder-0.5B-Instruct, converted from its GGUF)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.timeout(600)]  # up to ~100 s each here

from real_model_helpers import SYSTEM, engines  # noqa: E402

DEFAULT_DTYPE = "default"  # the weight format and dtype `promptstash serve` picks on this machine
# every weight format the exactness checks run in (greedy tokens identical with caching on and off); float16
# runs them on the tiny models only (tests/conftest.py WEIGHT_FORMATS): CPUs have no fast float16 products
FORMATS = ["float32", "bfloat16", "int8", "int4"]


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


@pytest.mark.parametrize("dtype", FORMATS)
def test_shared_system_prompt_is_reused_and_greedy_output_is_unchanged(dtype: str) -> None:
    on, off = engines(dtype)
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Review: def add(a,b): return a+b"}]
    second = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What does rule 7 say?"}]
    shared = _common_prefix_len(on.tokenize(first), on.tokenize(second))
    assert shared >= 1000

    on.generate(first, max_tokens=8, namespace=f"sys-{dtype}")
    hit = on.generate(second, max_tokens=16, namespace=f"sys-{dtype}")
    ref = off.generate(second, max_tokens=16)

    assert hit.usage.cached_tokens >= 0.9 * shared
    assert ref.usage.cached_tokens == 0
    assert hit.token_ids == ref.token_ids, f"{dtype}: cached {hit.text!r} vs recomputed {ref.text!r}"


# where two computations of the same logits are compared: float32 exactly (1e-4); bfloat16 and the quantized
# formats (whose kernels take bfloat16 activations) to bfloat16 rounding: within 2% of the largest logit
LOGIT_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.02, "int8": 0.02, "int4": 0.02}


@pytest.mark.parametrize("weights", FORMATS)
def test_suffix_logits_after_a_hit_equal_full_prefill(weights: str) -> None:
    on, off = engines(weights)
    prompt = on.tokenize([{"role": "system", "content": SYSTEM[:1500]}, {"role": "user", "content": "Hello"}])
    on.generate(prompt[:-7] + [13] * 7, max_tokens=0, namespace=f"logits-{weights}")
    hit = on.prompt_logits(prompt, namespace=f"logits-{weights}")
    full = off.prompt_logits(prompt)
    assert hit.num_cached_tokens >= len(prompt) - 7 - 16
    diff = (hit.logits - full.logits[hit.num_cached_tokens:]).abs().max().item()
    scale = 1.0 if weights == "float32" else full.logits.abs().max().item()
    assert diff <= LOGIT_TOLERANCE[weights] * scale


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


@pytest.mark.parametrize("weights", ["float32", "default"])
def test_a_request_alone_and_in_a_batch_of_seven_others_gives_the_same_result(weights: str) -> None:
    on, _ = engines(weights)
    topics = ["a linked list", "binary search", "a context manager", "quicksort", "a decorator", "asyncio",
              "a dataclass", "a generator"]
    prompts = [on.tokenize([{"role": "user", "content": f"Explain {t} in one sentence."}]) for t in topics]
    alone = on.generate(prompts[0], max_tokens=16, ignore_eos=True, logprobs=1, namespace=f"alone-{weights}")
    batched = on.generate_many(prompts, max_tokens=16, ignore_eos=True, logprobs=1,
                               namespace=f"batch-{weights}")[0]
    assert batched.usage.cached_tokens == alone.usage.cached_tokens == 0
    assert batched.token_ids == alone.token_ids, f"{batched.text!r} vs {alone.text!r}"
    if on.model.weight_format == "float32":
        assert alone.logprobs is not None and batched.logprobs is not None
        assert max(abs(a.logprob - b.logprob) for a, b in zip(alone.logprobs, batched.logprobs, strict=True)) <= 1e-4


def test_the_default_format_is_quantized_and_reported(  # where torch's quantized kernels run
) -> None:
    on, _ = engines("default")
    from promptstash.models.quant import quantized_kernels_work

    if not quantized_kernels_work("cpu"):
        pytest.skip("torch's int8/int4 kernels do not run on this CPU")
    assert on.model.weight_format in ("int4", "int8")
    assert on.model.weight_bytes < 1e9  # float32 holds 2.5 GB
