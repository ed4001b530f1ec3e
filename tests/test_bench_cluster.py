"""`promptstash bench cluster`: the pure parts (where prompt tokens came from, from two /v1/cache/stats documents;
per-run summaries; affinity keys; the Markdown) without servers, and one smoke run of the whole bench on a tiny
model (3 replicas, a Redis Cluster and HAProxy; slow)."""

from __future__ import annotations

import json

import pytest

from promptstash.bench import cluster
from promptstash.bench.workloads import BenchRequest


def stats(prompt: int, cached: int, loaded: int, *, requests: int = 0, writes: int = 0, block_size: int = 16,
          completion: int = 0) -> dict:
    """A /v1/cache/stats document (admin view) with the fields the bench reads."""
    return {"num_requests": requests, "prompt_tokens": prompt, "cached_tokens": cached,
            "completion_tokens": completion, "pool": {"block_size": block_size, "used": 0},
            "tiers": [{"name": "redis", "num_loaded_blocks": loaded, "num_hits": loaded, "num_misses": 0,
                       "num_writes": writes, "num_failed_reads": 0, "num_failed_writes": 0}]}


def test_source_split_is_the_difference_of_two_snapshots() -> None:
    before = stats(1000, 400, 5, requests=3, writes=10)
    after = stats(2000, 1000, 15, requests=7, writes=30, completion=64)
    split = cluster.source_split(before, after)
    assert split["num_requests"] == 4
    assert split["prompt_tokens"] == 1000 and split["cached_tokens"] == 600
    assert split["redis_tokens"] == 10 * 16 and split["redis_loaded_blocks"] == 10
    assert split["pool_tokens"] == 600 - 160
    assert split["computed_tokens"] == 400
    assert split["redis_writes"] == 20 and split["completion_tokens"] == 64
    assert split["pool_tokens"] + split["redis_tokens"] + split["computed_tokens"] == split["prompt_tokens"]
    assert cluster.shares(split) == pytest.approx({"pool": 0.44, "redis": 0.16, "computed": 0.40})


def test_source_split_caps_redis_at_the_cached_tokens_and_takes_the_block_size() -> None:
    # more loaded than counted as cached (a loaded copy dropped because a request computed it meanwhile)
    split = cluster.source_split(stats(0, 0, 0, block_size=32), stats(100, 40, 3, block_size=32))
    assert split["redis_tokens"] == 40 and split["pool_tokens"] == 0 and split["computed_tokens"] == 60
    assert split["block_size"] == 32


def test_source_split_without_a_tier_and_of_an_idle_replica() -> None:
    before, after = stats(0, 0, 0), stats(50, 32, 0)
    before["tiers"] = after["tiers"] = []
    split = cluster.source_split(before, after)
    assert split["redis_tokens"] == 0 and split["pool_tokens"] == 32 and split["computed_tokens"] == 18
    idle = cluster.source_split(stats(10, 5, 1), stats(10, 5, 1))
    assert idle["prompt_tokens"] == 0 and cluster.shares(idle) == {"pool": 0.0, "redis": 0.0, "computed": 0.0}


def test_add_splits_sums_replicas() -> None:
    a = cluster.source_split(stats(0, 0, 0), stats(100, 50, 1))
    b = cluster.source_split(stats(0, 0, 0), stats(300, 100, 2))
    total = cluster.add_splits([a, b])
    assert total["prompt_tokens"] == 400 and total["redis_tokens"] == 48 and total["pool_tokens"] == 102
    assert total["block_size"] == 16
    assert cluster.add_splits([]) == {}


def test_latency_percentiles() -> None:
    assert cluster.latency([]) == {"p50": None, "p90": None, "max": None}
    lat = cluster.latency([float(x) for x in range(1, 11)])
    assert lat["p50"] == pytest.approx(5.5) and lat["p90"] == pytest.approx(9.1) and lat["max"] == 10.0


def record(i: int, replica: str, prompt: int, cached: int, ttft: float, *, status: int = 200,
           error: str | None = None) -> dict:
    return {"index": i, "label": f"r{i}", "key": None, "status": status, "replica": replica, "prompt_tokens": prompt,
            "cached_tokens": cached, "completion_tokens": 16 if status == 200 else 0, "ttft_s": ttft, "e2e_s": ttft,
            "error": error, "start_s": 0.0, "end_s": ttft}


