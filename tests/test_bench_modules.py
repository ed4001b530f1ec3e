"""`promptstash bench modules`: scoring, workload building, reports, and a smoke run on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from promptstash.bench import modules as bm
from promptstash.bench import workloads


def _has_data() -> bool:
    try:
        workloads.data_dir()
        return True
    except workloads.DataNotFoundError:
        return False


needs_data = pytest.mark.skipif(not _has_data(), reason="workload data absent (../shared/data or "
                                "$PROMPTSTASH_DATA_DIR): see shared/data/README.md")


# -- scoring -----------------------------------------------------------------------------------------------
def test_normalize_answer() -> None:
    assert bm.normalize_answer("The  Exeter College, Oxford!") == "exeter college oxford"
    assert bm.normalize_answer("an apple a day") == "apple day"
    assert bm.normalize_answer("Théâtre") == "théâtre"
    assert bm.normalize_answer("") == ""


def test_f1_and_exact_match() -> None:
    golds = ["Exeter College", "Exeter"]
    assert bm.exact_match("exeter college.", golds) == 1.0
    assert bm.exact_match("Exeter College, Oxford", golds) == 0.0
    assert bm.f1_score("Exeter College, Oxford", golds) == pytest.approx(0.8)  # p 2/3, r 1
    assert bm.f1_score("the Exeter", golds) == 1.0  # best over the golds, articles dropped
    assert bm.f1_score("Oxford", golds) == 0.0
    assert bm.f1_score("", golds) == 0.0
    assert bm.f1_score("the", ["a"]) == 1.0  # both normalise to nothing
    assert bm.f1_score("x x y", ["x y y"]) == pytest.approx(2 / 3)  # bag of tokens with counts


def test_agreement() -> None:
    assert bm.agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert bm.agreement([], []) == 1.0
    assert bm.agreement([1, 2, 9, 4], [1, 2, 3, 4]) == 0.5  # common prefix, not positional matches
    assert bm.agreement([1, 2], [1, 2, 3, 4]) == 0.5  # over the longer sequence
    assert bm.agreement([5], [1]) == 0.0
    long = list(range(40))
    assert bm.agreement(long, long[:16] + [0] * 24) == 1.0  # only the first 16 tokens count
    assert bm.agreement(long, long[:8], n=16) == 0.5


def test_ll_change() -> None:
    assert bm.ll_change(-1.02, -1.0) == pytest.approx(-0.02)
    assert bm.ll_change(-0.5, -1.0) == pytest.approx(0.5)  # more likely than with full
    assert bm.ll_change(None, -1.0) is None
    assert bm.ll_change(-1.0, 0.0) is None


def test_clip_passage() -> None:
    text = " ".join(f"w{i}" for i in range(200))
    assert bm.clip_passage(text, None) == text
    assert bm.clip_passage("short", 100) == "short"
    head = bm.clip_passage(text, 50)
    assert text.startswith(head) and len(head) <= 50 and not head.endswith(" ")
    around = bm.clip_passage(text, 50, ["W150"])  # centred on the answer, case-insensitive
    assert "w150" in around and len(around) <= 50 and around in text
    assert around.split()[0].startswith("w") and around.split()[-1] in text.split()  # whole words only
    assert bm.clip_passage(text, 50, ["absent"]) == head


# -- summaries and targets ---------------------------------------------------------------------------------
def _run(strategy: str, qid: str, *, f1: float, ll: float, ttft: float, tokens: list[int], rec: float | None = 0.0
         ) -> bm.Run:
    return bm.Run("musique", qid, strategy, "x", tokens, f1, float(f1 == 1.0), ll, 3, ttft, ttft + 1, 100, 90, 80, 0,
                  10, 80, 2, 2, rec)


def _runs() -> list[bm.Run]:
    runs = []
    for q in ("a", "b", "c"):
        runs += [_run("full", q, f1=1.0, ll=-1.0, ttft=10.0, tokens=[1, 2, 3], rec=1.0),
                 _run("prefix", q, f1=1.0, ll=-1.0, ttft=9.0, tokens=[1, 2, 3], rec=1.0),
                 _run("none", q, f1=0.5, ll=-1.5, ttft=0.5, tokens=[1, 9]),
                 _run("legolink:16", q, f1=1.0, ll=-1.01, ttft=2.0, tokens=[1, 2, 3], rec=0.1),
                 _run("cacheblend:0.15", q, f1=1.0, ll=-0.99, ttft=4.0, tokens=[1, 2, 3], rec=0.15)]
    for r in runs:
        full = next(f for f in runs if f.strategy == "full" and f.qid == r.qid)
        r.agreement, r.same_as_full = bm.agreement(r.token_ids, full.token_ids), r.token_ids == full.token_ids
    return runs


def test_summarize_best_and_targets() -> None:
    strategies = ["prefix", "none", "legolink:16", "cacheblend:0.15", "full"]
    summary = bm.summarize(_runs(), strategies)
    assert list(summary) == strategies
    assert summary["none"]["gold_ll_change"] == pytest.approx(-0.5)
    assert summary["none"]["agreement"] == pytest.approx(1 / 3)
    assert summary["none"]["speedup"] == pytest.approx(20.0)
    assert summary["legolink:16"]["f1_vs_full"] == pytest.approx(1.0)
    assert summary["full"]["recomputed_fraction"] == 1.0 and summary["full"]["same_as_full"] == 1.0
    assert summary["none"]["gold_ll_abs_change"] == pytest.approx(0.5)
    # legolink:16 (-1%) and cacheblend (+1%) both meet the quality targets: the faster one is best
    assert bm.best_approximate(summary) == "legolink:16"
    t = bm.targets(summary, "longdoc")
    assert t["strategy"] == "legolink:16" and t["ll_ok"] and t["f1_ok"] and t["speedup_ok"] and t["passed"]
    assert t["speedup"] == pytest.approx(5.0) and t["speedup_target"] == 4.0
    # without a strategy meeting the quality targets, the closest log-likelihood is reported (and fails)
    only_none = bm.summarize([r for r in _runs() if r.strategy in ("none", "full")], ["none", "full"])
    t = bm.targets(only_none, "musique")
    assert t["strategy"] == "none" and not t["ll_ok"] and not t["f1_ok"] and t["speedup_ok"] and not t["passed"]
    assert bm.targets(bm.summarize(_runs(), ["prefix", "full"]), "musique") is None


def _result() -> dict:
    strategies = ["prefix", "none", "legolink:16", "cacheblend:0.15", "full"]
    runs = _runs()
    summary = bm.summarize(runs, strategies)
    ws = {name: {"description": f"{name} workload", "info": {"mean_prompt_tokens": 100.0, "mean_document_tokens": 40.0},
                 "summary": summary, "targets": bm.targets(summary, name),
                 "runs": [bm.asdict(r) for r in runs], "wall_s": 12.0} for name in bm.WORKLOAD_NAMES}
    return {"workloads": ws, "wall_s": 60.0,
            "setup": {"command": "promptstash bench modules --out x", "model": "m", "dtype": "float32",
                      "max_tokens": 16, "machine": bm.machine(), "date": "2026-01-01"}}


def test_markdown_and_files(tmp_path: Path) -> None:
    res = _result()
    md = bm.to_markdown(res)
    assert "`promptstash bench modules --out x`" in md and "float32" in md and "cores" in md
    assert "## musique" in md and "## longdoc" in md
    assert md.count("| legolink:16 |") == 2
    assert "- PASS: TTFT at least 4× lower than full: 5.0×" in md
    assert "- PASS: TTFT at least 2× lower than full: 5.0×" in md
    # cacheblend:0.15 is 2.5× faster than full: enough on musique, not on longdoc
    assert "Strategies meeting every target on every workload: `legolink:16`." in md
    js, mdp = bm.write(res, tmp_path, log=lambda _: None)
    assert json.loads(js.read_text())["workloads"]["musique"]["targets"]["strategy"] == "legolink:16"
    assert mdp.read_text() == md
    pytest.importorskip("matplotlib")
    assert (tmp_path / "modules.png").stat().st_size > 0


# -- workloads ---------------------------------------------------------------------------------------------
@needs_data
def test_build_musique() -> None:
    w = bm.build("musique", 3)
    assert w.name == "musique" and len(w.items) == 3
    for item in w.items:
        assert len(item.documents) == 10 and item.answers and item.question.endswith("?")
        assert all(len(d) <= bm.DEFAULT_PASSAGE_CHARS for d in item.documents)
        assert sorted(item.order) == list(range(10))
        covered = {j for warm in item.warmups for j in warm}
        assert covered == set(range(10))  # every passage seen before the measured request ...
        assert all(warm != item.order[:len(warm)] for warm in item.warmups)  # ... in other orders
        assert all(len(warm) < 10 for warm in item.warmups)  # ... and other combinations
        assert item.order[0] not in {warm[0] for warm in item.warmups}
    # the answer survives clipping where a passage mentions it
    ex = bm._examples()[0]
    mentions = [c for c in ex["ctxs"] if ex["answers"][0].lower() in c["text"].lower()]
    docs = bm.build("musique", 1).items[0].documents
    assert sum(ex["answers"][0].lower() in d.lower() for d in docs) == len(mentions) > 0
    assert bm.build("musique", 2).items[0].order == w.items[0].order  # deterministic


@needs_data
def test_build_longdoc_and_messages() -> None:
    w = bm.build("longdoc", 2)
    assert len(w.items) == 2 and w.items[0].qid == f"longdoc-{bm.LONGDOC_OFFSET}"
    item = w.items[0]
    assert len(item.documents) == 5 and sorted(item.order) == list(range(5))
    assert all(3000 <= len(d) <= 2 * bm.LONGDOC_PASSAGE_CHARS + 2 for d in item.documents)  # ~1,000 tokens each
    msgs = bm.messages(item, item.order, item.question)
    parts = msgs[1]["content"]
    assert msgs[0] == {"role": "system", "content": bm.SYSTEM}
    assert [p.get("module", False) for p in parts] == [False] + [True] * 5 + [False]
    assert [p["text"] for p in parts[1:-1]] == [item.documents[j] for j in item.order]
    assert parts[-1]["text"].startswith(f"Question: {item.question}")  # the question last
    plain = bm.messages(item, item.order, item.question, modules=False)
    assert not any(p.get("module") for p in plain[1]["content"])
    assert [p["text"] for p in plain[1]["content"]] == [p["text"] for p in parts]


@needs_data
def test_rag_modules_mode() -> None:
    plain = workloads.build_rag(4, k=2, passage_chars=100)
    marked = workloads.build_rag(4, k=2, passage_chars=100, modules=True)
    assert marked.info["modules"] and not plain.info["modules"]
    for a, b in zip(plain.requests, marked.requests, strict=True):
        parts = b.prompt[0]["content"]
        assert [p.get("module", False) for p in parts] == [False, True, True]
        assert "\n".join(p["text"] for p in parts).rstrip("\n") == a.prompt[0]["content"]  # the same text
        assert b.prompt[1] == a.prompt[1]
    with pytest.raises(workloads.PromptstashError):
        workloads.build("chat", 2, modules=True)


# -- smoke runs (tiny random model) -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from server_helpers import tiny_chat_engine

    return tiny_chat_engine(tmp_path_factory.mktemp("tok"), kv_cache_tokens=16384)


@needs_data
@pytest.mark.slow
def test_smoke_run(tiny) -> None:
    ws = [bm.build_musique(1, passage_chars=60), bm.build_longdoc(1, passage_chars=80)]
    res = bm.run_engine(tiny, ws, list(bm.DEFAULT_STRATEGIES), max_tokens=4, log=lambda _: None)
    for name in bm.WORKLOAD_NAMES:
        w = res["workloads"][name]
        summary = w["summary"]
        assert list(summary) == [s for s in bm.DEFAULT_STRATEGIES]
        runs = {r["strategy"]: r for r in w["runs"]}
        full = runs["full"]
        assert full["agreement"] == 1.0 and full["same_as_full"] and summary["full"]["gold_ll_change"] == 0.0
        assert full["recomputed_fraction"] == 1.0 and full["gold_ll"] < 0
        for s in ("none", "legolink:16", "cacheblend:0.15"):
            r = runs[s]
            assert r["num_module_hits"] == r["num_modules"] == len(ws[0 if name == "musique" else 1].items[0].documents)
            assert r["module_cached_tokens"] > 0 and r["computed_tokens"] < full["computed_tokens"]
            assert r["gold_ll"] is not None and 0.0 <= r["agreement"] <= 1.0
            assert r["tf_computed_tokens"] < r["prompt_tokens"]  # the teacher-forced pass reused the modules too
        assert runs["none"]["recomputed_fraction"] == 0.0
        assert 0.0 < runs["cacheblend:0.3"]["recomputed_fraction"] <= 0.35
        assert runs["prefix"]["module_tokens"] == 0 and runs["prefix"]["recomputed_fraction"] == 1.0
        # full does not hit the prefix of an earlier strategy's run: it computes what prefix computes
        assert full["computed_tokens"] >= runs["prefix"]["computed_tokens"] - tiny.config.block_size
    md = bm.to_markdown({**res, "setup": {"command": "c", "machine": bm.machine()}})
    assert "## longdoc" in md and "Targets (musique)" in md


@needs_data
@pytest.mark.slow
def test_rag_modules_run(tiny) -> None:
    from promptstash.bench import report

    res = workloads.run("rag", engine=tiny, num_requests=6, concurrency=2, max_tokens=2, k=2, text_chars=120,
                        modules=True, module_repair="legolink:4", log=lambda _: None)
    assert res.setup["modules"] and res.setup["module_repair"] == "legolink:4"
    assert res.summary["on"]["hit_rate"] > 0 and res.summary["off"]["cached_tokens"] == 0
    assert report.stem(res) == "workload-rag-modules"
    assert "rag with modules" in report.to_markdown(res)


def test_gold_log_likelihood_after_a_cached_answer() -> None:
    """Positions served from the cache (the prompt and the answer already published) are computed again."""
    from conftest import tiny_engine

    engine = tiny_engine("qwen2")
    prompt, answer = [(7 * i) % 200 + 3 for i in range(30)], [11, 12, 13, 14, 15, 16]
    cold, computed = bm._gold_log_likelihood(engine, prompt, answer, (), "prefix", "cold")
    assert computed == len(prompt) + len(answer)
    engine.prompt_logits(prompt + answer, namespace="warm")  # publishes 2 blocks: positions 0..31 cached
    warm, computed = bm._gold_log_likelihood(engine, prompt, answer, (), "prefix", "warm")
    assert warm == pytest.approx(cold, abs=1e-5) and cold < 0
    # positions 32..35 in the first pass, then 29, 30, 31 each from its own prefix (a block at most each)
    assert computed <= 4 + 3 * engine.config.block_size


@needs_data
@pytest.mark.slow
def test_rag_modules_run_reports_the_default_repair(tiny) -> None:
    from promptstash.bench import report

    res = workloads.run("rag", engine=tiny, num_requests=3, concurrency=1, max_tokens=1, k=2, text_chars=60,
                        modules=True, log=lambda _: None)
    assert res.setup["module_repair"] == tiny.default_module_repair.label
    assert f"module repair `{tiny.default_module_repair.label}`" in report.to_markdown(res)
    assert "modules yes" in report.to_markdown(res)
