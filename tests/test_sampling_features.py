"""n > 1 samples of one prompt, logprobs, logit_bias, penalties and min_p (tiny random-weight model, float32).

n > 1 computes the prompt once: sample 0 prefills it, the other samples fork from its blocks (a partial last
block is copied) and decode on their own; the engine's computed-prompt-token counter proves it.
"""

from __future__ import annotations

import torch
from conftest import tiny_engine

from promptstash.engine.sampling import SamplerState, SamplingParams, sample

PROMPT = list(range(3, 40))  # 37 tokens: two full blocks of 16 and a partial one


def test_n_samples_compute_the_prompt_once_and_greedy_samples_equal_n1() -> None:
    engine = tiny_engine(block_size=16)
    single = engine.generate(PROMPT, max_tokens=12, ignore_eos=True)
    before = engine.stats().num_computed_prompt_tokens
    fresh = tiny_engine(block_size=16)
    group = fresh.generate(PROMPT, max_tokens=12, ignore_eos=True, n=4)
    assert fresh.stats().num_computed_prompt_tokens == len(PROMPT) == before
    assert len(group.samples) == 4
    assert [c.index for c in group.samples] == [0, 1, 2, 3]
    for c in group.samples:
        assert c.token_ids == single.token_ids  # forked K/V (shared blocks + copied partial block) is exact
    assert group.usage.prompt_tokens == len(PROMPT)
    assert group.usage.completion_tokens == 4 * 12
    fresh.check_integrity()
    assert fresh.cache.stats().usage.num_in_use == 0


def test_n_samples_with_a_seed_are_reproducible_and_differ_from_each_other() -> None:
    engine = tiny_engine()
    a = engine.generate(PROMPT, max_tokens=10, ignore_eos=True, n=3, temperature=1.5, seed=7)
    b = engine.generate(PROMPT, max_tokens=10, ignore_eos=True, n=3, temperature=1.5, seed=7)
    assert [c.token_ids for c in a.samples] == [c.token_ids for c in b.samples]
    assert len({c.token_ids for c in a.samples}) > 1


def test_aborting_a_group_finishes_every_sample_and_frees_its_blocks() -> None:
    engine = tiny_engine()
    rid = engine.add_request(PROMPT, SamplingParams(max_tokens=50, ignore_eos=True, n=3))
    for _ in range(4):
        engine.step()
    assert engine.unfinished_ids() == {rid}
    engine.abort(rid)
    assert not engine.has_unfinished()
    completion = engine.completion(rid)
    assert completion.finish_reason == "abort" and len(completion.samples) == 3
    engine.check_integrity()
    assert engine.cache.stats().usage.num_in_use == 0


def test_updates_of_a_group_carry_sample_indexes_and_finish_once() -> None:
    engine = tiny_engine()
    updates = []
    engine.generate(PROMPT, max_tokens=5, ignore_eos=True, n=2, on_update=updates.append)
    assert {u.index for u in updates} == {0, 1}
    assert sum(u.finished for u in updates) == 1 and updates[-1].finished
    assert sorted(u.index for u in updates if u.sample_finish_reason) == [0, 1]
    text = {i: "".join(u.new_text for u in updates if u.index == i) for i in (0, 1)}
    assert text[0] == text[1]


def test_logprobs_match_a_recomputation_of_the_whole_sequence() -> None:
    engine = tiny_engine()
    out = engine.generate(PROMPT, max_tokens=8, ignore_eos=True, logprobs=3, temperature=1.0, seed=3)
    assert out.logprobs is not None and len(out.logprobs) == 8
    full = list(PROMPT) + list(out.token_ids[:-1])
    reference = tiny_engine(enable_prefix_caching=False).prompt_logits(full)
    logprobs = torch.log_softmax(reference.logits.float(), dim=-1)[len(PROMPT) - 1:]
    for i, entry in enumerate(out.logprobs):
        assert entry.token_id == out.token_ids[i]
        assert abs(entry.logprob - float(logprobs[i, entry.token_id])) < 1e-4
        assert len(entry.top) == 3
        top_ids = torch.topk(logprobs[i], 3).indices.tolist()
        assert [t for t, _ in entry.top] == top_ids
        assert entry.top[0][1] >= entry.top[1][1] >= entry.top[2][1]


def test_logit_bias_forces_and_bans_tokens() -> None:
    engine = tiny_engine()
    forced = engine.generate(PROMPT, max_tokens=5, ignore_eos=True, logit_bias=((42, 100.0),))
    assert set(forced.token_ids) == {42}
    free = engine.generate(PROMPT, max_tokens=5, ignore_eos=True)
    banned = engine.generate(PROMPT, max_tokens=5, ignore_eos=True, logit_bias=((free.token_ids[0], -100.0),))
    assert banned.token_ids[0] != free.token_ids[0]


def test_penalties_change_the_logits_as_documented() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    state = SamplerState(params, prompt_ids=[2])
    state.note(0)
    state.note(0)
    state.note(1)
    out = state.process(logits, None)
    # token 0: 2 - (0.25*2 + 0.5) = 1.0 then /2 (positive) = 0.5; token 1: -1 - 0.75 = -1.75 then *2 = -3.5
    # token 2 (prompt only): 0.5 / 2 = 0.25; token 3 untouched
    assert torch.allclose(out, torch.tensor([0.5, -3.5, 0.25, 3.0]))
    assert torch.equal(logits, torch.tensor([2.0, -1.0, 0.5, 3.0]))  # the model's logits are not changed


def test_grammar_mask_and_min_p_restrict_the_choice() -> None:
    logits = torch.tensor([1.0, 5.0, 4.9, 0.0])
    allowed = torch.tensor([True, False, True, True])
    state = SamplerState(SamplingParams(), prompt_ids=[])
    assert sample(state.process(logits, allowed), SamplingParams(), None) == 2
    params = SamplingParams(temperature=1.0, min_p=1.0, seed=1)
    gen = torch.Generator().manual_seed(0)
    assert {sample(logits, params, gen) for _ in range(20)} == {1}  # min_p=1 keeps only the top token


def test_penalised_generation_differs_from_plain_greedy_and_avoids_repeats() -> None:
    engine = tiny_engine()
    plain = engine.generate(PROMPT, max_tokens=16, ignore_eos=True)
    penalised = engine.generate(PROMPT, max_tokens=16, ignore_eos=True, presence_penalty=2.0,
                                frequency_penalty=2.0, logit_bias=tuple((t, -5.0) for t in set(plain.token_ids)))
    assert penalised.token_ids != plain.token_ids


def test_token_bytes_rebuild_the_exact_text_even_inside_multibyte_characters() -> None:
    from real_model_helpers import default_model_dir  # noqa: PLC0415

    from promptstash.models.tokenizer import Tokenizer  # noqa: PLC0415

    tokenizer = Tokenizer.from_dir(default_model_dir())
    text = "héllo wörld 日本語 🙂 <tool_call> tab\there"
    ids = tokenizer.encode(text)
    assert b"".join(tokenizer.token_bytes(i) for i in ids).decode() == text