def a_run() -> tuple[list[dict], dict[str, dict]]:
    records = [record(0, "replica1", 100, 0, 1.0), record(1, "replica2", 100, 64, 0.2),
               record(2, "replica1", 100, 96, 0.1), record(3, "replica2", 100, 96, 0.3)]
    splits = {"replica1": cluster.source_split(stats(0, 0, 0), stats(200, 96, 0, requests=2)),
              "replica2": cluster.source_split(stats(0, 0, 0), stats(200, 160, 4, requests=2)),
              "replica3": cluster.source_split(stats(5, 0, 0), stats(5, 0, 0))}
    return records, splits


def test_summarize_run_per_replica_and_totals() -> None:
    records, splits = a_run()
    s = cluster.summarize_run(records, splits, wall_s=2.0)
    assert s["requests"] == 4 and s["ok"] == 4 and s["errors"] == 0
    assert s["requests_per_s"] == 2.0 and s["output_tokens_per_s"] == 32.0
    assert s["ttft_p50_s"] == pytest.approx(0.25)
    assert s["usage_prompt_tokens"] == 400 and s["usage_cached_tokens"] == 256 and s["stats_match_usage"]
    assert s["totals"]["redis_tokens"] == 64 and s["totals"]["pool_tokens"] == 192
    assert s["shares"] == pytest.approx({"pool": 0.48, "redis": 0.16, "computed": 0.36})
    assert list(s["replicas"]) == ["replica1", "replica2", "replica3"]
    assert [v["requests"] for v in s["replicas"].values()] == [2, 2, 0]
    assert s["replicas"]["replica2"]["shares"]["redis"] == pytest.approx(0.32)
    assert s["replicas"]["replica3"]["ttft_s"]["p50"] is None


def test_summarize_run_counts_errors_and_flags_a_mismatch() -> None:
    records, splits = a_run()
    records.append(record(4, "replica1", 0, 0, 0.0, status=503, error="HTTP 503: busy"))
    records.append(record(5, None, 0, 0, 0.0, status=None, error="ConnectError: refused"))
    s = cluster.summarize_run(records, splits, wall_s=2.0)
    assert s["errors"] == 2 and s["ok"] == 4 and s["stats_match_usage"]
    splits["replica1"]["prompt_tokens"] += 1
    assert not cluster.summarize_run(records, splits, wall_s=2.0)["stats_match_usage"]


def test_routing_figures_follow_ups_and_cold_requests() -> None:
    def rec(i: int, key: str | None, replica: str, cached: int, start: float, end: float) -> dict:
        return record(i, replica, 100, cached, 0.1) | {"key": key, "start_s": start, "end_s": end}

    records = [rec(0, "a", "replica1", 0, 0.0, 2.0), rec(1, "b", "replica2", 0, 0.0, 1.0),
               rec(2, "a", "replica1", 16, 1.0, 3.0),  # same replica, sent while request 0 still ran
               rec(3, "b", "replica3", 0, 2.5, 4.0),  # moved; cold after the first request finished
               rec(4, "a", "replica2", 32, 3.5, 5.0)]  # moved
    f = cluster.routing_figures(records)
    assert f["follow_ups"] == {"total": 3, "same_replica": 1, "overlapping": 1}
    assert f["keys"] == 2
    assert f["cold"] == {"requests": 3, "replicas": ["replica1", "replica2", "replica3"], "first_wave": 2}
    none = cluster.routing_figures([rec(0, None, "replica1", 0, 0.0, 1.0)])
    assert none["follow_ups"]["total"] == 0 and none["keys"] == 0 and none["cold"]["first_wave"] == 1
    assert cluster.routing_figures([])["cold"]["requests"] == 0


