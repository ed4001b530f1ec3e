"""The semantic cache: guards, keys, the index and its tier records, and the server contract (opt-in, labels,
tenants, bad input) on a tiny model with a stand-in embedder. The real embedder and model: test_semantic_real.py."""

from __future__ import annotations

import hashlib
import re

import httpx
import numpy as np
import pytest
from server_helpers import LiveServer, tiny_chat_engine

from promptstash.cache.tiers.chain import TierChain
from promptstash.cache.tiers.disk import DiskTier
from promptstash.cache.tiers.entry import CorruptEntryError
from promptstash.cache.tiers.record import decode_record, encode_record
from promptstash.config import ServerConfig
from promptstash.engine.sampling import SamplingParams
from promptstash.prompts import ChatMessage, TextBlock
from promptstash.semantic import DEFAULT_THRESHOLD
from promptstash.semantic.guards import GUARDS, refusal
from promptstash.semantic.store import SemanticIndex, StoredResponse, context_key
from promptstash.server.semantic import HEADER, SemanticCache, SemanticOption, plan_for

# -- guards ----------------------------------------------------------------------------------------------------

NEAR_MISSES = {
    "code": ("What does `map` do?", "What does `filter` do?"),
    "negation": ("Why does my code not compile?", "Why does my code compile?"),
    "number": ("Give me five tips for sleep", "Give me three tips for sleep"),
    "unit": ("How long is 10 seconds?", "How long is 10 minutes?"),
    "comparison": ("Return the largest element of the list", "Return the smallest element of the list"),
    "entity": ("Is Paris the capital of France?", "Is Berlin the capital of France?"),
    "slot": ("Which sort has better time complexity?", "Which sort has better space complexity?"),
}
PARAPHRASES = {
    "code": ("What does `map` do in Python?", "Explain what \"map\" does in python"),
    "negation": ("Why doesn't it compile?", "Why won't it compile?"),
    "number": ("Give me five tips for better sleep", "Can you give me 5 tips for sleeping better?"),
    "unit": ("How many miles are 3 km?", "How many miles is 3 kilometres?"),
    "comparison": ("Which is faster, A or B?", "Between A and B, which one runs faster?"),
    "entity": ("How do I reverse a list in Python?", "What is the way to reverse a python list?"),
    "slot": ("Which algorithm has better time complexity for sorting?",
             "For sorting, which algorithm has the better time complexity?"),
}


def test_guards_are_the_documented_seven():
    assert GUARDS == ("code", "negation", "number", "unit", "comparison", "entity", "slot")
    assert set(NEAR_MISSES) == set(GUARDS) == set(PARAPHRASES)


@pytest.mark.parametrize("guard", GUARDS)
def test_each_guard_refuses_its_near_miss_in_both_directions(guard):
    earlier, later = NEAR_MISSES[guard]
    assert refusal(earlier, later) == guard
    assert refusal(later, earlier) == guard


@pytest.mark.parametrize("guard", GUARDS)
def test_each_guard_accepts_a_paraphrase(guard):
    earlier, later = PARAPHRASES[guard]
    assert refusal(earlier, later) is None
    assert refusal(later, earlier) is None


def test_guards_tolerate_case_punctuation_and_number_spelling():
    assert refusal("explain it in twenty-five words!", "Explain it in 25 words.") is None
    assert refusal("Sort the list", "Please sort the list") is None
    assert refusal("Price in $", "Price in \u20ac") == "unit"
    assert refusal("What happened before the war?", "What happened after the war?") == "comparison"


@pytest.mark.parametrize("earlier, later", [
    ("what are the etiquette norms for doing business in japan?",  # lower case: no entity to see
     "what are the etiquette norms for doing business in brazil?"),
    ("Which sort has better time complexity?", "Which sort has better space complexity?"),
    ("Find the majority element in the array.", "Find the least frequent element in the array."),
    ("Write a poem about the sea. Make it rhyme.", "Write a poem about the desert. Make it rhyme."),
    ("Explain how a binary tree works.", "Explain how a binary search tree works."),  # a content word added
    ("Is x < 10?", "Is x <= 10?"),
])
def test_slot_refuses_a_template_with_another_filler(earlier, later):
    assert refusal(earlier, later) == "slot"
    assert refusal(later, earlier) == "slot"


@pytest.mark.parametrize("earlier, later", [
    # a wide rewording: many hunks, not one template with another filler
    ("Write a persuasive email to convince my introverted friend to volunteer as a guest speaker.",
     "Help me draft an email that persuades a shy friend of mine to agree to be a guest speaker at an event."),
    # function words only
    ("What about when the list is empty?", "And what if the list is empty?"),
    ("Sort the list", "Please sort the list"),
    # spelling variants, inflections and the generic equivalences
    ("Analyze the colour of the responses.", "Analyse the color of the response."),
    ("Rewrite your previous response as a limerick.", "Rephrase your last answer as a limerick."),
])
def test_slot_accepts_rewordings_function_words_and_spelling(earlier, later):
    assert refusal(earlier, later) is None
    assert refusal(later, earlier) is None


