"""`promptstash bench cluster`: the `chat` and `system-prompt` workloads against one replica and against three
replicas behind HAProxy, with affinity routing on and off (round robin).

One local deployment (promptstash.deploy.local.LocalDeployment: a 3-master Redis Cluster as the shared KV tier,
three `promptstash serve` replicas, HAProxy in front) serves every run; between configurations only HAProxy is
restarted (`set_routing`): "1 replica" routes to replica1 alone. Each (configuration, workload) run sends all its
requests with its own `cache_salt` (part of every block hash), so every run starts cold in the pools and in Redis
while the replicas stay up. Requests are replayed closed-loop in the workload's order, `concurrency` in flight, the
same in every configuration; a chat turn is sent only after its conversation's previous turn has been answered
(as its user would), the next ready request going ahead meanwhile.

Where the prompt tokens came from, per replica, is read from each replica's GET /v1/cache/stats before and after a
run (the deltas):

    from Redis = delta(tiers["redis"].num_loaded_blocks) x block_size   (blocks copied from Redis into the pool)
    from pool  = delta(cached_tokens) - from Redis                       (already in this replica's pool)
    computed   = delta(prompt_tokens) - delta(cached_tokens)

Which replica answered comes from each response's `x-promptstash-replica` header. Affinity keys: a `chat` request
carries `prompt_cache_key` = its conversation ("conv N"), as a client keying each conversation would; a
`system-prompt` request carries none, so HAProxy hashes the start of the shared system prompt (one replica, unless
`hash-balance-factor` sends the overflow elsewhere).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from promptstash.bench.report import cpu_name, percentile, write_results
from promptstash.bench.workloads import BenchRequest, _sse_events, build
from promptstash.errors import PromptstashError

WORKLOADS = ("chat", "system-prompt")
# (name, replicas routed to, affinity routing)
CONFIGS: tuple[tuple[str, int, bool], ...] = (
    ("1 replica", 1, True), ("3 replicas, affinity", 3, True), ("3 replicas, round robin", 3, False))
# steady state for a shared prefix: before the run, one request has computed the system prompt on one replica and
# its blocks are in Redis (as when traffic has been flowing, or a replica joins or restarts); system-prompt only
WARM_CONFIGS: tuple[tuple[str, int, bool], ...] = (
    ("3 replicas, affinity, prefix in Redis", 3, True), ("3 replicas, round robin, prefix in Redis", 3, False))
WARM_WORKLOAD = "system-prompt"
NUM_REPLICAS = 3
REPLICA_HEADER = "x-promptstash-replica"
SOURCES = ("pool", "redis", "computed")


class ClusterBenchError(PromptstashError):
    """The cluster benchmark could not measure (a replica's stats, a routing it cannot set up)."""


@dataclass
class ClusterOptions:
    requests: int = 20  # per run
    concurrency: int = 4
    max_tokens: int = 16
    model: str | None = None  # every replica's --model (default: the default model)
    tiny: bool = False  # a tiny random-weight model (smoke runs: routing and counting, not the model)
    workloads: Sequence[str] = WORKLOADS
    out: str = "benchmarks/results"


# -- pure parts: source split, summaries -----------------------------------------------------------------------
def _tier(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next((t for t in doc.get("tiers") or () if t.get("name") == name), {})


def source_split(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Where one replica's prompt tokens came from between two /v1/cache/stats documents (admin view: totals,
    "pool" and "tiers"): pool / redis / computed tokens, with the Redis tier's counters as deltas.

    Tokens from a tier = blocks it loaded into the pool x block size (capped at the cached tokens); the rest of the
    cached tokens were already in the pool. A block loaded from Redis that a second request then reads from the
    pool counts once as Redis and once as pool, which is what happened."""
    bs = int(after.get("pool", {}).get("block_size") or before.get("pool", {}).get("block_size") or 16)

    def delta(key: str) -> int:
        return int(after.get(key, 0)) - int(before.get(key, 0))

    prompt, cached = delta("prompt_tokens"), delta("cached_tokens")
    names = [t.get("name") for t in after.get("tiers") or ()]
    tiers: dict[str, dict[str, int]] = {}
    for name in names:
        a, b = _tier(after, name), _tier(before, name)
        tiers[name] = {k: int(a.get(k, 0)) - int(b.get(k, 0))
                       for k in ("num_loaded_blocks", "num_hits", "num_misses", "num_writes", "num_failed_reads",
                                 "num_failed_writes")}
    tier_tokens = {name: t["num_loaded_blocks"] * bs for name, t in tiers.items()}
    from_tiers = min(sum(tier_tokens.values()), cached)
    redis = min(tier_tokens.get("redis", 0), from_tiers)
    redis_tier = tiers.get("redis", {})
    return {"num_requests": delta("num_requests"), "prompt_tokens": prompt, "cached_tokens": cached,
            "pool_tokens": cached - from_tiers, "redis_tokens": redis, "other_tier_tokens": from_tiers - redis,
            "computed_tokens": prompt - cached, "completion_tokens": delta("completion_tokens"), "block_size": bs,
            "redis_loaded_blocks": redis_tier.get("num_loaded_blocks", 0),
            "redis_hits": redis_tier.get("num_hits", 0), "redis_misses": redis_tier.get("num_misses", 0),
            "redis_writes": redis_tier.get("num_writes", 0),
            "redis_failures": redis_tier.get("num_failed_reads", 0) + redis_tier.get("num_failed_writes", 0)}


def shares(split: dict[str, Any]) -> dict[str, float]:
    """pool / redis / computed as fractions of the prompt tokens (0 when there were none)."""
    prompt = split.get("prompt_tokens", 0)
    return {s: (split.get(f"{s}_tokens", 0) / prompt if prompt else 0.0) for s in SOURCES}


def add_splits(splits: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The sum of several replicas' source splits (block_size kept)."""
    out: dict[str, Any] = {}
    for s in splits:
        for k, v in s.items():
            if k != "block_size":
                out[k] = out.get(k, 0) + v
    if splits:
        out["block_size"] = splits[0].get("block_size")
    return out


def latency(values: Sequence[float]) -> dict[str, float | None]:
    """p50 / p90 / max of a list of seconds (None when empty)."""
    if not values:
        return {"p50": None, "p90": None, "max": None}
    return {"p50": percentile(values, 50), "p90": percentile(values, 90), "max": max(values)}


def summarize_run(records: Sequence[dict[str, Any]], splits: dict[str, dict[str, Any]], wall_s: float
                  ) -> dict[str, Any]:
    """One run's figures from its per-request records (replica, status, usage, ttft_s) and the per-replica source
    splits of the stats: totals, TTFT p50/p90, requests/s, output tokens/s, and one row per replica."""
    ok = [r for r in records if r.get("status") == 200 and not r.get("error")]
    total = add_splits(list(splits.values()))
    wall = max(wall_s, 1e-9)
    completion = sum(r.get("completion_tokens", 0) for r in ok)
    per_replica = {}
    for name in sorted(set(splits) | {r.get("replica") for r in ok if r.get("replica")}):
        mine = [r for r in ok if r.get("replica") == name]
        split = splits.get(name, {})
        per_replica[name] = {
            "requests": len(mine), "usage_prompt_tokens": sum(r["prompt_tokens"] for r in mine),
            "usage_cached_tokens": sum(r["cached_tokens"] for r in mine), **split,
            "shares": shares(split), "ttft_s": latency([r["ttft_s"] for r in mine])}
    ttft = latency([r["ttft_s"] for r in ok])
    usage_prompt = sum(r["prompt_tokens"] for r in ok)
    usage_cached = sum(r["cached_tokens"] for r in ok)
    return {
        "requests": len(records), "ok": len(ok), "errors": len(records) - len(ok),
        "wall_s": wall_s, "requests_per_s": len(ok) / wall, "output_tokens_per_s": completion / wall,
        "completion_tokens": completion, "ttft_p50_s": ttft["p50"], "ttft_p90_s": ttft["p90"],
        "usage_prompt_tokens": usage_prompt, "usage_cached_tokens": usage_cached,
        "hit_rate": usage_cached / usage_prompt if usage_prompt else 0.0,
        "totals": total, "shares": shares(total),
        # the stats deltas and the responses' usage should tell the same story
        "stats_match_usage": (total.get("prompt_tokens") == usage_prompt
                              and total.get("cached_tokens") == usage_cached),
        "replicas": per_replica, **routing_figures(ok),
    }


def routing_figures(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How requests met the caches (answered requests): `cold` = those that found nothing cached (on which
    replicas; how many were sent before any request of the run had finished), `follow_ups` = requests whose
    affinity key an earlier request carried (how many went to the replica of that previous request; how many were
    sent while it was still running)."""
    first_end = min((r["end_s"] for r in records), default=0.0)
    cold = [r for r in records if r["cached_tokens"] == 0]
    follow = {"total": 0, "same_replica": 0, "overlapping": 0}
    last: dict[str, dict[str, Any]] = {}
    for r in sorted(records, key=lambda r: r["index"]):
        key = r.get("key")
        if key is None:
            continue
        if key in last:
            prev = last[key]
            follow["total"] += 1
            follow["same_replica"] += r["replica"] == prev["replica"]
            follow["overlapping"] += r["start_s"] < prev["end_s"]
        last[key] = r
    return {"cold": {"requests": len(cold), "replicas": sorted({r["replica"] for r in cold}),
                     "first_wave": sum(r["start_s"] < first_end for r in cold)},
            "follow_ups": follow, "keys": len(last)}


def conversation_key(req: BenchRequest) -> str:
    """The conversation of a chat request ("conv N turn M" -> "conv-N"): its prompt_cache_key."""
    m = re.match(r"conv (\d+) turn \d+$", req.label)
    if m is None:
        raise ClusterBenchError(f"cannot tell the conversation of chat request {req.label!r}")
    return f"conv-{m.group(1)}"


def affinity_key(workload: str, req: BenchRequest) -> str | None:
    """prompt_cache_key per request: chat = its conversation; system-prompt = none (HAProxy hashes the system
    prompt's start)."""
    return conversation_key(req) if workload == "chat" else None


# -- sending -------------------------------------------------------------------------------------------------
def _send(client: Any, base: str, model: str, req: BenchRequest, max_tokens: int, salt: str,
          key: str | None) -> dict[str, Any]:
    """One streamed chat request. Returns status, replica (response header), usage and TTFT; an HTTP error or an
    error event comes back as `error` (never raised)."""
    body: dict[str, Any] = {"model": model, "messages": req.prompt, "max_tokens": max_tokens, "temperature": 0.0,
                            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                            "cache_salt": salt}
    if key is not None:
        body["prompt_cache_key"] = key
    out: dict[str, Any] = {"status": None, "replica": None, "prompt_tokens": 0, "cached_tokens": 0,
                           "completion_tokens": 0, "ttft_s": None, "e2e_s": None, "error": None}
    start = time.perf_counter()
    try:
        with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
            out["status"], out["replica"] = r.status_code, r.headers.get(REPLICA_HEADER)
            if r.status_code != 200:
                r.read()
                out["error"] = f"HTTP {r.status_code}: {r.text[:300]}"
                return out
            usage = None
            for event in _sse_events(r):
                if "error" in event:
                    out["error"] = f"error event: {str(event['error'])[:300]}"
                for choice in event.get("choices") or ():
                    text = choice.get("delta", {}).get("content")
                    if out["ttft_s"] is None and (text or choice.get("finish_reason")):
                        out["ttft_s"] = time.perf_counter() - start
                usage = event.get("usage") or usage
    except Exception as exc:  # noqa: BLE001 - a failed request is counted, the run goes on
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    out["e2e_s"] = time.perf_counter() - start
    if out["ttft_s"] is None:
        out["ttft_s"] = out["e2e_s"]
    if usage is None:
        out["error"] = out["error"] or "no usage in the stream"
        return out
    out["prompt_tokens"] = usage["prompt_tokens"]
    out["cached_tokens"] = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    out["completion_tokens"] = usage.get("completion_tokens", 0)
    return out


def next_ready(pending: list[int], requests: Sequence[BenchRequest], workload: str, busy: set[str]) -> int | None:
    """The first pending request (in workload order) whose conversation has no request in flight, or None.

    NOTE: a user sends a conversation's next turn after reading the previous answer, so a chat turn never
    overtakes or overlaps an earlier turn of its conversation; requests without a conversation never wait.
    """
    for position, i in enumerate(pending):
        key = affinity_key(workload, requests[i])
        if key is None or key not in busy:
            return pending.pop(position)
    return None


def replay(base: str, model: str, workload: str, requests: Sequence[BenchRequest], *, salt: str, concurrency: int,
           max_tokens: int, timeout_s: float = 600.0) -> tuple[list[dict[str, Any]], float]:
    """Send `requests` in order, `concurrency` in flight (closed loop; a chat turn waits for its conversation's
    previous turn, see next_ready). Returns (records by index, wall seconds)."""
    import httpx

    pending = list(range(len(requests)))
    busy: set[str] = set()
    ready = threading.Condition()
    records: list[dict[str, Any]] = []
    with httpx.Client(timeout=timeout_s) as client:
        t0 = time.perf_counter()

        def worker() -> None:
            while True:
                with ready:
                    while (i := next_ready(pending, requests, workload, busy)) is None:
                        if not pending:
                            return
                        ready.wait()
                    req = requests[i]
                    key = affinity_key(workload, req)
                    if key is not None:
                        busy.add(key)
                start = time.perf_counter() - t0
                try:
                    r = _send(client, base, model, req, max_tokens, salt, key)
                finally:
                    with ready:
                        busy.discard(key or "")
                        ready.notify_all()
                with ready:
                    records.append({"index": i, "label": req.label, "key": key, **r, "start_s": start,
                                    "end_s": time.perf_counter() - t0})

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, concurrency))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    return sorted(records, key=lambda r: r["index"]), wall


def _stats(url: str) -> dict[str, Any]:
    import httpx

    r = httpx.get(f"{url}/v1/cache/stats", timeout=30)
    if r.status_code != 200 or "pool" not in r.json():
        raise ClusterBenchError(f"{url}/v1/cache/stats answered {r.status_code} without the pool and tiers "
                                f"(a replica with API keys needs an admin key): {r.text[:300]}")
    return r.json()


def _settle_writes(replicas: Sequence[Any], timeout_s: float = 60.0) -> None:
    """Wait until no replica's count of Redis writes moves (its write-through queue is drained)."""
    last: list[int] | None = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = [int(_tier(_stats(r.url), "redis").get("num_writes", 0)) for r in replicas]
        if now == last:
            return
        last = now
        time.sleep(0.5)
    raise ClusterBenchError("the replicas' Redis writes did not settle")


def _compute_prefix_once(base: str, model: str, req: BenchRequest, salt: str, replicas: Sequence[Any]) -> str:
    """Send one request of the run (its salt) through HAProxy and wait for its blocks to reach Redis; the replica
    that computed it."""
    import httpx

    with httpx.Client(timeout=300) as client:
        got = _send(client, base, model, req, 1, salt, None)
    if got["error"]:
        raise ClusterBenchError(f"the request computing the shared prefix failed: {got['error']}")
    _settle_writes(replicas)
    return str(got["replica"])


def _warm_up(replicas: Sequence[Any], model: str, log: Callable[[str], None]) -> None:
    """One short request to each replica directly (its own salt): first-call costs out of the measured runs."""
    import httpx

    req = BenchRequest([{"role": "user", "content": "Say hello."}], "warm-up")
    with httpx.Client(timeout=300) as client:
        for r in replicas:
            got = _send(client, r.url, model, req, 4, f"warm-up-{uuid.uuid4().hex}", None)
            if got["error"]:
                raise ClusterBenchError(f"warm-up request to {r.name} failed: {got['error']}")
    log(f"warmed up {len(replicas)} replicas")


# -- the run -------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "cpu": cpu_name(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}


def command(options: ClusterOptions) -> str:
    extra = (f" --model {options.model}" if options.model else "") + (" --tiny" if options.tiny else "")
    return (f"promptstash bench cluster --requests {options.requests} --concurrency {options.concurrency} "
            f"--max-tokens {options.max_tokens}{extra} --out {options.out}")


def _clock_ticks() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):
        return 100


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat; None elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / _clock_ticks()


def process_cpu_s(pids: Sequence[int]) -> float:
    """CPU seconds (user + system, all threads) that these live processes have used (/proc/PID/stat)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, ValueError, IndexError):
            continue
    return total / _clock_ticks()


def own_pids(root: int | None = None) -> list[int]:
    """This process and its descendants (the replicas, Redis, HAProxy): /proc/PID/task/TID/children."""
    todo, seen = [root or os.getpid()], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split() if int(c) not in seen]
            except (OSError, ValueError):
                continue
    return seen


def other_cpu(busy_before: float | None, own_before: float, busy_after: float | None, own_after: float,
              wall_s: float) -> dict[str, float | None]:
    """CPU used by processes outside the bench while it ran: machine busy time minus the bench's own (this process,
    the replicas, Redis, HAProxy)."""
    if busy_before is None or busy_after is None:
        return {"cpu_s": None, "cores": None}
    other = max(0.0, (busy_after - busy_before) - (own_after - own_before))
    return {"cpu_s": other, "cores": other / wall_s if wall_s > 0 else None}


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run(options: ClusterOptions | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Start the deployment (3 replicas, Redis Cluster, HAProxy), run every workload in every configuration, and
    return the result (see to_markdown). Failed requests are counted in each run's `errors` (the CLI fails)."""
    from promptstash.deploy.local import LocalDeployment, served_format

    options = options or ClusterOptions()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="promptstash-bench-cluster-"))
    serve_args: list[str] = []
    if options.tiny:
        from promptstash.bench.soak import make_tiny_model

        log("building a tiny random-weight model with the default tokenizer ...")
        serve_args += ["--model", str(make_tiny_model(work / "tiny-model")), "--weights", "float32",
                       "--dtype", "float32"]
    elif options.model:
        serve_args += ["--model", options.model]
    workloads = {name: build(name, options.requests) for name in options.workloads}
    load_before = _load_average()
    deployment = LocalDeployment(NUM_REPLICAS, work_dir=work, port=0, redis_url="cluster",
                                 serve_args=serve_args, log=lambda m: log(f"deploy: {m}"))
    runs: list[dict[str, Any]] = []
    ok = False
    try:
        log(f"starting {NUM_REPLICAS} replicas, a Redis Cluster and HAProxy (logs in {work}) ...")
        t = time.perf_counter()
        deployment.start()
        startup_s = time.perf_counter() - t
        import httpx

        model = httpx.get(f"{deployment.url}/v1/models", timeout=30).json()["data"][0]["id"]
        weights, dtype = served_format(deployment.replicas[0].log_path.read_text(errors="replace"))
        _warm_up(deployment.replicas, model, log)
        bench_t0 = time.perf_counter()
        busy0, own0 = machine_busy_s(), process_cpu_s(own_pids())
        plan = [(c, False) for c in CONFIGS] + [(c, True) for c in WARM_CONFIGS]
        for (config, num, affinity), warm in plan:
            deployment.set_routing(affinity, num_replicas=num)
            routed = deployment.replicas[:num]
            for name, workload in workloads.items():
                if warm and name != WARM_WORKLOAD:
                    continue
                salt = f"bench-cluster-{uuid.uuid4().hex}"
                computed_by = None
                if warm:
                    computed_by = _compute_prefix_once(deployment.url, model, workload.requests[-1], salt, routed)
                before = {r.name: _stats(r.url) for r in routed}
                records, wall = replay(deployment.url, model, name, workload.requests, salt=salt,
                                       concurrency=options.concurrency, max_tokens=options.max_tokens)
                time.sleep(0.5)  # the last request's figures are recorded as its stream ends
                after = {r.name: _stats(r.url) for r in routed}
                splits = {r.name: source_split(before[r.name], after[r.name]) for r in routed}
                summary = summarize_run(records, splits, wall)
                runs.append({"workload": name, "config": config, "num_replicas": num, "affinity": affinity,
                             "prefix_in_redis": warm, "prefix_computed_by": computed_by, "salt": salt, **summary,
                             "records": records})
                spread = "/".join(str(summary["replicas"].get(r.name, {}).get("requests", 0)) for r in routed)
                sh = summary["shares"]
                log(f"[{name} | {config}] {summary['ok']}/{summary['requests']} ok in {wall:.1f} s; requests per "
                    f"replica {spread}; pool {sh['pool']:.0%} redis {sh['redis']:.0%} computed "
                    f"{sh['computed']:.0%}; TTFT p50 {summary['ttft_p50_s'] or 0:.2f} s")
                if summary["errors"]:
                    first = next(r["error"] for r in records if r.get("error") or r.get("status") != 200)
                    log(f"[{name} | {config}] {summary['errors']} requests FAILED; first: {first}")
        bench_s = time.perf_counter() - bench_t0
        # NOTE: HAProxy restarts between configurations; the CPU of the stopped ones counts as "other" (little)
        others = other_cpu(busy0, own0, machine_busy_s(), process_cpu_s(own_pids()), bench_s)
        ok = True
    finally:
        deployment.close()
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"bench cluster failed; replica, HAProxy and Redis logs kept in {work}")
    workload_info = {name: {"description": w.description, "num_requests": len(w.requests), **w.info}
                     for name, w in workloads.items()}
    return {
        "setup": {"command": command(options), "date": time.strftime("%Y-%m-%d"), "model": model,
                  "weights": weights, "dtype": dtype, "tiny": options.tiny, "replicas": NUM_REPLICAS,
                  "threads_per_replica": deployment.threads, "redis": "3-master Redis Cluster",
                  "requests": options.requests, "concurrency": options.concurrency,
                  "max_tokens": options.max_tokens, "configs": [c[0] for c in CONFIGS + WARM_CONFIGS],
                  "affinity_keys": {"chat": "prompt_cache_key = the conversation (\"conv-N\")",
                                    "system-prompt": "none: HAProxy hashes the first 1024 bytes of the system prompt"},
                  "haproxy": "deploy/haproxy.cfg: consistent hashing, hash-balance-factor 150"},
        "machine": {**machine(), "load_average_before": load_before, "load_average_after": _load_average(),
                    "other_processes_cpu_s": others["cpu_s"], "other_processes_cores": others["cores"]},
        "workloads": workload_info, "startup_s": startup_s, "bench_s": bench_s,
        "elapsed_s": time.perf_counter() - started,
        "errors": sum(r["errors"] for r in runs), "runs": runs,
    }