def test_cpu_used_by_other_processes() -> None:
    assert cluster.other_cpu(100.0, 10.0, 160.0, 50.0, 40.0) == {"cpu_s": 20.0, "cores": 0.5}
    assert cluster.other_cpu(100.0, 10.0, 120.0, 50.0, 40.0)["cpu_s"] == 0.0  # never negative
    assert cluster.other_cpu(None, 0.0, None, 0.0, 1.0) == {"cpu_s": None, "cores": None}
    assert cluster.own_pids()[0] > 0 and cluster.process_cpu_s(cluster.own_pids()) >= 0.0


def test_affinity_keys() -> None:
    chat = BenchRequest([{"role": "user", "content": "hi"}], "conv 12 turn 3")
    assert cluster.affinity_key("chat", chat) == "conv-12"
    assert cluster.affinity_key("system-prompt", BenchRequest([], "mt_bench 4")) is None
    with pytest.raises(cluster.ClusterBenchError):
        cluster.conversation_key(BenchRequest([], "mt_bench 4"))


def need_data() -> None:
    from promptstash.bench.workloads import DataNotFoundError, data_dir

    try:
        data_dir()
    except DataNotFoundError as exc:
        pytest.skip(str(exc))


def test_the_chat_workload_labels_give_conversation_keys() -> None:
    need_data()
    from promptstash.bench.workloads import build

    keys = [cluster.affinity_key("chat", r) for r in build("chat", 12).requests]
    assert len(set(keys)) > 1 and all(k.startswith("conv-") for k in keys)


def fake_result() -> dict:
    runs = []
    for workload in ("chat", "system-prompt"):
        for config, num, affinity in cluster.CONFIGS:
            records, splits = a_run()
            if num == 1:
                splits = {"replica1": splits["replica1"]}
                records = [r | {"replica": "replica1"} for r in records[::2]]
            s = cluster.summarize_run(records, splits, wall_s=2.0)
            runs.append({"workload": workload, "config": config, "num_replicas": num, "affinity": affinity, "salt": "x",
                         **s, "records": records})
    return {"setup": {"command": "promptstash bench cluster --requests 4", "date": "2026-01-01", "model": "m@1",
                      "weights": "int8", "dtype": "float32", "tiny": False, "replicas": 3, "threads_per_replica": 1,
                      "redis": "3-master Redis Cluster", "requests": 4, "concurrency": 4, "max_tokens": 16,
                      "configs": [c[0] for c in cluster.CONFIGS],
                      "affinity_keys": {"chat": "conv", "system-prompt": "none"}, "haproxy": "cfg"},
            "machine": {"cpu": "CPU X", "cpus": 2, "torch": "2", "load_average_before": [0.1, 0.1, 0.1],
                        "load_average_after": [1.0, 1.0, 1.0]},
            "workloads": {"chat": {"description": "chats."}, "system-prompt": {"description": "one prompt"}},
            "startup_s": 60.0, "bench_s": 100.0, "elapsed_s": 170.0, "errors": 0, "runs": runs}


def test_markdown_has_every_run_every_replica_and_findings() -> None:
    md = cluster.to_markdown(fake_result())
    assert "timings are disturbed" not in md
    res = fake_result()
    res["machine"] |= {"other_processes_cpu_s": 50.0, "other_processes_cores": 0.5}
    assert "used 50 CPU-seconds while the runs went on (0.50 cores on average, so timings are disturbed)" in (
        cluster.to_markdown(res))
    assert "CPU X" in md and "`promptstash bench cluster --requests 4`" in md and "`m@1` (int8 weights" in md
    runs = md.split("## Runs")[1].split("## Per replica")[0]
    assert runs.count("| chat |") == 3 and runs.count("| system-prompt |") == 3
    assert "| chat | 3 replicas, affinity | 2/2/0 | 400 | 192 (48%) | 64 (16%) | 144 (36%) | 0.25 |" in runs
    per = md.split("## Per replica")[1].split("## What this shows")[0]
    assert per.count("| replica2 |") == 4 and "| 2 | 200 | 96 (48%) | 64 (32%) | 40 (20%) | 80% | 4 / 0 |" in per
    shows = md.split("## What this shows")[1]
    assert "**chat**" in shows and "**system-prompt**" in shows and "split 2/2/0" in shows
    assert "cached share of prompt tokens 48% / 64% / 64%, of which from Redis 0% / 16% / 16%" in shows
    assert "Requests that found nothing cached: 1 / 1 / 1" in shows
    assert "usage differ" not in shows
    assert "One replica computes with 1 torch thread (at most 1 of the machine's 2 cores busy)" in shows
    assert "3 threads sharing the 2 cores" in shows
    assert "Workloads: chat: chats; system-prompt: one prompt." in md
    json.dumps(fake_result())  # the result is plain JSON


