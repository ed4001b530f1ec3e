"""`promptstash bench tiers`: TTFT of a shared prefix served cold, from the pool, from disk and from Redis.

For each prefix length (default 2,048 and 8,192 tokens) a request of prefix + a fresh 32-token suffix is
timed (time to first token, in-process): cold (nothing cached), a pool hit, a disk hit (a new engine on
the same cache directory: empty pool, the restart case) and a Redis hit (a new engine whose only tier is
Redis). Also: bytes stored per token in each tier, and decode speed of running requests while another
request loads the longest prefix from Redis (tier loads run off the engine lock: it may drop <= 10%).
"""

from __future__ import annotations

import json
import platform
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from promptstash.bench.prefix import random_tokens
from promptstash.config import EngineConfig
from promptstash.engine.engine import Engine

SUFFIX_LEN = 32


@dataclass
class TierResults:
    setup: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    bytes_per_token: dict[str, float] = field(default_factory=dict)
    decode_during_load: dict[str, Any] = field(default_factory=dict)


class _Redis:
    """A throwaway redis-server on a free loopback port (no persistence), when none was given."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = tempfile.mkdtemp(prefix="promptstash-redis-")
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self.dir], stdout=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _ttft(engine: Engine, prompt: list[int], expect_cached: int | None = None) -> tuple[float, int]:
    out = engine.generate(prompt, max_tokens=1)
    if expect_cached is not None and out.usage.cached_tokens < expect_cached:
        raise RuntimeError(f"expected >= {expect_cached} cached tokens, got {out.usage.cached_tokens}")
    return out.timings.ttft_s, out.usage.cached_tokens


def run(prefix_lens=(2048, 8192), model: str | None = None, dtype: str = "auto", redis_url: str | None = None,
        storage_dtype: str = "auto", seed: int = 0, use_redis: bool = True) -> TierResults:
    base = Engine.from_pretrained(model, dtype=dtype, progress=False, kv_cache_tokens=max(prefix_lens) * 2 + 1024)
    own_redis = None
    if redis_url is None and use_redis:
        try:
            own_redis = _Redis()
            redis_url = own_redis.url
        except FileNotFoundError as exc:
            print(f"skipping the Redis tier: {exc}")
    work = Path(tempfile.mkdtemp(prefix="promptstash-bench-tiers-"))

    def engine(**tiers: Any) -> Engine:
        config = EngineConfig(dtype=dtype, kv_cache_tokens=max(prefix_lens) * 2 + 1024,
                              kv_storage_dtype=storage_dtype, **tiers)
        return Engine(base.model, base.tokenizer, config, base.model_id)

    res = TierResults(setup={
        "model": base.model_id, "dtype": str(base.model.dtype).removeprefix("torch."),
        "storage_dtype": storage_dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "suffix_len": SUFFIX_LEN,
        "date": time.strftime("%Y-%m-%d"),
    })
    rng = random.Random(seed)
    vocab = base.model.config.vocab_size

    def suffix() -> list[int]:  # a fresh suffix per request: only the prefix can be reused
        return random_tokens(rng, SUFFIX_LEN, vocab)

    try:
        base.generate(random_tokens(rng, 64, vocab), max_tokens=1)  # warm-up
        for n in prefix_lens:
            prefix = random_tokens(rng, n, vocab)
            block_full = n // base.cache.block_size * base.cache.block_size
            row: dict[str, Any] = {"prefix_len": n}
            writer = engine(kv_disk_dir=str(work / f"disk{n}"), redis_url=redis_url)
            row["cold_s"], _ = _ttft(writer, prefix + suffix())
            row["pool_s"], row["pool_cached"] = _ttft(writer, prefix + suffix(), block_full)
            writer.close()  # flush queued tier writes
            disk = engine(kv_disk_dir=str(work / f"disk{n}"))
            row["disk_s"], row["disk_cached"] = _ttft(disk, prefix + suffix(), block_full)
            disk_stats = disk.stats().tiers[0]
            res.bytes_per_token["disk"] = disk_stats.num_bytes / (disk_stats.num_entries * base.cache.block_size)
            disk.close()
            if redis_url is not None:
                remote = engine(redis_url=redis_url)
                row["redis_s"], row["redis_cached"] = _ttft(remote, prefix + suffix(), block_full)
                remote.close()
                res.bytes_per_token["redis"] = res.bytes_per_token["disk"]  # the same entries
            for tier in ("pool", "disk", "redis"):
                if f"{tier}_s" in row:
                    row[f"{tier}_speedup_vs_cold"] = row["cold_s"] / row[f"{tier}_s"]
            for tier in ("disk", "redis"):
                if f"{tier}_s" in row:
                    row[f"{tier}_vs_pool"] = row[f"{tier}_s"] / row["pool_s"]
            res.rows.append(row)
            print(json.dumps(row))
        if redis_url is not None:
            res.decode_during_load = decode_during_load(engine, redis_url, max(prefix_lens), rng, vocab)
            print(json.dumps({"decode_during_load": res.decode_during_load}))
    finally:
        if own_redis is not None:
            own_redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    res.bytes_per_token["pool"] = base.kv.bytes_per_token
    return res


def decode_during_load(make_engine: Any, redis_url: str, prefix_len: int, rng: random.Random, vocab: int,
                       num_running: int = 4, repeats: int = 7) -> dict[str, Any]:
    """Decode tokens/s of `num_running` requests before and while another request's prefix_len-token prefix
    loads from Redis into an empty pool (median over `repeats` fresh engines, after one warm-up run).

    A step thread drives the engine as the server's loop does; each decode step's wall time is recorded.
    Rate = num_running / median duration of the decode steps that lie wholly inside the window (the median:
    with no load at all, two 3-second windows of the same run differ by up to 15% in their mean).
    """
    prefix = random_tokens(rng, prefix_len, vocab)
    writer = make_engine(redis_url=redis_url)
    writer.generate(prefix, max_tokens=1)
    writer.close()
    runs = []
    for repeat in range(repeats + 1):  # the first run warms up (allocator, page faults, Redis) and is not kept
        eng = make_engine(redis_url=redis_url)
        steps: list[tuple[float, float]] = []
        stop = threading.Event()

        def drive(eng: Engine = eng, steps: list = steps, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                if eng.run_step().num_scheduled:
                    steps.append((t0, time.perf_counter()))
                else:
                    eng.wait_for_work(0.01)

        from promptstash.engine.sampling import SamplingParams

        params = SamplingParams(max_tokens=2000, ignore_eos=True)
        runners = [eng.add_request(random_tokens(rng, 16, vocab), params) for _ in range(num_running)]
        thread = threading.Thread(target=drive, daemon=True)
        thread.start()
        while eng.stats().num_generated_tokens < num_running * 4:  # past prefill, decoding
            time.sleep(0.01)
        # NOTE: both windows poll the same lock-free counter at the same rate, so the poll costs both alike
        base_start = time.perf_counter()
        while time.perf_counter() - base_start < 3.0:
            eng.num_loading()
            time.sleep(0.005)
        base_end = time.perf_counter()
        loader = eng.add_request(prefix + random_tokens(rng, SUFFIX_LEN, vocab), SamplingParams(max_tokens=1))
        load_start = time.perf_counter()
        while eng.num_loading():
            time.sleep(0.005)
        load_end = time.perf_counter()
        stop.set()
        thread.join()
        for rid in runners:
            eng.abort(rid)
        out = eng.run_until_done([loader])[0]
        eng.close()

        def rate(lo: float, hi: float, steps: list = steps) -> tuple[float | None, int]:
            inside = [b - a for a, b in steps if a >= lo and b <= hi]
            return (num_running / statistics.median(inside) if inside else None), len(inside)

        base, n_base = rate(base_start, base_end)
        during, n_during = rate(load_start, load_end)
        if not repeat:
            continue
        runs.append({"load_s": load_end - load_start, "cached_tokens": out.usage.cached_tokens,
                     "decode_tok_s_before": base, "decode_tok_s_during": during,
                     "steps_before": n_base, "steps_during": n_during})
    ratios = [r["decode_tok_s_during"] / r["decode_tok_s_before"] for r in runs
              if r["decode_tok_s_during"] and r["decode_tok_s_before"]]
    return {"prefix_len": prefix_len, "num_running": num_running, "runs": runs,
            "median_during_over_before": statistics.median(ratios) if ratios else None}


def to_markdown(res: TierResults) -> str:
    s = res.setup
    lines = [
        "# Tier benchmark: TTFT of a shared prefix from each tier",
        "",
        f"`promptstash bench tiers` on {s['date']}: {s['model']}, pool dtype {s['dtype']}, stored as "
        f"{s['storage_dtype']} (auto = the pool's), torch {s['torch']} on {s['threads']} threads, {s['machine']}.",
        f"Each request = prefix + a fresh {s['suffix_len']}-token suffix, max_tokens=1; TTFT measured in-process.",
        "Disk: a new engine on the same cache directory (empty pool, as after a restart). Redis: a new engine whose",
        "only tier is a local redis-server.",
        "",
        "| prefix tokens | cold | pool hit | disk hit | Redis hit | disk vs cold | disk / pool | Redis vs cold "
        "| Redis / pool |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res.rows:
        def f(key: str, fmt: str = "{:.3f} s", r: dict = r) -> str:
            return fmt.format(r[key]) if key in r else "—"
        lines.append(f"| {r['prefix_len']:,} | {f('cold_s')} | {f('pool_s')} | {f('disk_s')} | {f('redis_s')} | "
                     f"{f('disk_speedup_vs_cold', '{:.1f}×')} | {f('disk_vs_pool', '{:.2f}×')} | "
                     f"{f('redis_speedup_vs_cold', '{:.1f}×')} | {f('redis_vs_pool', '{:.2f}×')} |")
    lines += ["", "Bytes stored per token: " + ", ".join(f"{k} {v:,.0f}" for k, v in res.bytes_per_token.items())
              + " (entries add a small header per 16-token block).", ""]
    d = res.decode_during_load
    if d:
        lines += [
            f"## Decode while a {d['prefix_len']:,}-token prefix loads from Redis",
            "",
            f"{d['num_running']} requests decode while another request's prefix loads from Redis into an empty pool "
            "(tier reads run on the loader threads, off the engine lock). Decode tok/s = requests / median step time.",
            "",
            "| run | load time | cached tokens | decode tok/s before | during the load | during / before |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for i, r in enumerate(d["runs"], 1):
            before, during = r["decode_tok_s_before"], r["decode_tok_s_during"]
            ratio = f"{during / before:.2f}" if before and during else "—"
            lines.append(f"| {i} | {r['load_s']:.2f} s | {r['cached_tokens']:,} | "
                         f"{before or 0:.1f} ({r['steps_before']} steps) | {during or 0:.1f} ({r['steps_during']} "
                         f"steps) | {ratio} |")
        med = d["median_during_over_before"]
        lines += ["", f"Median during / before: **{med:.2f}**" + (" (target: >= 0.90)" if med else ""), ""]
    return "\n".join(lines)


def write(res: TierResults, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "tiers.json", out_dir / "tiers.md"
    js.write_text(json.dumps({"setup": res.setup, "rows": res.rows, "bytes_per_token": res.bytes_per_token,
                              "decode_during_load": res.decode_during_load}, indent=2) + "\n")
    md.write_text(to_markdown(res))
    return js, md
