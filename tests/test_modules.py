"""Modules: K/V computed once in isolation and reused at any position (engine/assembly.py), float32.

The reference for `none` and `legolink` is written here from the definitions, on the model alone: each
module computed alone at its own position, then every other row (and what legolink recomputes) in one pass
that attends to everything before it. The engine instead stores modules at position 0 and moves their keys,
so agreement also proves that moving keys composes (within 1e-4).
"""

from __future__ import annotations

import pytest
import torch
from conftest import our_model, tiny_hf_model
from redis_helpers import RedisServer

from promptstash.cache.modules import ModuleRegistry, ModuleRepair, ModuleSpan
from promptstash.config import EngineConfig
from promptstash.engine.engine import Engine
from promptstash.engine.sampling import SamplingParams
from promptstash.errors import ContextLengthError, InvalidRequestError
from promptstash.models.llama import KVCache, LlamaModel, SeqAttention, StepBatch

pytestmark = pytest.mark.timeout(120)


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PRE, A, B, Q = tokens(1, 21), tokens(2, 40), tokens(3, 37), tokens(4, 9)


def layout(*parts: tuple[list[int], bool]) -> tuple[list[int], tuple[ModuleSpan, ...]]:
    """Concatenate (tokens, is_module) parts into a prompt and its module spans."""
    ids: list[int] = []
    spans = []
    for part, is_module in parts:
        if is_module:
            spans.append(ModuleSpan(len(ids), len(ids) + len(part)))
        ids.extend(part)
    return ids, tuple(spans)


def engine_for(model: LlamaModel, **options) -> Engine:
    options.setdefault("kv_cache_tokens", 2048)
    options.setdefault("max_prefill_tokens", 64)
    return Engine(model, None, EngineConfig(dtype="float32", **options), model_id="tiny@modules")


def reference_logits(model: LlamaModel, ids: list[int], spans: tuple[ModuleSpan, ...], link_tokens: int = 0
                     ) -> tuple[torch.Tensor, list[int]]:
    """Logits of the non-module rows: modules computed alone at their positions, then the rest in context."""
    n = len(ids)
    kv = KVCache(model.config, 1, n, model.dtype, model.device)
    for s in spans:
        slots = torch.arange(s.start, s.end)
        model.forward(StepBatch(torch.tensor(ids[s.start:s.end]), slots, slots,
                                (SeqAttention(0, s.num_tokens, slots, s.start, None, causal=True),),
                                torch.tensor([s.num_tokens - 1])), kv)
    skip = {p for s in spans for p in range(s.start + min(link_tokens, s.num_tokens), s.end)}
    rows = [p for p in range(n) if p not in skip]
    text_rows = [i for i, p in enumerate(rows) if not any(s.start <= p < s.end for s in spans)]
    pos = torch.tensor(rows)
    mask = torch.arange(n)[None, :] <= pos[:, None]
    batch = StepBatch(torch.tensor([ids[p] for p in rows]), pos, pos,
                      (SeqAttention(0, len(rows), torch.arange(n), 0, mask),), torch.tensor(text_rows))
    return model.forward(batch, kv), [rows[i] for i in text_rows]


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def model(request) -> LlamaModel:
    return our_model(tiny_hf_model(request.param))  # llama: Llama 3 RoPE scaling; qwen2: q/k/v bias


def run_logits(engine: Engine, ids, spans, repair: str):
    return engine.prompt_logits(ids, modules=spans, module_repair=repair)