@pytest.mark.parametrize("earlier, later", [
    ("Prove the Pythagorean theorem.", "Give a proof of the Pythagorean theorem."),  # sentence-initial word
    ("Analyze these reviews of the Pixel phone.", "Please analyse these reviews of the Pixel phone."),
    ("Compare the antitrust laws in the US and China.", "Compare US and Chinese antitrust laws."),  # China/Chinese
    ("A is the father of B. Who is C?", "B's father is A. Who is C?"),  # possessive
    ("Summarize it. Then Translate it.", "Summarize it and translate it."),  # capitalised, also written lower case
])
def test_entity_ignores_sentence_initial_capitals_spelling_and_inflection(earlier, later):
    # NOTE: some of these reword enough that the slot guard may still refuse them; the entity guard must not.
    assert refusal(earlier, later) != "entity"
    assert refusal(later, earlier) != "entity"


def test_entity_still_refuses_another_name():
    assert refusal("Plan a trip to Hawaii with my kids.", "Plan a family trip to Iceland.") == "entity"
    assert refusal("Tell me about Hawaii.", "Tell me about Iceland.") == "entity"


def test_comparison_ignores_turn_order_words():
    assert refusal("Rewrite your previous response in French.", "Rewrite your last answer in French.") is None
    assert refusal("Read the files under a directory and return the most common words.",
                   "Return the most common words of the files in a directory.") is None
    assert refusal("List the colours from lightest to darkest, ascending.",
                   "List the colours from lightest to darkest, descending.") == "comparison"


def test_guards_are_fast():
    import time

    long_text = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 40)
    pairs = [(long_text, long_text.replace("river", "lake", 1)), *NEAR_MISSES.values(), *PARAPHRASES.values()]
    start = time.perf_counter()
    for _ in range(20):
        for a, b in pairs:
            refusal(a, b)
    per_pair = (time.perf_counter() - start) / (20 * len(pairs))
    assert per_pair < 0.005  # well under 1 ms per pair on an idle core; loose for a shared CI machine


# -- tier records ------------------------------------------------------------------------------------------------

def test_record_round_trips_and_every_damage_is_refused():
    key = b"k" * 16
    data = encode_record("semantic-response", key, b"payload")
    assert decode_record(data, "semantic-response", key) == b"payload"
    flipped = data[:-1] + bytes([data[-1] ^ 1])
    for bad, kind, k in ((flipped, "semantic-response", key), (data[:-2], "semantic-response", key),
                         (data, "other", key), (data, "semantic-response", b"j" * 16), (b"junk", "x", key)):
        with pytest.raises(CorruptEntryError):
            decode_record(bad, kind, k)


# -- keys and the index ------------------------------------------------------------------------------------------

def _unit(seed: int, dim: int = 8) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def _messages(*texts: str) -> list[ChatMessage]:
    return [ChatMessage("system", (TextBlock("be brief"),))] + [ChatMessage("user", (TextBlock(t),)) for t in texts]


def test_context_key_separates_tenant_model_flavour_context_and_sampling():
    base = ("tenant:1:a", "m@1", "openai-chat", ["ctx"], "greedy")
    key = context_key(*base)
    assert key == context_key(*base)
    for i, other in enumerate(("tenant:1:b", "m@2", "anthropic-messages", ["ctx2"], "seed=1")):
        changed = list(base)
        changed[i] = other
        assert context_key(*changed) != key


GREEDY_8 = SamplingParams(max_tokens=8)
OPTED_IN = SemanticOption(True)


def test_plan_keys_earlier_turns_and_sampling_but_not_the_last_message():
    def plan(messages, sampling=GREEDY_8, namespace="tenant:1:a", option=OPTED_IN):
        return plan_for(option, False, tenant="a", namespace=namespace, model_id="m", flavour="f",
                        messages=messages, sampling=sampling)

    a = plan(_messages("How do I sort?"))
    assert a.key is not None and a.query == "How do I sort?" and a.threshold == DEFAULT_THRESHOLD
    assert plan(_messages("Sorting, how?")).key == a.key
    assert plan(_messages("hi", "How do I sort?")).key != a.key  # other history
    assert plan(_messages("How do I sort?"), namespace="tenant:1:b").key != a.key
    assert plan(_messages("How do I sort?"), SamplingParams(max_tokens=9)).key != a.key
    seeded = plan(_messages("x"), SamplingParams(max_tokens=8, temperature=0.7, seed=1))
    assert seeded.key is not None
    assert seeded.key != plan(_messages("x"), SamplingParams(max_tokens=8, temperature=0.7, seed=2)).key
    unseeded = plan(_messages("x"), SamplingParams(max_tokens=8, temperature=0.7))
    assert unseeded.key is None and unseeded.bypass == "sampling-without-seed"
    assert plan(_messages("x"), option=SemanticOption()) is None  # not asked, not the tenant's default
    assert plan_for(SemanticOption(False), True, tenant="a", namespace="n", model_id="m", flavour="f",
                    messages=_messages("x"), sampling=SamplingParams()) is None  # asked off beats the default


