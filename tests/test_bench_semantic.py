"""`promptstash bench semantic`: the labelled set, the threshold rule, and the report / plot on a small subset."""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict

import numpy as np
import pytest

from promptstash.bench import semantic as bs


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return bs.load_pairs()


# -- the labelled set --------------------------------------------------------------------------------------
def test_set_is_valid(rows: list[dict]) -> None:
    texts = {(r["question_id"], r["turn"]): r["original"] for r in rows}
    assert len(texts) >= 150
    assert len(set(texts.values())) >= 150
    per_q: dict[tuple[int, int], Counter] = defaultdict(Counter)
    for r in rows:
        assert isinstance(r["question_id"], int) and r["turn"] in (1, 2)
        assert r["original"] == texts[r["question_id"], r["turn"]]
        assert r["variant"].strip() and r["variant"] != r["original"]
        assert r["id"].startswith(f"q{r['question_id']}t{r['turn']}-")
        assert (r["label"] == "paraphrase") == (r["kind"] == "paraphrase")
        per_q[r["question_id"], r["turn"]][r["label"]] += 1
    for key, c in per_q.items():
        assert c["paraphrase"] >= 2, key
        assert c["near_miss"] >= 3, key
    kinds = Counter(r["kind"] for r in rows if r["label"] == "near_miss")
    assert set(kinds) == set(bs.KINDS)
    assert min(kinds.values()) >= 30
    assert sum(kinds.values()) >= 400


def test_set_variants_are_distinct_per_question(rows: list[dict]) -> None:
    seen = Counter((r["question_id"], r["turn"], r["variant"]) for r in rows)
    assert max(seen.values()) == 1


def test_originals_match_mt_bench(rows: list[dict]) -> None:
    from promptstash.bench.workloads import DataNotFoundError, _data_file

    try:
        path = _data_file("chat/mt_bench_questions.jsonl")
    except DataNotFoundError:
        pytest.skip("MT-Bench questions absent (../shared/data)")
    source = {}
    for line in path.read_text().splitlines():
        q = json.loads(line)
        for t, text in enumerate(q["turns"], 1):
            source[q["question_id"], t] = (q["category"], text)
    for r in rows:
        assert source[r["question_id"], r["turn"]] == (r["category"], r["original"])


def test_load_pairs_rejects_bad_rows(tmp_path) -> None:
    good = {"id": "q1t1-p1", "question_id": 1, "turn": 1, "category": "x", "original": "a", "variant": "b",
            "label": "paraphrase", "kind": "paraphrase"}
    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps(good) + "\n")
    assert len(bs.load_pairs(p)) == 1
    for bad in ({**good, "label": "other"}, {**good, "kind": "number"},
                {**good, "label": "near_miss", "kind": "paraphrase"}):
        p.write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError):
            bs.load_pairs(p)
    p.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(ValueError, match="duplicate"):
        bs.load_pairs(p)


# -- the rule ----------------------------------------------------------------------------------------------
def _scored(label: str, kind: str, sim: float, refusal: str | None = None) -> dict:
    return {"id": f"{kind}-{sim}", "label": label, "kind": kind, "similarity": sim, "refusal": refusal}


def test_evaluate_and_choose_threshold() -> None:
    scored = ([_scored("paraphrase", "paraphrase", s) for s in (0.95, 0.9, 0.85, 0.7)]
              + [_scored("paraphrase", "paraphrase", 0.99, "entity")]
              + [_scored("near_miss", "number", 0.93), _scored("near_miss", "number", 0.99, "number"),
                 _scored("near_miss", "entity", 0.8), _scored("near_miss", "negation", 0.5)])
    table = bs.evaluate(scored, [0.8, 0.9, 0.94])
    r80, r90, r94 = table
    assert r80["hit_rate_guarded"] == pytest.approx(3 / 5)
    assert r80["hit_rate_embedding"] == pytest.approx(4 / 5)
    assert r80["false_hit_rate_guarded"] == pytest.approx(2 / 4)
    assert r80["false_hit_rate_embedding"] == pytest.approx(3 / 4)
    assert r80["by_kind_guarded"]["number"] == pytest.approx(1 / 2)
    assert r80["by_kind_guarded"]["unit"] is None
    assert r90["false_hit_rate_guarded"] == pytest.approx(1 / 4)
    assert r94["false_hit_rate_guarded"] == 0 and r94["hit_rate_guarded"] == pytest.approx(1 / 5)
    chosen = bs.choose_threshold(table)
    assert chosen is r94  # the lowest threshold with false hits <= 1%
    assert bs.choose_threshold(table, bound=0.3)["threshold"] == 0.9
    assert bs.choose_threshold(table, mode="embedding") is None  # 0.99 near-miss unguarded at every threshold
    counts = bs.guard_counts(scored)
    assert counts == {"entity": {"paraphrase": 1}, "number": {"number": 1}}


