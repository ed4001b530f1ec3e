"""`promptstash bench rag | chat | system-prompt | trace`: tiny random-weight engine, in-process and over HTTP."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from server_helpers import LiveServer, tiny_chat_engine

from promptstash.bench import report, workloads
from promptstash.cli import main

try:
    workloads.data_dir()
except workloads.DataNotFoundError as exc:
    pytest.skip(f"workload data absent: {exc}", allow_module_level=True)

pytestmark = pytest.mark.slow  # whole workload runs

OPTS = {"num_requests": 6, "concurrency": 2, "max_tokens": 2, "k": 2, "scale": 64, "text_chars": 120}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return tiny_chat_engine(tmp_path_factory.mktemp("tok"), kv_cache_tokens=16384)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server on an engine of its own (same weights and tokenizer as `engine`): a server's engine loop owns the
    engine it serves and aborts every running request that none of its clients submitted, so an in-process run
    on the served engine would lose requests whenever the loop's check falls inside the run."""
    with LiveServer(tiny_chat_engine(tmp_path_factory.mktemp("tok-server"), kv_cache_tokens=16384)) as live:
        yield live


def _check(res: report.BenchResult, name: str) -> None:
    on, off = res.summary["on"], res.summary["off"]
    for field in report.SUMMARY_FIELDS:
        assert field in on and field in off, field
    assert on["num_requests"] == off["num_requests"] == OPTS["num_requests"]
    assert off["cached_tokens"] == 0 and off["hit_rate"] == 0.0
    assert on["hit_rate"] > off["hit_rate"]
    assert on["prompt_tokens"] == off["prompt_tokens"]
    assert on["cost_openai_style"] < off["cost_openai_style"] == off["cost_no_cache"]
    assert res.ratio["hit_rate"] is None  # off is 0
    assert res.ratio["cost_openai_style"] < 1.0
    assert on["peak_kv_blocks"] >= 0 and on["ttft_p50_s"] <= on["ttft_p99_s"]
    if name == "trace":
        assert res.workload["optimum_cached_tokens"] >= on["cached_tokens"] > 0
    md = report.to_markdown(res)
    assert "| hit_rate |" in md and "caching off" in md


@pytest.mark.parametrize("name", workloads.WORKLOADS)
def test_in_process(engine, name: str) -> None:
    res = workloads.run(name, engine=engine, log=lambda _: None, **OPTS)
    _check(res, name)
    assert res.summary["on"]["peak_kv_bytes"] > 0
    assert res.setup["target"] == "in-process"


@pytest.mark.parametrize("name", workloads.WORKLOADS)
def test_against_url(engine, server, name: str) -> None:
    res = workloads.run(name, url=server.url + "/v1", vocab_size=engine.model.config.vocab_size,
                        log=lambda _: None, **OPTS)
    _check(res, name)
    assert res.summary["on"]["peak_kv_bytes"] is None


def test_same_numbers_in_process_and_url(engine, server) -> None:
    """Token counts do not depend on the path: same prompts, same cached tokens (one at a time)."""
    opts = {**OPTS, "concurrency": 1}
    a = workloads.run("system-prompt", engine=engine, log=lambda _: None, **opts)
    b = workloads.run("system-prompt", url=server.url, log=lambda _: None, **opts)
    for key in ("prompt_tokens", "cached_tokens", "completion_tokens"):
        assert a.summary["on"][key] == b.summary["on"][key], key


def test_trace_blocks_are_deterministic() -> None:
    w1, w2 = workloads.build_trace(5, scale=64, vocab_size=400), workloads.build_trace(5, scale=64, vocab_size=400)
    assert [r.prompt for r in w1.requests] == [r.prompt for r in w2.requests]
    assert w1.info["block_tokens"] == 8
    assert 0 <= w1.info["optimum_cached_tokens"] <= w1.info["prompt_tokens"]
    with pytest.raises(workloads.PromptstashError):
        workloads.build_trace(2, scale=3)


def test_rag_passages_recur() -> None:
    w = workloads.build_rag(10, k=3, pool_size=5)
    assert w.info["pool_size"] == 5 and w.info["passage_recurrence_rate"] > 0.5
    assert 0 < w.info["prefix_recurrence_rate"] <= w.info["passage_recurrence_rate"]


def test_chat_resends_history() -> None:
    w = workloads.build_chat(8, num_conversations=3)
    by_conv: dict[str, list] = {}
    for r in w.requests:
        by_conv.setdefault(r.label.split(" turn")[0], []).append(r.prompt)
    for turns in by_conv.values():
        for prev, nxt in zip(turns, turns[1:], strict=False):
            assert nxt[:len(prev)] == prev  # each turn extends the previous one


def test_missing_data_is_a_clear_error(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PROMPTSTASH_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(workloads.DataNotFoundError, match="PROMPTSTASH_DATA_DIR"):
        workloads.build("rag")


def test_percentile_and_costs() -> None:
    assert report.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert report.percentile([], 90) == 0.0
    c = report.costs(1_000_000, 500_000, 0, 100_000, workloads.PriceSheet())
    assert c["no_cache"] == pytest.approx(3.0)
    assert c["openai_style"] == pytest.approx(2.25)
    assert c["anthropic_style"] == pytest.approx(3.0 * (0.5 - 0.1 + 0.125 + 0.05))


def test_cli_against_url_writes_report(server, tmp_path: Path, capsys) -> None:
    rc = main(["bench", "chat", "--url", server.url, "--requests", "4", "--concurrency", "2", "--max-tokens", "2",
               "--out", str(tmp_path)])
    assert rc == 0
    assert (tmp_path / "workload-chat.json").is_file() and (tmp_path / "workload-chat.md").is_file()
    assert "| hit_rate |" in capsys.readouterr().out
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "workload-chat.png").is_file()
