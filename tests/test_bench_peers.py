"""`bench peers` and `bench perplexity`: the NLL arithmetic, the windows, the ratios, targets and reports on
synthetic results; on the real model (slow), promptstash float32 against llama.cpp on the same GGUF."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from promptstash.bench import peers, perplexity, summary

# -- perplexity: arithmetic and report ---------------------------------------------------------------------


def test_window_nll_against_hand_computed_values() -> None:
    # row 0: uniform over 3 -> -log(1/3); row 1: softmax([0, ln 3, 0]) = [1/5, 3/5, 1/5] -> -log(3/5);
    # row 2 predicts past the window and is not used
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.log(3.0), 0.0], [9.0, -9.0, 0.0]])
    nll, n = perplexity.window_nll(logits, [0, 2, 1])
    assert n == 2
    assert nll == pytest.approx(math.log(3) + math.log(5 / 3), abs=1e-6)  # = log 5
    assert perplexity.perplexity(nll, n) == pytest.approx(math.sqrt(5), rel=1e-6)
    with pytest.raises(ValueError):
        perplexity.window_nll(logits[:1], [0, 2, 1])


def test_cut_windows() -> None:
    ids = list(range(10))
    assert perplexity.cut_windows(ids, 4, 5) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # the partial tail is dropped
    assert perplexity.cut_windows(ids, 4, 1) == [[0, 1, 2, 3]]
    assert perplexity.cut_windows(ids, 11, 3) == []
    with pytest.raises(ValueError):
        perplexity.cut_windows(ids, 1, 3)


def _score(name: str, ppl: float, engine: str = "promptstash") -> dict:
    return {"name": name, "engine": engine, "weight_format": name, "dtype": "float32", "mean_nll": math.log(ppl),
            "perplexity": ppl, "tokens": 1022, "load_s": 1.0, "eval_s": 2.0}


def fake_perplexity(with_llama: bool = True) -> dict:
    scores = {"float32": _score("float32", 10.0), "int8": _score("int8", 10.05), "int4": _score("int4", 10.5)}
    if with_llama:
        scores["llama.cpp"] = _score("llama.cpp", 10.49, "llama.cpp")
    return {"setup": {"window_len": 512, "windows": 2, "windows_asked": 2, "text_tokens": 5000, "model": "m",
                      "gguf": "/x/model.gguf", "formats": ["float32", "int8", "int4"], "data": "d"},
            "machine": {"platform": "Linux", "machine": "x86_64", "cpu": "CPU", "cpus": 2, "python": "3",
                        "torch": "2", "llama_cpp": "0.3.16" if with_llama else None, "threads": 2},
            "scores": scores, "llama_cpp_note": None if with_llama else "llama.cpp not measured: not importable",
            "bounds": perplexity.evaluate(scores), "elapsed_s": 3.0}


def test_perplexity_bounds_and_report(tmp_path) -> None:
    res = fake_perplexity()
    b8, b4 = res["bounds"]
    assert b8["ratio"] == pytest.approx(1.005) and b8["passed"] is True
    assert b4["ratio"] == pytest.approx(10.5 / 10.49) and b4["passed"] is True
    res["scores"]["int8"]["perplexity"] = 10.2  # 2% worse than float32
    res["bounds"] = perplexity.evaluate(res["scores"])
    assert res["bounds"][0]["passed"] is False
    js, md = perplexity.write(res, tmp_path)
    text = md.read_text()
    assert json.loads(js.read_text())["scores"]["int8"]["perplexity"] == 10.2
    assert "| promptstash int8 | int8 | float32 | 1,022 |" in text and "+2.00%" in text
    assert "**FAIL**" in text and "**PASS**" in text


def test_perplexity_without_llama_cpp_says_so() -> None:
    res = fake_perplexity(with_llama=False)
    assert res["bounds"][1]["ratio"] is None and res["bounds"][1]["passed"] is None
    text = perplexity.to_markdown(res)
    assert "not measured" in text and "llama-cpp-python not installed" in text


# -- peers: rows, ratios, targets, report ------------------------------------------------------------------


def _side(fmt: str, resolved: str, prefill: dict[int, float], hit: dict[int, float], decode: float) -> dict:
    return {"format": fmt, "resolved": resolved, "dtype": "bfloat16", "load_s": 1.0,
            "prefill": [{"len": n, "samples_s": [n / v], "tok_s": v} for n, v in prefill.items()],
            "hit": [{"len": n, "samples_s": [v], "ttft_s": v, "cached_tokens": [n]} for n, v in hit.items()],
            "decode": {"tokens": 128, "samples_tok_s": [decode], "tok_s": decode}}


def fake_peers(with_llama: bool = True, with_server: bool = True) -> dict:
    formats = [_side("auto", "int4", {512: 300.0, 2048: 320.0, 8192: 200.0}, {2048: 0.08, 8192: 0.4}, 40.0),
               _side("int8", "int8", {512: 250.0, 2048: 260.0, 8192: 150.0}, {2048: 0.1, 8192: 0.72}, 30.0)]
    llama = None
    if with_llama:
        llama = _side("llama.cpp", "gguf", {512: 200.0, 2048: 200.0, 8192: 100.0}, {2048: 0.2, 8192: 0.8}, 40.0)
    rows = peers.figure_rows(formats, llama)
    server = None
    if with_server:
        def srv(wall: float, rss: int, cached: int | None) -> dict:
            return {"model": "m", "wall_s": wall, "requests": 24, "ttft_p50_s": wall / 30, "ttft_p90_s": wall / 10,
                    "e2e_mean_s": 1.0, "prompt_tokens": 60000, "cached_tokens": cached, "usage_reported": 24,
                    "cached_reported": 24 if cached is not None else 0, "peak_rss_bytes": rss,
                    "peak_tree_rss_bytes": rss, "main_vmhwm_bytes": rss, "records": [], "start_s": 5.0,
                    "weights": "int4", "dtype": "bfloat16"}
        server = {"settings": dict(peers.SERVER), "system_tokens": 1000, "doc_tokens": [1500] * 8,
                  "promptstash_cmd": "-m promptstash.cli serve", "promptstash": srv(50.0, 1_200_000_000, 40000),
                  "llama_cpp_cmd": "-m llama_cpp.server" if with_llama else None,
                  "llama_cpp": srv(100.0, 900_000_000, None) if with_llama else None}
    return {"setup": {"formats": ["auto", "int8"], "lengths": [512, 2048, 8192], "hit_lengths": [2048, 8192],
                      "hit_new_tokens": 32, "decode_tokens": 128, "decode_prompt_tokens": 40, "repeats": 3, "seed": 0,
                      "token_range": [1000, 30000], "threads": 2, "quick": False, "model": "m", "gguf": "/x/model.gguf",
                      "server": with_server},
            "machine": {"platform": "Linux", "machine": "x86_64", "cpu": "CPU", "cpus": 2, "python": "3",
                        "torch": "2", "llama_cpp": "0.3.16" if with_llama else None, "threads": 2},
            "llama_cpp_note": None if with_llama else "llama.cpp not measured: not importable",
            "formats": formats, "llama_cpp": llama, "rows": rows, "server": server,
            "targets": peers.evaluate_targets(formats, rows, server), "elapsed_s": 10.0}


def test_peers_ratios_and_targets() -> None:
    res = fake_peers()
    by = {r["figure"]: r for r in res["rows"]}
    assert by["cold prefill 2,048 tokens"]["ratios"] == {"auto": pytest.approx(1.6), "int8": pytest.approx(1.3)}
    hit = by["hit TTFT 8,192 cached + 32 new"]
    assert hit["higher_is_better"] is False and hit["ratios"]["auto"] == pytest.approx(0.5)
    assert by["decode (128 tokens)"]["ratios"] == {"auto": pytest.approx(1.0), "int8": pytest.approx(0.75)}
    verdict = {(t["target"], t["format"]): t["passed"] for t in res["targets"]}
    assert verdict[("decode >= 1.0x llama.cpp", "auto (int4)")] is True  # auto resolved to int4: int4's bound
    assert verdict[("decode >= 0.8x llama.cpp", "int8")] is False
    assert verdict[("hit TTFT at 8,192 <= 0.8x llama.cpp's", "auto (int4)")] is True
    assert verdict[("hit TTFT at 8,192 <= 0.8x llama.cpp's", "int8")] is False  # 0.9
    assert verdict[("cold prefill at 2,048 >= 1.5x llama.cpp", "auto (int4)")] is True
    assert verdict[("cold prefill at 8,192 >= 1.5x llama.cpp", "auto (int4)")] is True  # 2.0
    assert verdict[("cold prefill at 8,192 >= 1.5x llama.cpp", "int8")] is True  # 1.5
    assert verdict[("server total time <= 0.6x llama.cpp's", "server")] is True  # 0.5
    assert verdict[("server peak RSS <= 1.5 GB", "server")] is True


def test_peers_report(tmp_path) -> None:
    js, md = peers.write(fake_peers(), tmp_path)
    text = md.read_text()
    assert json.loads(js.read_text())["setup"]["repeats"] == 3
    assert ("`promptstash bench peers --formats auto int8 --lengths 512 2048 8192 --hit-lengths 2048 8192 "
            "--decode-tokens 128 --repeats 3 --users 8`") in text
    assert "| figure | promptstash auto → int4 | promptstash int8 | llama.cpp | ratio auto → int4 | ratio int8 |" \
        in text
    assert "| cold prefill 2,048 tokens (tok/s) | 320.0 | 260.0 | 200.0 | 1.60× | 1.30× |" in text
    assert "| hit TTFT 8,192 cached + 32 new | 0.400 s | 0.720 s | 0.800 s | 0.50× | 0.90× |" in text
    assert "| total time | 50.0 s | 100.0 s | 0.50× |" in text
    assert "| cached tokens (usage) | 40,000 | not reported | – |" in text
    assert "| peak RSS while serving (process tree, polled) | 1,144 MiB | 858 MiB | 1.33× |" in text
    assert "promptstash (int4 weights, bfloat16 activations): `-m promptstash.cli serve`" in text
    assert "**FAIL**" in text and "**PASS**" in text


def test_peers_without_llama_cpp_measures_promptstash_alone() -> None:
    res = fake_peers(with_llama=False)
    assert all(r["llama_cpp"] is None and set(r["ratios"].values()) == {None} for r in res["rows"])
    verdict = {(t["target"], t["format"]): t["passed"] for t in res["targets"]}
    assert verdict[("server total time <= 0.6x llama.cpp's", "server")] is None
    assert verdict[("server peak RSS <= 1.5 GB", "server")] is True  # promptstash's own figure still counts
    assert all(v is None for k, v in verdict.items() if k[1] != "server")
    text = peers.to_markdown(res)
    assert "llama.cpp not measured" in text and "not measured" in text


def test_quick_run_without_the_long_lengths_leaves_those_targets_unmeasured() -> None:
    formats = [_side("int4", "int4", {128: 100.0}, {128: 0.1}, 10.0)]
    llama = _side("llama.cpp", "gguf", {128: 100.0}, {128: 0.1}, 10.0)
    targets = peers.evaluate_targets(formats, peers.figure_rows(formats, llama), None)
    assert [t["passed"] for t in targets] == [True, None, None, None]  # decode measured; hit 8192, prefill not


def test_helpers() -> None:
    a = peers.random_ids(100, 5)
    assert a == peers.random_ids(100, 5) and a != peers.random_ids(100, 6)
    assert all(peers.TOKEN_RANGE[0] <= i < peers.TOKEN_RANGE[1] for i in a)
    assert peers.common_prefix([1, 2, 3, 4], [1, 2, 5]) == 2 and peers.common_prefix([], [1]) == 0
    assert peers._percentile([4.0, 1.0, 3.0, 2.0], 0.5) == pytest.approx(2.5)
    assert peers._percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.9) == pytest.approx(4.6)
    assert peers._percentile([], 0.5) is None


def test_served_format_from_the_ready_line() -> None:
    log = ("promptstash: loading the default model ...\npromptstash: serving qwen (int4 weights, bfloat16 activations, "
           "32,768-token KV pool, no auth) at http://127.0.0.1:1/v1\n")
    assert peers.served_format(log) == {"weights": "int4", "dtype": "bfloat16"}
    assert peers.served_format("nothing") == {"weights": None, "dtype": None}


def test_rss_of_a_process_tree() -> None:
    code = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'b = bytearray(80 * 2**20); import time; time.sleep(30)']); "
            "time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 20
        while len(peers.process_tree(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        tree = peers.process_tree(proc.pid)
        assert tree[0] == proc.pid and len(tree) == 2
        time.sleep(1.0)  # the child allocates its 80 MiB
        with peers.RssPoller(proc.pid, interval_s=0.05) as rss:
            time.sleep(0.3)
        assert rss.peak_tree_kib > 80 * 1024  # the child's bytearray is counted
        assert rss.peak_bytes >= 1024 * rss.hwm_kib > 0
    finally:
        for pid in reversed(peers.process_tree(proc.pid)):
            os.kill(pid, 9)
        proc.wait(timeout=10)


def test_summary_page_includes_peers_and_perplexity(tmp_path) -> None:
    perplexity.write(fake_perplexity(), tmp_path)
    peers.write(fake_peers(), tmp_path)
    page = summary.render(tmp_path)
    assert "promptstash vs llama.cpp" in page and "[peers.md](peers.md)" in page
    assert "| cold prefill 2,048 tokens (tok/s) | 320.0 | 260.0 | 200.0 | 1.60× | 1.30× |" in page
    assert "Perplexity" in page and "[perplexity.md](perplexity.md)" in page and "10.0500" in page
    assert "targets met" in page


# -- the real model ----------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_server_conversations_from_musique() -> None:
    from real_model_helpers import default_model_dir

    from promptstash.bench.workloads import DataNotFoundError
    from promptstash.models.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(default_model_dir())
    try:
        system, convs = peers.build_conversations(tokenizer, users=3, doc_tokens=300, system_tokens=100, questions=3)
    except DataNotFoundError as exc:
        pytest.skip(str(exc))
    assert abs(len(tokenizer.encode(system)) - 100) <= 3
    assert len(convs) == 3 and len({c["document"] for c in convs}) == 3  # each user its own document
    assert all(abs(len(tokenizer.encode(c["document"])) - 300) <= 3 for c in convs)
    assert all(len(c["questions"]) == 3 and c["questions"][1:] == list(peers.FOLLOW_UPS[:2]) for c in convs)


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.timeout(240)  # ~25 s on an idle 2-core machine; loading the engine dominates, and shares the cores
def test_float32_promptstash_scores_like_llama_cpp_on_the_same_gguf() -> None:
    """promptstash's float32 weights are the GGUF's Q4_K_M blocks dequantized: llama.cpp on the same file and the
    same token ids must give (nearly) the same NLL; and the in-process measurements run end to end."""
    pytest.importorskip("llama_cpp")
    from real_model_helpers import default_model_dir, engines

    from promptstash.models.loader import GGUF_WEIGHTS
    from promptstash.models.tokenizer import Tokenizer

    path = default_model_dir()
    tokenizer = Tokenizer.from_dir(path)
    text = ("The lighthouse stood on the northern cape for two hundred years. Its keepers kept a log of every ship "
            "that passed, every storm and every repair, and the logs are now kept in the town library.")
    window = perplexity.cut_windows(tokenizer.encode(text), 32, 1)
    assert len(window) == 1
    ps = peers.PromptstashSide("float32", 256, None, engine=engines("float32")[0])  # the tests' shared engine
    try:
        out = ps.engine.prompt_logits(window[0], namespace="fresh")
        assert out.num_cached_tokens == 0
        ours, count = perplexity.window_nll(out.logits, window[0])
        theirs = perplexity.score_llama_cpp(path / GGUF_WEIGHTS, window, log=lambda m: None)
        assert count == theirs["tokens"] == 31
        assert ours / count == pytest.approx(theirs["mean_nll"], abs=0.05)

        llama = peers.LlamaSide(path / GGUF_WEIGHTS, 512)
        try:
            samples: dict = {}
            res = peers.measure(ps, llama, [64], [64], tokenizer.encode(text)[:16], 4, 1, samples, log=lambda m: None)
        finally:
            llama.close()
    finally:
        ps.close()
    assert res["resolved"] == "float32" and res["prefill"][0]["tok_s"] > 0 and res["decode"]["tok_s"] > 0
    assert res["hit"][0]["cached_tokens"] == [64]
    theirs = peers.llama_summary(samples, 4)
    assert theirs["hit"][0]["cached_tokens"] == [64] and theirs["decode"]["tok_s"] > 0