def test_workload_estimate() -> None:
    w = bs.workload_estimate(0.5)
    assert [r["semantic"] for r in w["rows"]] == pytest.approx([0.05, 0.125, 0.25, 0.5])
    assert all(r["exact_match"] == 0 for r in w["rows"])
    assert w["share_needed"]["30%"] == pytest.approx(0.6) and w["seed_reached_at_full_share"]
    assert not bs.workload_estimate(0.1)["seed_reached_at_full_share"]


# -- report and plot on a subset ---------------------------------------------------------------------------
class HashEmbedder:
    """Deterministic stand-in for the sentence embedder: bag of hashed words, unit rows."""

    model_dir = "hash-embedder"

    def embed(self, texts):
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % 64] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_run_write_and_plot_on_subset(rows: list[dict], tmp_path) -> None:
    subset = [r for r in rows if r["question_id"] in (81, 104, 117, 147)]
    res = bs.run(rows=subset, embedder=HashEmbedder(), log=lambda m: None)
    assert res["setup"]["pairs"] == len(subset)
    assert len(res["table"]) == len(bs.THRESHOLDS)
    assert res["chosen"] is not None  # 1.0 is on the grid
    assert res["chosen"]["false_hit_rate_guarded"] <= bs.FALSE_HIT_BOUND
    js, md = bs.write(res, tmp_path, log=lambda m: None)
    data = json.loads(js.read_text())
    assert len(data["pairs"]) == len(subset)
    text = md.read_text()
    assert "Recommended default threshold" in text and "+30-40%" in text and "| guard |" in text
    assert (tmp_path / "semantic.png").stat().st_size > 1000
    # the dev / held-out protocol: both halves scored on the same grid, examples from dev rows only
    assert set(res["table_by_split"]) == {"dev", "held_out"}
    assert all(len(t) == len(bs.THRESHOLDS) for t in res["table_by_split"].values())
    assert set(res["chosen_by_split"]) == {"dev", "held_out"}
    assert "Protocol against overfitting" in text and "held-out (even ids)" in text
    ids = {r["id"]: r for r in subset}
    shown = res["examples"]["false_hits"] + res["examples"]["refused_paraphrases"]
    assert all(ids[e["id"]]["question_id"] % 2 == 1 for e in shown)


def test_split_by_question_id_parity(rows: list[dict]) -> None:
    assert bs.split_of({"question_id": 81}) == "dev" and bs.split_of({"question_id": 104}) == "held_out"
    halves = Counter(bs.split_of(r) for r in rows)
    assert halves["dev"] > 300 and halves["held_out"] > 300
    # every question text lies wholly in one half
    assert len({(r["question_id"], bs.split_of(r)) for r in rows}) == len({r["question_id"] for r in rows})


def test_report_without_a_threshold_meeting_the_bound(rows: list[dict]) -> None:
    subset = [r for r in rows if r["question_id"] in (81, 82)]
    res = bs.run(rows=subset, embedder=HashEmbedder(), refusal=lambda a, b: None, thresholds=[0.5, 0.6],
                 log=lambda m: None)
    if res["chosen"] is None:
        assert "No threshold on the grid" in bs.to_markdown(res)


@pytest.mark.slow
def test_real_embedder_ranks_paraphrases_above_unrelated(rows: list[dict]) -> None:
    from promptstash.semantic.embedding import load_embedder

    subset = [r for r in rows if r["question_id"] == 104 and r["turn"] == 1]
    scored, timing = bs.score_pairs(subset, load_embedder(), lambda a, b: None, log=lambda m: None)
    assert all(0.3 < s["similarity"] <= 1.0001 for s in scored)
    assert timing["texts_per_s"] > 0
