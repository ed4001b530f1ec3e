"""A cache hit must give the same logits (fp32, 1e-4) and the same greedy tokens as recomputing."""

from __future__ import annotations

import pytest
import torch
from conftest import LOGIT_TOLERANCE, WEIGHT_FORMATS, tiny_engine

from promptstash.cache.eviction import EVICTION_POLICIES

BLOCK = 16


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("weights", WEIGHT_FORMATS)
@pytest.mark.parametrize("prefix_len", [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 5 * BLOCK + 3, 9 * BLOCK])
def test_suffix_logits_after_cache_hit_equal_full_prefill(family: str, prefix_len: int, weights: str) -> None:
    prefix = _tokens(prefix_len, 10)
    warm, probe = prefix + _tokens(20, 11), prefix + _tokens(23, 12)
    cached = tiny_engine(family, weights, block_size=BLOCK)
    uncached = tiny_engine(family, weights, block_size=BLOCK, enable_prefix_caching=False)

    cached.generate(warm, max_tokens=3)
    hit = cached.prompt_logits(probe)
    full = uncached.prompt_logits(probe)

    assert hit.num_cached_tokens == (prefix_len // BLOCK) * BLOCK
    assert full.num_cached_tokens == 0
    scale = 1.0 if weights == "float32" else full.logits.abs().max().item()
    assert (hit.logits - full.logits[hit.num_cached_tokens:]).abs().max().item() <= LOGIT_TOLERANCE[weights] * scale


@pytest.mark.parametrize("weights", WEIGHT_FORMATS)
@pytest.mark.parametrize("prefix_len", [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 7 * BLOCK + 5])
def test_greedy_output_after_cache_hit_equals_uncached(family: str, prefix_len: int, weights: str) -> None:
    prefix = _tokens(prefix_len, 20)
    cached = tiny_engine(family, weights, block_size=BLOCK)
    uncached = tiny_engine(family, weights, block_size=BLOCK, enable_prefix_caching=False)
    cached.generate(prefix + _tokens(9, 21), max_tokens=4)
    prompt = prefix + _tokens(13, 22)
    hit = cached.generate(prompt, max_tokens=30, ignore_eos=True)
    ref = uncached.generate(prompt, max_tokens=30, ignore_eos=True)
    assert hit.usage.cached_tokens == (prefix_len // BLOCK) * BLOCK
    assert ref.usage.cached_tokens == 0
    assert hit.token_ids == ref.token_ids


def test_whole_prompt_cached_still_computes_last_token() -> None:
    engine = tiny_engine(block_size=BLOCK)
    prompt = _tokens(4 * BLOCK, 30)  # exactly 4 full blocks
    first = engine.generate(prompt, max_tokens=5, ignore_eos=True)
    again = engine.generate(prompt, max_tokens=5, ignore_eos=True)
    assert again.usage.cached_tokens == 3 * BLOCK  # capped at prompt_len - 1, then block-aligned
    assert again.token_ids == first.token_ids


def test_generated_blocks_are_reused_by_a_follow_up_turn() -> None:
    engine = tiny_engine(block_size=BLOCK)
    prompt = _tokens(2 * BLOCK + 5, 31)
    first = engine.generate(prompt, max_tokens=40, ignore_eos=True)
    follow_up = prompt + list(first.token_ids) + _tokens(7, 32)
    second = engine.generate(follow_up, max_tokens=2)
    computed_before_last = len(prompt) + len(first.token_ids) - 1  # the last sampled token has no K/V
    assert second.usage.cached_tokens == (computed_before_last // BLOCK) * BLOCK


def test_caching_off_never_reports_hits() -> None:
    engine = tiny_engine(block_size=BLOCK, enable_prefix_caching=False)
    prompt = _tokens(100, 33)
    engine.generate(prompt, max_tokens=2)
    assert engine.generate(prompt, max_tokens=2).usage.cached_tokens == 0
    assert engine.stats().cache.num_published_blocks == 0


@pytest.mark.parametrize("eviction", EVICTION_POLICIES)
def test_suffix_logits_after_a_partial_hit_in_a_churned_pool_equal_full_prefill(eviction: str) -> None:
    """Under every eviction policy: whatever part of a prefix survives other requests' churn is reused
    exactly (fp32 logits within 1e-4 of recomputing)."""
    pool = dict(block_size=BLOCK, kv_cache_tokens=12 * BLOCK, max_prefill_tokens=4 * BLOCK)
    cached = tiny_engine("qwen2", eviction=eviction, ttft_slo_ms=1.0, **pool)
    uncached = tiny_engine("qwen2", enable_prefix_caching=False, **pool)
    prefix = _tokens(8 * BLOCK, 40)
    cached.generate(prefix + _tokens(5, 41), max_tokens=2)
    for seed in range(2):  # other requests take part of the pool
        cached.generate(_tokens(3 * BLOCK, 50 + seed), max_tokens=2)
    probe = prefix + _tokens(7, 42)
    hit = cached.prompt_logits(probe)
    full = uncached.prompt_logits(probe)
    assert cached.stats().cache.num_evictions > 0
    assert hit.num_cached_tokens % BLOCK == 0 and hit.num_cached_tokens > 0
    assert (hit.logits - full.logits[hit.num_cached_tokens:]).abs().max().item() <= LOGIT_TOLERANCE["float32"]
    cached.check_integrity()