def _response(text: str) -> StoredResponse:
    return StoredResponse(text, (1, 2), "stop", None, 2)


def test_index_hit_miss_refusal_and_key_isolation():
    index = SemanticIndex()
    e = _unit(1)
    index.add(b"A" * 16, "Give me five tips", e, _response("five tips"))
    hit = index.lookup(b"A" * 16, "give me 5 tips", e, 0.9)
    assert hit.status == "hit" and hit.response.text == "five tips" and hit.similarity == pytest.approx(1.0)
    assert index.lookup(b"B" * 16, "Give me five tips", e, 0.9).status == "miss"  # another key: never
    refused = index.lookup(b"A" * 16, "Give me six tips", e, 0.9)
    assert refused.status == "refused" and refused.guard == "number"
    assert index.lookup(b"A" * 16, "Give me five tips", _unit(2), 0.9).status == "miss"  # below the threshold


def test_tier_records_serve_cold_entries_and_a_damaged_record_is_a_miss(tmp_path):
    chain = TierChain([DiskTier(tmp_path, 1 << 20)])
    try:
        index = SemanticIndex(chain, hot_responses=1)
        e1, e2 = _unit(1), _unit(2)
        index.add(b"A" * 16, "first question", e1, _response("first answer"))
        index.add(b"A" * 16, "second question", e2, _response("second answer"))  # pushes the first out of memory
        assert chain.flush(10)
        found = index.lookup(b"A" * 16, "first question", e1, 0.9)
        assert found.status == "hit" and found.response.text == "first answer"  # read back from disk, verified
        for path in tmp_path.rglob("*.kv"):
            data = path.read_bytes()
            if b"first answer" in data:
                path.write_bytes(data.replace(b"first answer", b"FIRST ANSWER"))
        assert index.lookup(b"A" * 16, "first question", e1, 0.9).status == "miss"
        assert index.num_entries == 1  # the damaged entry was dropped
    finally:
        chain.close()


# -- the server (tiny model, stand-in embedder) -------------------------------------------------------------------

class BagOfWords:
    """A deterministic stand-in for the sentence embedder: lower-cased words -> a unit vector."""

    def embed(self, texts):
        rows = []
        for text in texts:
            v = np.zeros(64, dtype=np.float32)
            for word in re.findall(r"[a-z0-9]+", text.lower()):
                v += np.random.default_rng(int(hashlib.sha1(word.encode()).hexdigest()[:8], 16)).standard_normal(64)
            rows.append(v / (np.linalg.norm(v) or 1.0))
        return np.stack(rows).astype(np.float32)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = tiny_chat_engine(tmp_path_factory.mktemp("semantic"))
    config = ServerConfig(api_keys={"key-a": "alice", "key-b": "bob", "key-c": "carol"},
                          semantic_cache_tenants=("carol",))
    with LiveServer(engine, config) as live:
        state = live.state
        state.semantic = SemanticCache(SemanticIndex(), state.stats.record_semantic, BagOfWords)
        yield live


def _chat(server, key, text, semantic=None, **extra):
    body = {"model": "default", "messages": [{"role": "system", "content": "be brief"},
                                              {"role": "user", "content": text}],
            "max_tokens": 4, "temperature": 0, **extra}
    if semantic is not None:
        body["semantic_cache"] = semantic
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"},
                      timeout=60)


def _messages_api(server, key, text, semantic=None, **extra):
    body = {"model": "default", "max_tokens": 4, "temperature": 0, "system": "be brief",
            "messages": [{"role": "user", "content": text}], **extra}
    if semantic is not None:
        body["semantic_cache"] = semantic
    return httpx.post(f"{server.url}/v1/messages", json=body, headers={"x-api-key": key}, timeout=60)


@pytest.mark.parametrize("value", ["yes", 1, [], {"threshold": "x"}, {"threshold": 1.5}, {"threshold": -0.1},
                                   {"threshold": True}, {"treshold": 0.9}])
