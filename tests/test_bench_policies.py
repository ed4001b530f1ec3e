"""`bench policies`: the simulated replay through the real cache manager and scheduler (no model)."""

from __future__ import annotations

import json
import random

import pytest

from promptstash.bench import policies as P
from promptstash.bench.workloads import DataNotFoundError

COST = {"coef": {"step": 0.02, "prefill_tokens": 0.0025, "prefill_attention": 0.0004, "decode_seqs": 0.006,
                 "decode_context": 0.001}}


@pytest.fixture(scope="module")
def mooncake() -> P.SimWorkload:
    try:
        return P.build_mooncake(150, grouped=True)
    except DataNotFoundError as exc:
        pytest.skip(f"shared workload data absent: {exc}")


@pytest.fixture(scope="module")
def cost() -> P.CostModel:
    return P.CostModel.from_dict(COST)


def test_unbounded_pool_reaches_the_computed_optimum(mooncake, cost):
    info = mooncake.info
    assert 0.2 < info["optimum_hit_rate"] < 1.0
    res = P.replay(mooncake, cost, P.pool_blocks(mooncake, None), time_scale=P.time_scale_for(mooncake, cost, 0.8))
    assert res["cached_tokens"] == info["optimum_cached_tokens"]
    assert res["hit_rate"] == pytest.approx(info["optimum_hit_rate"])
    assert res["evictions"] == 0
    assert len(res["records"]) == len(mooncake.requests)
    assert all(r.ttft_s > 0 for r in res["records"])


def test_smaller_pool_lowers_hit_rate_and_raises_ttft(mooncake, cost):
    scale = P.time_scale_for(mooncake, cost, 0.8)
    big = P.replay(mooncake, cost, P.pool_blocks(mooncake, None), time_scale=scale)
    small = P.replay(mooncake, cost, P.pool_blocks(mooncake, 0.05), time_scale=scale)  # integrity checked inside
    assert small["hit_rate"] < big["hit_rate"] - 0.05
    assert small["evictions"] > 0
    assert small["ttft_p90_s"] > big["ttft_p90_s"]


def test_pool_too_small_is_reported(mooncake, cost):
    with pytest.raises(P.PromptstashError, match="too small"):
        P.replay(mooncake, cost, mooncake.info["max_request_blocks"] // 2)


def test_sharegpt_turns_extend_the_previous_turn():
    try:
        wl = P.build_sharegpt(20)
    except DataNotFoundError as exc:
        pytest.skip(f"shared workload data absent: {exc}")
    later = [r for r in wl.requests if r.prev is not None]
    assert later
    for r in later:
        prev = wl.requests[r.prev]
        assert r.prompt[:len(prev.prompt) + len(prev.output)] == prev.prompt + prev.output
        assert r.arrival_s > 0  # think time
    assert P.word_ids("Hello, world!") == P.word_ids("Hello, world!") and len(P.word_ids("Hello, world!")) == 4


def test_fit_recovers_a_linear_cost_model():
    rng = random.Random(0)
    truth = P.CostModel.from_dict(COST)
    samples = []
    for _ in range(60):
        if rng.random() < 0.5:
            chunks = [(rng.choice([0, 1024, 2048]), rng.choice([64, 256, 512]))]
        else:
            chunks = [(rng.randrange(100, 3000), 1) for _ in range(rng.choice([1, 4, 16]))]
        samples.append((chunks, truth.step_time(chunks)))
    fitted = P.fit_cost_model(samples)
    for k, v in truth.coef.items():
        assert fitted.coef[k] == pytest.approx(v, rel=1e-6, abs=1e-9)
    assert fitted.fit["r2"] == pytest.approx(1.0)
    again = P.CostModel.from_dict(json.loads(json.dumps({"cost_model": fitted.to_dict()})))
    assert again.coef == fitted.coef


def test_report_lists_every_policy_and_pool(mooncake, cost, tmp_path):
    fractions = (0.05, 0.25)
    w = P.run_workload(mooncake, cost, fractions=fractions, log=lambda m: None)
    res = {"setup": {"date": "today", "block_size": P.BLOCK_SIZE, "max_num_seqs": P.MAX_NUM_SEQS,
                     "max_prefill_tokens": P.MAX_PREFILL_TOKENS, "load": 0.8, "wall_s": 1.0},
           "cost_model": cost.to_dict(), "workloads": [w], "recommendation": P.recommend([w]),
           "validation": {"num_requests": 40, "prompt_tokens": 1000, "interval_s": 1.0, "num_blocks": 200,
                          "measured": dict.fromkeys(("ttft_p50_s", "ttft_p90_s", "total_s", "hit_rate"), 1.0),
                          "predicted": dict.fromkeys(("ttft_p50_s", "ttft_p90_s", "total_s", "hit_rate"), 0.9),
                          "relative_error": dict.fromkeys(("ttft_p50_s", "ttft_p90_s", "total_s", "hit_rate"), -0.1),
                          "steps": {"num_steps": 9, "measured_s": 9.0, "cost_model_s": 8.0, "ratio_p10": 1.0,
                                    "ratio_p50": 1.1, "ratio_p90": 1.2}, "load_average": [1.0, 1.5]}}
    pools = ["5%", "25%", "unbounded"]
    assert {(c["policy"], c["pool"]) for c in w["cells"]} == {(p, q) for p, _, _ in P.POLICIES for q in pools}
    for c in w["cells"]:
        for key in ("hit_rate", "ttft_p50_s", "ttft_p90_s", "ttft_p95_s", "ttft_p99_s", "slo_violations"):
            assert c[key] >= 0
    unbounded = [c for c in w["cells"] if c["pool"] == "unbounded"]
    assert all(c["hit_rate"] == pytest.approx(mooncake.info["optimum_hit_rate"]) for c in unbounded)
    assert w["target"]["measured"] and w["target"]["pool"] in pools
    md = P.to_markdown(res)
    for name, _, _ in P.POLICIES:
        for pool in pools:
            assert f"| {pool} | {name} |" in md
    assert "defaults: eviction=" in md and "| TTFT p90 (s) | 1.00 | 0.90 | -10.0% |" in md
    js, md_path = P.write(res, tmp_path, log=lambda m: None)
    assert json.loads(js.read_text())["workloads"][0]["cells"] and md_path.read_text() == md
