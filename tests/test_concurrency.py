"""Continuous batching: requests submitted together share the computation of a common prefix."""

from __future__ import annotations

import pytest
import torch
from conftest import WEIGHT_FORMATS, tiny_engine

from promptstash.engine.sampling import SamplingParams


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("weights", WEIGHT_FORMATS)
def test_eight_concurrent_requests_compute_a_shared_2000_token_prefix_once(weights: str) -> None:
    prefix_len, suffix_len, num_requests = 2000, 24, 8
    engine = tiny_engine(weights=weights, block_size=16, kv_cache_tokens=8192, max_num_seqs=8, max_prefill_tokens=256)
    prefix = _tokens(prefix_len, 1)
    prompts = [prefix + _tokens(suffix_len, 100 + i) for i in range(num_requests)]
    outs = engine.generate_many(prompts, max_tokens=4, ignore_eos=True)

    stats = engine.stats()
    uncached_tail = prefix_len % 16  # the last partial block of the prefix is never shared
    assert stats.num_computed_prompt_tokens == prefix_len + num_requests * (suffix_len + uncached_tail) - uncached_tail
    assert stats.num_computed_prompt_tokens < prefix_len + num_requests * (suffix_len + 16)
    assert outs[0].usage.cached_tokens == 0
    for out in outs[1:]:
        assert out.usage.cached_tokens == prefix_len - uncached_tail
    engine.check_integrity()

    reference = tiny_engine(weights=weights, block_size=16, kv_cache_tokens=8192, enable_prefix_caching=False)
    for prompt, out in zip(prompts[:3], outs[:3], strict=True):
        assert reference.generate(prompt, max_tokens=4, ignore_eos=True).token_ids == out.token_ids


def test_requests_are_batched_into_shared_decode_steps() -> None:
    engine = tiny_engine(max_num_seqs=4)
    ids = [engine.add_request(_tokens(30, i), SamplingParams(max_tokens=10, ignore_eos=True)) for i in range(4)]
    engine.run_until_done(ids)
    # 4 x 10 tokens one request at a time would take 40+ steps; batched they take ~10 (+ prefill)
    assert engine.stats().num_steps <= 14


def test_preempted_request_resumes_with_identical_output() -> None:
    tight = tiny_engine(block_size=4, kv_cache_tokens=96, max_num_seqs=4, max_prefill_tokens=16)
    roomy = tiny_engine(block_size=4, kv_cache_tokens=4096, enable_prefix_caching=False)
    prompts = [_tokens(20, 50 + i) for i in range(4)]
    outs = tight.generate_many(prompts, max_tokens=12, ignore_eos=True)
    assert tight.stats().num_preemptions > 0
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == roomy.generate(prompt, max_tokens=12, ignore_eos=True).token_ids
    tight.check_integrity()
    assert tight.cache.stats().usage.num_in_use == 0