def test_bad_semantic_cache_values_are_400s_in_each_apis_format(server, value):
    r = _chat(server, "key-a", "hello", value)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith("semantic_cache") and "semantic_cache" in r.json()["error"]["message"]
    r = _messages_api(server, "key-a", "hello", value)
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "error" and "semantic_cache" in r.json()["error"]["message"]


def test_semantic_cache_on_completions_is_a_400(server):
    r = httpx.post(f"{server.url}/v1/completions", headers={"authorization": "Bearer key-a"}, timeout=60,
                   json={"model": "default", "prompt": "hi", "max_tokens": 2, "semantic_cache": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "semantic_cache"


def test_opted_in_paraphrase_hits_and_is_labelled_and_others_never_see_it(server):
    first = _chat(server, "key-a", "How do I reverse a list in Python?", True)
    assert first.status_code == 200 and first.headers[HEADER] == "miss"
    assert first.json()["usage"]["semantic_cache"]["hit"] is False
    again = _chat(server, "key-a", "how do I reverse a list in python", True)
    assert again.headers[HEADER] == "hit", again.text
    usage = again.json()["usage"]
    assert usage["semantic_cache"]["hit"] is True and usage["semantic_cache"]["similarity"] >= DEFAULT_THRESHOLD
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"]
    assert again.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    # not opted in: never a semantic answer, no label
    plain = _chat(server, "key-a", "how do I reverse a list in python")
    assert HEADER not in plain.headers and "semantic_cache" not in plain.json()["usage"]
    # another tenant, opted in: its own (empty) index
    assert _chat(server, "key-b", "how do I reverse a list in python", True).headers[HEADER] == "miss"
    # a near miss above the threshold is refused by a guard, and says which
    refused = _chat(server, "key-a", "How do I reverse a list in Java?", {"threshold": 0.5})
    assert refused.headers[HEADER] == "refused:entity"
    assert refused.json()["usage"]["semantic_cache"] == {"hit": False, "similarity": pytest.approx(
        refused.json()["usage"]["semantic_cache"]["similarity"]), "guard": "entity"}
    # sampling without a seed is never served
    sampled = _chat(server, "key-a", "how do I reverse a list in python", True, temperature=0.8)
    assert sampled.headers[HEADER] == "bypass:sampling-without-seed"
    # streamed hit: the same text, labelled in the final usage
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", headers={"authorization": "Bearer key-a"},
                      timeout=60, json={"model": "default", "max_tokens": 4, "temperature": 0, "stream": True,
                                        "stream_options": {"include_usage": True}, "semantic_cache": True,
                                        "messages": [{"role": "system", "content": "be brief"},
                                                     {"role": "user", "content": "How do I reverse a list in python"}]}
                      ) as r:
        assert r.headers[HEADER] == "hit"
        body = r.read().decode()
    assert '"semantic_cache":{"hit":true' in body and body.rstrip().endswith("data: [DONE]")
    metrics = httpx.get(f"{server.url}/metrics", headers={"authorization": "Bearer key-a"}, timeout=30).text
    assert 'promptstash_semantic_cache_hits_total{tenant="alice"} 2.0' in metrics
    assert 'promptstash_semantic_cache_refusals_total{guard="entity",tenant="alice"} 1.0' in metrics
    assert 'tenant="bob"' not in metrics


def test_anthropic_route_hits_and_tenant_default_can_be_turned_off(server):
    first = _messages_api(server, "key-c", "What is a Python decorator?")  # carol: on by default
    assert first.status_code == 200 and first.headers[HEADER] == "miss"
    hit = _messages_api(server, "key-c", "what is a python decorator")
    assert hit.headers[HEADER] == "hit"
    usage = hit.json()["usage"]
    assert usage["semantic_cache"]["hit"] is True and usage["input_tokens"] == 0
    assert usage["cache_read_input_tokens"] > 0 and hit.json()["content"] == first.json()["content"]
    off = _messages_api(server, "key-c", "what is a python decorator", False)
    assert HEADER not in off.headers and "semantic_cache" not in off.json()["usage"]
    assert _messages_api(server, "key-a", "what is a python decorator").headers.get(HEADER) is None


def test_a_failing_embedder_degrades_to_a_model_run(server):
    state = server.state
    saved = state.semantic

    def broken():
        raise RuntimeError("no model here")

    state.semantic = SemanticCache(SemanticIndex(), state.stats.record_semantic, broken)
    try:
        r = _chat(server, "key-a", "anything at all", True)
        assert r.status_code == 200 and r.headers[HEADER] == "error"
        assert r.json()["usage"]["semantic_cache"]["hit"] is False
    finally:
        state.semantic = saved
