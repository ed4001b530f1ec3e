"""Sampling parameters: greedy, temperature, top-k, top-p, seed, stop strings / ids, max_tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_engine

from promptstash.engine.request import StopChecker
from promptstash.engine.sampling import SamplingParams, sample
from promptstash.errors import InvalidRequestError

PROMPT = list(range(10, 60))


def test_same_seed_gives_same_sample_and_other_seeds_differ() -> None:
    engine = tiny_engine()
    a = engine.generate(PROMPT, max_tokens=20, temperature=1.0, seed=7, ignore_eos=True)
    b = engine.generate(PROMPT, max_tokens=20, temperature=1.0, seed=7, ignore_eos=True)
    c = engine.generate(PROMPT, max_tokens=20, temperature=1.0, seed=8, ignore_eos=True)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_top_k_one_and_tiny_top_p_equal_greedy() -> None:
    engine = tiny_engine()
    greedy = engine.generate(PROMPT, max_tokens=12, ignore_eos=True).token_ids
    assert engine.generate(PROMPT, max_tokens=12, temperature=1.0, top_k=1, seed=1, ignore_eos=True).token_ids == greedy
    assert engine.generate(PROMPT, max_tokens=12, temperature=1.0, top_p=1e-6, seed=1,
                           ignore_eos=True).token_ids == greedy


def test_top_k_only_samples_among_the_k_most_likely() -> None:
    logits = torch.tensor([0.0, 5.0, 4.0, 1.0, 3.0])
    gen = torch.Generator().manual_seed(0)
    picks = {sample(logits, SamplingParams(temperature=2.0, top_k=2), gen) for _ in range(200)}
    assert picks == {1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    picks = {sample(logits, SamplingParams(temperature=1.0, top_p=0.75), gen) for _ in range(300)}
    assert picks == {0, 1}


def test_stop_token_id_ends_generation_with_reason_stop() -> None:
    engine = tiny_engine()
    free = engine.generate(PROMPT, max_tokens=10, ignore_eos=True)
    stop_at = free.token_ids[3]
    out = engine.generate(PROMPT, max_tokens=10, stop_token_ids=[stop_at], ignore_eos=True)
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[: free.token_ids.index(stop_at) + 1]


def test_max_tokens_limits_output_and_zero_only_warms_the_cache() -> None:
    engine = tiny_engine()
    out = engine.generate(PROMPT, max_tokens=5, ignore_eos=True)
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    warm = engine.generate(list(range(100, 180)), max_tokens=0)
    assert warm.token_ids == () and warm.finish_reason == "length"
    assert engine.generate(list(range(100, 180)) + [1], max_tokens=1).usage.cached_tokens == 80


class _ListDecoder:
    def __init__(self, pieces: dict[int, str]) -> None:
        self.pieces = pieces

    def push(self, token_id: int) -> str:
        return self.pieces[token_id]


def test_stop_string_cuts_text_even_across_tokens_and_never_streams_it() -> None:
    checker = StopChecker(_ListDecoder({1: "Hello", 2: " wor", 3: "ld E", 4: "ND", 5: "!"}), ("END",))
    streamed = ""
    for token in (1, 2, 3):
        assert not checker.push(token)
        streamed += checker.take(final=False)
    assert checker.push(4)
    streamed += checker.take(final=True)
    assert streamed == checker.text == "Hello world "


def test_invalid_sampling_values_are_rejected_with_the_limit() -> None:
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
    with pytest.raises(InvalidRequestError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(top_p=0.0)
    with pytest.raises(InvalidRequestError, match="temperature"):
        SamplingParams(temperature=-0.5)
    with pytest.raises(InvalidRequestError, match="top_k"):
        SamplingParams(top_k=-3)
