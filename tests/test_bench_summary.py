"""The results page: the seed table from the rag report, and every workload's on/off table."""

from __future__ import annotations

import json

from promptstash.bench import summary


def fake_report(workload: str, ttft_on: float, ttft_off: float) -> dict:
    def run(ttft: float, cached: int) -> dict:
        return {"ttft_p50_s": ttft, "ttft_p90_s": ttft * 2, "ttft_p99_s": ttft * 3, "e2e_p50_s": ttft + 1,
                "requests_per_s": 1 / (ttft + 1), "total_tokens_per_s": 100.0, "hit_rate": cached / 1000,
                "peak_kv_bytes": 2**20 * (10 if cached else 20), "cost_no_cache": 0.003, "cached_tokens": cached,
                "cost_anthropic_style": 0.003 - cached * 2.7e-6, "cost_openai_style": 0.003 - cached * 1.5e-6,
                "cost_per_1k_openai_style": 1.0, "cost_per_1k_anthropic_style": 1.0}
    return {"setup": {"num_requests": 20, "k": 3, "concurrency": 4, "max_tokens": 16},
            "workload": {"description": f"{workload} workload", "pool_size": 6, "prefix_recurrence_rate": 0.5,
                         "optimum_cached_tokens": 900},
            "summary": {"on": run(ttft_on, 800), "off": run(ttft_off, 0)}, "ratio": {"ttft_p50_s": ttft_on / ttft_off}}


def test_results_page_holds_the_seed_table_and_each_workloads_table(tmp_path) -> None:
    for w in summary.WORKLOADS:
        (tmp_path / f"workload-{w}.json").write_text(json.dumps(fake_report(w, 0.5, 4.0)))
    page = summary.write(tmp_path).read_text()
    assert "| TTFT (p50) | 2.8 s → 0.4 s | 4.00 s → 0.50 s | 8.0× lower |" in page
    assert "| KV memory (peak) | −42% | 20 → 10 MiB | -50% |" in page
    assert "Input cost, Anthropic-style" in page and "−88%" in page
    for w in summary.WORKLOADS:
        assert f"### {w}" in page and f"workload-{w}.png" in page
    assert "optimum 900" in page


def test_missing_workloads_are_marked_not_run(tmp_path) -> None:
    page = summary.render(tmp_path)
    assert page.count("(not run)") == 4 and "seed's table" not in page