# -- the report ----------------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.0%}"


def _s(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _threads(s: dict[str, Any]) -> str:
    return f"{s['threads_per_replica']} torch thread{'s' if s['threads_per_replica'] != 1 else ''}"


def _others(m: dict[str, Any]) -> str:
    cores = m.get("other_processes_cores")
    if cores is None:
        return ""
    return (f"; processes outside the bench used {m['other_processes_cpu_s']:.0f} CPU-seconds while the runs went "
            f"on ({cores:.2f} cores on average{', so timings are disturbed' if cores >= 0.2 else ''})")


def _cell(split: dict[str, Any], source: str) -> str:
    """"1,234 (56%)": a source's tokens and its share of the prompt tokens."""
    return f"{split.get(f'{source}_tokens', 0):,} ({_pct(shares(split)[source])})"


def _find(res: dict[str, Any], workload: str, config: str) -> dict[str, Any] | None:
    return next((r for r in res["runs"] if r["workload"] == workload and r["config"] == config), None)


def findings(res: dict[str, Any]) -> list[str]:
    """"What this shows": sentences computed from the runs (nothing that is not in the numbers)."""
    out = []
    one, aff, rr = (c[0] for c in CONFIGS)
    for w in dict.fromkeys(r["workload"] for r in res["runs"]):
        a, b, c = _find(res, w, one), _find(res, w, aff), _find(res, w, rr)
        if not (a and b and c):
            continue
        runs = (a, b, c)
        hit = [r["shares"]["pool"] + r["shares"]["redis"] for r in runs]
        redis = [r["shares"]["redis"] for r in runs]
        loaded = [r["totals"].get("redis_loaded_blocks", 0) for r in runs]
        text = (f"**{w}** (one replica / three with affinity / three round robin): cached share of prompt tokens "
                f"{' / '.join(map(_pct, hit))}, of which from Redis {' / '.join(map(_pct, redis))} "
                f"({' / '.join(map(str, loaded))} blocks loaded); computed "
                + " / ".join(_pct(r["shares"]["computed"]) for r in runs) + ".")
        counts = [v["requests"] for v in b["replicas"].values()]
        used = sum(1 for n in counts if n)
        fb = b.get("follow_ups") or {}
        if fb.get("total"):
            text += (f" With affinity the requests split {'/'.join(map(str, counts))}; {fb['same_replica']} of "
                     f"{fb['total']} follow-up requests went to the replica that answered the previous request with "
                     f"the same prompt_cache_key ({fb['overlapping']} of them were sent while that previous request "
                     "was still running)")
            fc = c.get("follow_ups") or {}
            text += (f", vs {fc.get('same_replica', 0)} of {fc.get('total', 0)} round robin." if fc.get("total")
                     else ".")
        elif counts and sum(counts):
            text += (f" With affinity the requests (no prompt_cache_key: one affinity key for all) split "
                     f"{'/'.join(map(str, counts))}: {used} of {len(counts)} replicas used.")
        cold = [r.get("cold") or {} for r in runs]
        if all(cold):
            text += (f" Requests that found nothing cached: {' / '.join(str(x['requests']) for x in cold)}, on "
                     f"{' / '.join(str(len(x['replicas'])) for x in cold)} replica(s); "
                     f"{' / '.join(str(x['first_wave']) for x in cold)} of them were sent before any request of the "
                     "run had finished.")
        if not any(loaded[1:]):
            text += " Redis supplied no block to any replica in this workload."
        text += (f" TTFT p50 {' / '.join(_s(r['ttft_p50_s']) for r in runs)} s, p90 "
                 f"{' / '.join(_s(r['ttft_p90_s']) for r in runs)} s; throughput "
                 + " / ".join(f"{r['requests_per_s']:.2f}" for r in runs) + " requests/s.")
        out.append(text)
    cold_rr = _find(res, WARM_WORKLOAD, CONFIGS[2][0])
    for config, _, _ in WARM_CONFIGS:
        r = _find(res, WARM_WORKLOAD, config)
        if r is None or cold_rr is None:
            continue
        t, sh = r["totals"], r["shares"]
        out.append(f"**{WARM_WORKLOAD}, {config}** (one request computed the system prompt on "
                   f"{r.get('prefix_computed_by')} before the run, so its blocks were in Redis): from Redis "
                   f"{_pct(sh['redis'])} ({t.get('redis_loaded_blocks', 0)} blocks loaded), pool {_pct(sh['pool'])}, "
                   f"computed {_pct(sh['computed'])} (cold round robin: {_pct(cold_rr['shares']['computed'])}); TTFT "
                   f"p50 {_s(r['ttft_p50_s'])} s, p90 {_s(r['ttft_p90_s'])} s (cold round robin: "
                   f"{_s(cold_rr['ttft_p50_s'])} / {_s(cold_rr['ttft_p90_s'])} s).")
    s, cpus = res["setup"], res.get("machine", {}).get("cpus")
    threads = s.get("threads_per_replica")
    if threads and cpus and threads < cpus:
        out.append(f"One replica computes with {_threads(s)} (at most {threads} of the machine's {cpus} cores busy); "
                   f"three replicas have {threads * s['replicas']} threads sharing the {cpus} cores. The TTFT and "
                   "throughput differences between one and three replicas include that, and say nothing about "
                   "scale-out.")
    mismatched = [f"{r['workload']} | {r['config']}" for r in res["runs"] if not r.get("stats_match_usage")]
    if mismatched:
        out.append("The replicas' stats deltas and the responses' usage differ in: " + ", ".join(mismatched)
                   + " (see the JSON).")
    return out


def to_markdown(res: dict[str, Any]) -> str:
    s, m = res["setup"], res["machine"]
    lines = [
        f"# Scale-out: one replica vs three behind HAProxy ({s['date']})", "",
        f"Command: `{s['command']}`. Machine: {m['cpu']}, {m['cpus']} cores, torch {m['torch']}; load average "
        f"before {m.get('load_average_before')}, after {m.get('load_average_after')}{_others(m)}. Model `{s['model']}` "
        f"({s['weights']} weights, {s['dtype']} activations); {s['replicas']} `promptstash serve` replicas with "
        f"{s['threads_per_replica']} torch thread(s) each, `--no-disk-cache`, sharing a local "
        f"{s['redis']} as the KV tier; HAProxy in front ({s['haproxy']}). Startup {res['startup_s']:.0f} s, runs "
        f"{res['bench_s']:.0f} s, in all {res['elapsed_s']:.0f} s.", "",
        f"Each run: {s['requests']} requests of one workload, closed loop, {s['concurrency']} in flight, "
        f"{s['max_tokens']} output tokens (greedy, ignore_eos), in the same order in every configuration, with its "
        "own `cache_salt` (cold pools and cold Redis at its start, except the \"prefix in Redis\" runs, where one "
        "request of the run (not counted) has computed the shared system prompt on one replica and its blocks are "
        "in Redis, as in steady traffic or when a replica joins; the replicas stay up). \"1 replica\" = HAProxy "
        f"routes to replica1 alone: the same process, with its {_threads(s)}. Affinity keys: chat: "
        f"{s['affinity_keys']['chat']}; system-prompt: {s['affinity_keys']['system-prompt']}.", "",
        "Sources of prompt tokens per replica, from /v1/cache/stats deltas: **Redis** = blocks loaded from Redis x "
        "block size, **pool** = the other cached tokens (already in that replica's pool), **computed** = prompt - "
        "cached. A replica can load a block from Redis only once another replica has computed and written it "
        "(write-through). On this 2-core machine throughput cannot scale with replicas (they share the two "
        "cores); the hit rates and where the hits came from are the figures that matter.", "",
        "## Runs", "",
        "| workload | configuration | requests per replica | prompt tokens | from pool | from Redis | computed | "
        "TTFT p50 (s) | TTFT p90 (s) | wall (s) | requests/s | output tok/s | errors |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["runs"]:
        t = r["totals"]
        spread = "/".join(str(v["requests"]) for v in r["replicas"].values())
        lines.append(f"| {r['workload']} | {r['config']} | {spread} | {t.get('prompt_tokens', 0):,} | "
                     + " | ".join(_cell(t, src) for src in SOURCES) + " | "
                     f"{_s(r['ttft_p50_s'])} | {_s(r['ttft_p90_s'])} | {r['wall_s']:.1f} | {r['requests_per_s']:.2f} "
                     f"| {r['output_tokens_per_s']:.1f} | {r['errors']} |")
    lines += ["", "## Per replica", "",
              "Hit rate = (pool + Redis) / prompt tokens. Redis blocks: loaded into this replica's pool from Redis / "
              "written to Redis by this replica (write-through of every block it computed).", "",
              "| workload | configuration | replica | requests | prompt tokens | from pool | from Redis | computed | "
              "hit rate | Redis blocks loaded / written | TTFT p50 (s) |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["runs"]:
        for name, v in r["replicas"].items():
            sh = v["shares"]
            lines.append(f"| {r['workload']} | {r['config']} | {name} | {v['requests']} | "
                         f"{v.get('prompt_tokens', 0):,} | " + " | ".join(_cell(v, src) for src in SOURCES) + " | "
                         f"{_pct(sh['pool'] + sh['redis'])} | {v.get('redis_loaded_blocks', 0)} / "
                         f"{v.get('redis_writes', 0)} | {_s(v['ttft_s']['p50'])} |")
    lines += ["", "## What this shows", ""]
    lines += [f"- {f}" for f in findings(res)]
    lines += ["", "Workloads: " + "; ".join(f"{n}: {w['description'].rstrip('.')}" for n, w in res["workloads"].items())
              + ".", ""]
    return "\n".join(lines)


def write(res: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """cluster.json and cluster.md under out_dir."""
    return write_results(res, out_dir, "cluster", to_markdown(res))


def main_cli(args: Any, log: Callable[[str], None] | None = None) -> int:
    """`promptstash bench cluster` from parsed arguments: run, write, print the Markdown; 1 if a request failed."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    options = ClusterOptions(requests=args.requests, concurrency=args.concurrency, max_tokens=args.max_tokens,
                             model=args.model, tiny=args.tiny, out=args.out)
    res = run(options, log=log)
    js, md = write(res, Path(args.out))
    print(to_markdown(res))
    log(f"wrote {js} and {md} in {res['elapsed_s']:.0f}s")
    if res["errors"]:
        log(f"error: {res['errors']} requests failed (non-200 or a failed stream); see {js}")
        return 1
    return 0