def test_findings_report_a_mismatch() -> None:
    res = fake_result()
    res["runs"][0]["stats_match_usage"] = False
    assert any("differ in: chat | 1 replica" in f for f in cluster.findings(res))


def test_write(tmp_path) -> None:
    js, md = cluster.write(fake_result(), tmp_path)
    assert js.name == "cluster.json" and md.name == "cluster.md"
    assert json.loads(js.read_text())["setup"]["replicas"] == 3 and md.read_text().startswith("# Scale-out")


def test_summary_page_has_a_cluster_section(tmp_path) -> None:
    from promptstash.bench import summary

    assert "Scale-out" not in summary.render(tmp_path)
    cluster.write(fake_result(), tmp_path)
    page = summary.render(tmp_path)
    assert "bench cluster" in page and "[cluster.md](cluster.md)" in page


@pytest.mark.slow
def test_bench_cluster_smoke_on_a_tiny_model(tmp_path) -> None:
    """3 tiny replicas, a Redis Cluster and HAProxy: every run answers, and the figures add up (~20 s)."""
    from promptstash.deploy.haproxy import haproxy_binary
    from promptstash.deploy.local import redis_cli_binary, redis_server_binary

    if haproxy_binary() is None or redis_server_binary() is None or redis_cli_binary() is None:
        pytest.skip("haproxy / redis-server are not installed (`make test` installs them)")
    need_data()
    res = cluster.run(cluster.ClusterOptions(requests=4, tiny=True, out=str(tmp_path)), log=lambda _: None)
    assert res["errors"] == 0 and len(res["runs"]) == 8  # 2 workloads x 3 configurations + 2 prefix-in-Redis runs
    for r in res["runs"]:
        assert r["ok"] == 4 and r["stats_match_usage"], (r["workload"], r["config"])
        t = r["totals"]
        assert t["pool_tokens"] + t["redis_tokens"] + t["computed_tokens"] == t["prompt_tokens"] > 0
        assert sum(v["requests"] for v in r["replicas"].values()) == 4
        if r["num_replicas"] == 1:
            assert set(r["replicas"]) == {"replica1"}
    rr = next(r for r in res["runs"] if r["workload"] == "chat" and not r["affinity"])
    assert sorted(v["requests"] for v in rr["replicas"].values()) == [1, 1, 2]  # round robin
    warm = next(r for r in res["runs"] if r["prefix_in_redis"] and not r["affinity"])
    assert warm["totals"]["redis_tokens"] > 0  # replicas that did not compute the system prompt read it from Redis
    assert "## What this shows" in cluster.to_markdown(res)


def test_a_chat_turn_waits_for_its_conversations_previous_turn_and_others_go_ahead() -> None:
    requests = [BenchRequest([], label) for label in ("conv 0 turn 1", "conv 1 turn 1", "conv 0 turn 2",
                                                      "conv 2 turn 1")]
    pending = [0, 1, 2, 3]
    busy: set[str] = set()
    assert cluster.next_ready(pending, requests, "chat", busy) == 0
    busy.add("conv-0")
    assert cluster.next_ready(pending, requests, "chat", busy) == 1
    busy.add("conv-1")
    assert cluster.next_ready(pending, requests, "chat", busy) == 3  # conv 0 turn 2 waits for turn 1
    assert pending == [2]
    assert cluster.next_ready(pending, requests, "chat", busy) is None
    busy.discard("conv-0")
    assert cluster.next_ready(pending, requests, "chat", busy) == 2
    system = [BenchRequest([], "question 1"), BenchRequest([], "question 2")]
    assert cluster.next_ready([0, 1], system, "system-prompt", {"anything"}) == 0  # no conversation: never waits