def test_a_module_stored_at_0_and_filled_at_p_matches_it_computed_alone_at_p(model) -> None:
    engine = engine_for(model)
    ids, spans = layout((PRE, False), (A, True), (Q, False))
    engine.prompt_logits(ids, modules=spans, module_repair="none")  # computes A alone and stores it
    stored = [engine.cache.index.get(h) for h in engine.cache.module_hashes(A, "default")]
    assert all(b is not None for b in stored)
    bs = engine.cache.block_size
    slots = torch.tensor([stored[i // bs] * bs + i % bs for i in range(len(A))])
    kv_at = {}
    for start in (0, 21, 333):
        kv = KVCache(model.config, 1, len(A), model.dtype, model.device)
        s = torch.arange(len(A))
        model.forward(StepBatch(torch.tensor(A), s + start, s, (SeqAttention(0, len(A), s, 0, None, causal=True),),
                                torch.tensor([len(A) - 1])), kv)
        kv_at[start] = kv
    torch.testing.assert_close(engine.kv.k[:, slots], kv_at[0].k, atol=1e-5, rtol=0)  # stored from position 0
    torch.testing.assert_close(engine.kv.v[:, slots], kv_at[0].v, atol=1e-5, rtol=0)
    for p in (21, 333):  # every layer's keys and values, moved to p, match the module computed alone at p
        torch.testing.assert_close(model.move_keys(engine.kv.k[:, slots], p), kv_at[p].k, atol=1e-4, rtol=0)
        torch.testing.assert_close(engine.kv.v[:, slots], kv_at[p].v, atol=1e-4, rtol=0)


@pytest.mark.parametrize("repair,link", [("none", 0), ("legolink:8", 8), ("legolink:64", 64)])
def test_assembled_logits_match_the_definition_on_a_miss_and_on_a_hit_in_another_order(model, repair, link) -> None:
    engine = engine_for(model)
    first_ids, first_spans = layout((PRE, False), (A, True), ([5, 6], False), (B, True), (Q, False))
    again_ids, again_spans = layout((PRE, False), (B, True), ([7], False), (A, True), (Q, False))
    for ids, spans, hits in ((first_ids, first_spans, 0), (again_ids, again_spans, 2)):
        out = run_logits(engine, ids, spans, repair)
        ref, ref_rows = reference_logits(model, ids, spans, link)
        prefix_len = out.usage.prefix_cached_tokens
        assert out.positions.tolist() == [p for p in ref_rows if p >= prefix_len]
        torch.testing.assert_close(out.logits, ref[len(ref_rows) - len(out.positions):], atol=1e-4, rtol=0)
        assert out.usage.num_modules == 2 and out.usage.num_module_hits == hits
    assert out.usage.module_cached_tokens == len(A) + len(B) - min(link, len(A)) - min(link, len(B))
    assert out.usage.recomputed_tokens == min(link, len(A)) + min(link, len(B))
    engine.check_integrity()


def test_full_equals_caching_off_on_the_same_tokens(model) -> None:
    engine = engine_for(model)
    ids, spans = layout((PRE, False), (A, True), ([5], False), (B, True), (Q, False))
    engine.generate(ids, max_tokens=1)  # warm the exact prefix too: full may reuse it, exactly
    engine.prompt_logits(ids, modules=spans, module_repair="none")
    off = engine_for(model, enable_prefix_caching=False)
    ref = off.prompt_logits(ids)
    full = engine.prompt_logits(ids + [9], modules=spans, module_repair="full")
    torch.testing.assert_close(full.logits, off.prompt_logits(ids + [9]).logits[full.num_cached_tokens:],
                               atol=1e-4, rtol=0)
    assert full.usage.module_cached_tokens == 0 and full.usage.module_repair == "full"
    greedy = SamplingParams(max_tokens=12, temperature=0)
    rid = engine.add_request(ids, greedy, modules=spans, module_repair="full")
    cached = engine.run_until_done([rid])[0]
    assert cached.token_ids == off.run_until_done([off.add_request(ids, greedy)])[0].token_ids
    assert ref.num_cached_tokens == 0


def test_cacheblend_recomputes_its_fraction_and_stays_close_to_full(model) -> None:
    engine = engine_for(model)
    ids, spans = layout((PRE, False), (A, True), ([5], False), (B, True), (Q, False))
    engine.prompt_logits(ids, modules=spans, module_repair="none")
    full = engine_for(model, enable_prefix_caching=False).prompt_logits(ids).logits[-len(Q):]
    errors = {}
    for repair in ("none", "cacheblend:0.3", "cacheblend:1"):
        out = engine.prompt_logits(ids, modules=spans, module_repair=repair)
        assert out.usage.num_module_hits == 2
        fraction = ModuleRepair.parse(repair).blend_fraction if repair != "none" else 0.0
        expect = sum(-(-int(s.num_tokens) * fraction // 1) for s in spans) if fraction else 0
        assert abs(out.usage.recomputed_tokens - expect) <= 2  # rounded per pass
        errors[repair] = (out.logits[-len(Q):] - full).abs().max().item()
    assert errors["cacheblend:1"] < 1e-4  # recomputing every module token is a full pass
    assert errors["cacheblend:0.3"] <= errors["none"] + 1e-6


def test_a_module_used_twice_at_the_start_and_after_the_question(model) -> None:
    engine = engine_for(model)
    ids, spans = layout((A, True), (Q, False), (A, True), ([5, 6, 7], False))
    out = run_logits(engine, ids, spans, "none")
    assert out.usage.num_modules == 2 and out.usage.num_module_hits == 1  # the second use hits the first
    ref, rows = reference_logits(model, ids, spans)
    torch.testing.assert_close(out.logits, ref, atol=1e-4, rtol=0)
    assert out.positions.tolist() == rows
    assert engine.stats().modules.num_stored == 1


def test_a_multi_turn_chat_reuses_its_exact_prefix_and_its_modules(tmp_path) -> None:
    from test_tokenizer import build_tokenizer_dir  # a small BPE tokenizer with a ChatML template

    from promptstash.models.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(build_tokenizer_dir(tmp_path / "tok"))
    model = our_model(tiny_hf_model("qwen2", vocab_size=max(256, tokenizer.vocab_size)))
    engine = Engine(model, tokenizer, EngineConfig(dtype="float32", kv_cache_tokens=4096, max_prefill_tokens=64),
                    model_id="tiny@chat")
    doc = "hello world def add(a, b): return a + b " * 4
    turn1 = [{"role": "system", "content": "Answer briefly."},
             {"role": "user", "content": [{"type": "text", "text": doc, "module": True},
                                          {"type": "text", "text": "What is the capital?"}]}]
    first = engine.generate(turn1, max_tokens=4, temperature=0, module_repair="legolink:4")
    turn2 = turn1 + [{"role": "assistant", "content": first.text},
                     {"role": "user", "content": [{"type": "text", "text": "And again:"},
                                                  {"type": "text", "text": doc, "module": True}]}]
    second = engine.generate(turn2, max_tokens=4, temperature=0, module_repair="legolink:4")
    assert first.usage.num_modules == 1 and first.usage.num_module_hits == 0
    assert second.usage.num_modules == 2 and second.usage.num_module_hits == 2
    assert second.usage.prefix_cached_tokens > 0  # the system prompt, exactly
    assert second.usage.module_cached_tokens == 2 * (len(tokenizer.encode(doc)) - 4)
    engine.check_integrity()


def test_requests_without_modules_are_unchanged_by_module_reuse(model) -> None:
    engine = engine_for(model)
    ids, spans = layout((PRE, False), (A, True), (Q, False))
    engine.prompt_logits(ids, modules=spans, module_repair="none")
    plain = engine.prompt_logits(ids)  # the same tokens, no modules: exact, nothing approximate reused
    off = engine_for(model, enable_prefix_caching=False).prompt_logits(ids)
    torch.testing.assert_close(plain.logits, off.logits[plain.num_cached_tokens:], atol=1e-4, rtol=0)
    assert plain.num_cached_tokens == 16  # only PRE's full block: the assembled blocks were never published


def test_registered_module_is_used_by_id_and_never_by_another_namespace(model) -> None:
    engine = engine_for(model)
    stored = engine.register_module  # needs a tokenizer: register through token-level API instead
    del stored
    _, ids, spans = engine.modules.put("alice", "doc", tuple(A)), A, (ModuleSpan(0, len(A), "m1"),)
    rid = engine.add_request(list(ids), SamplingParams(max_tokens=0), namespace="alice", modules=spans,
                             module_repair="none")
    assert engine.run_until_done([rid])[0].finish_reason == "length"
    prompt, spans = layout((PRE, False), (A, True), (Q, False))
    alice = engine.prompt_logits(prompt, namespace="alice", modules=spans, module_repair="none")
    bob = engine.prompt_logits(prompt, namespace="bob", modules=spans, module_repair="none")
    assert alice.usage.num_module_hits == 1 and bob.usage.num_module_hits == 0
    with pytest.raises(InvalidRequestError, match="unknown module id"):
        engine._resolve_module("bob", engine.modules.list("alice")[0].module_id)


def test_modules_come_back_from_disk_and_redis_after_a_restart_with_identical_results(model, tmp_path) -> None:
    redis = RedisServer(tmp_path / "redis")
    try:
        ids, spans = layout((PRE, False), (A, True), ([5], False), (B, True), (Q, False))
        other, other_spans = layout((Q, False), (B, True), (A, True), ([8, 9], False))
        first = engine_for(model, kv_disk_dir=str(tmp_path / "disk"), redis_url=redis.url)
        first.prompt_logits(other, modules=other_spans, module_repair="legolink:4")  # stores A and B
        in_pool = first.prompt_logits(ids, modules=spans, module_repair="legolink:4")
        assert in_pool.usage.num_module_hits == 2
        first.flush_tiers()
        first.close()
        for tiers in ({"kv_disk_dir": str(tmp_path / "disk")}, {"redis_url": redis.url}):
            restarted = engine_for(model, **tiers)
            out = restarted.prompt_logits(ids, modules=spans, module_repair="legolink:4")
            assert out.usage.num_module_hits == 2 and restarted.stats().modules.num_tier_hits == 2
            assert out.usage.module_cached_tokens == in_pool.usage.module_cached_tokens
            n = len(out.positions)  # the restart also loads PRE's exact prefix block: compare the rows both have
            assert out.positions.tolist() == in_pool.positions[-n:].tolist()
            torch.testing.assert_close(out.logits, in_pool.logits[-n:], atol=1e-5, rtol=0)
            tenant = restarted.prompt_logits(ids, namespace="other-tenant", modules=spans, module_repair="legolink:4")
            assert tenant.usage.num_module_hits == 0  # another tenant never loads them, from any tier
            restarted.close()
    finally:
        redis.stop()


def test_bad_module_input_is_a_clear_error_and_the_engine_stays_usable(model) -> None:
    engine = engine_for(model, kv_cache_tokens=512, max_model_len=400)
    ids, spans = layout((PRE, False), (A, True), (Q, False))
    with pytest.raises(InvalidRequestError, match="module_repair"):
        engine.add_request(ids, modules=spans, module_repair="magic")
    with pytest.raises(InvalidRequestError, match="may not end the prompt"):
        engine.add_request(PRE + A, SamplingParams(max_tokens=4), modules=(ModuleSpan(21, 61),))
    with pytest.raises(InvalidRequestError, match="overlaps"):
        engine.add_request(ids, modules=(ModuleSpan(21, 61), ModuleSpan(30, 40)))
    with pytest.raises(ContextLengthError, match="context window"):
        engine.check_module_len(401)
    many = tokens(9, 300)
    with pytest.raises(ContextLengthError, match="pool"):  # modules' own blocks would not fit the pool
        engine.add_request(many + [1], SamplingParams(max_tokens=4), modules=(ModuleSpan(0, 300),))
    with pytest.raises(InvalidRequestError, match="only text parts can be modules"):
        engine.render([{"role": "user", "content": [{"type": "image", "module": True}]}])
    with pytest.raises(InvalidRequestError, match="'module' must be true or false"):
        engine.render([{"role": "user", "content": [{"type": "text", "text": "x", "module": "yes"}]}])
    with pytest.raises(InvalidRequestError):
        ModuleRegistry.check_id("bad id with spaces")
    out = engine.prompt_logits(ids, modules=spans, module_repair="none")
    assert out.usage.num_modules == 1
    engine.check_integrity()


def test_a_module_longer_than_a_prefill_chunk_is_encoded_in_several_chunks(model) -> None:
    engine = engine_for(model, max_prefill_tokens=32)
    long = tokens(7, 150)
    ids, spans = layout((PRE, False), (long, True), (Q, False), (A, True), ([4, 4], False))
    first = run_logits(engine, ids, spans, "legolink:8")
    ref, rows = reference_logits(model, ids, spans, 8)
    torch.testing.assert_close(first.logits, ref[-len(first.positions):], atol=1e-4, rtol=0)
    again = run_logits(engine, ids, spans, "legolink:8")
    n = len(again.positions)  # the second request also reuses PRE's exact prefix block
    torch.testing.assert_close(again.logits, first.logits[-n:], atol=1e-4, rtol=0)
    assert again.usage.num_module_hits == 2 and first.usage.num_module_hits == 0


def test_concurrent_requests_sharing_modules_under_a_small_pool_finish_and_leak_nothing(model) -> None:
    engine = engine_for(model, kv_cache_tokens=640, max_num_seqs=4, max_prefill_tokens=32)
    docs = [tokens(20 + i, 30 + 7 * i) for i in range(4)]
    rng = torch.Generator().manual_seed(5)
    rids = []
    for i in range(12):
        order = torch.randperm(4, generator=rng).tolist()[:2 + i % 3]
        ids, spans = layout((PRE, False), *[(docs[j], True) for j in order], (tokens(100 + i, 5), False))
        repair = ("none", "legolink:4", "cacheblend:0.2", "full")[i % 4]
        rids.append(engine.add_request(ids, SamplingParams(max_tokens=3, temperature=0), modules=spans,
                                       module_repair=repair))
    done = engine.run_until_done(rids)
    assert all(c.finish_reason == "length" for c in done), [c.error for c in done]
    assert engine.stats().modules.num_hits > 0
    engine.check_integrity()
    assert engine.cache.pool.usage().num_in_use == 0  # nothing held once every request has finished
