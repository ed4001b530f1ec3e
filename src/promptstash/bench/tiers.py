"""`promptstash bench tiers`: TTFT of a shared prefix served cold, from the pool, from disk and from Redis.

For each prefix length (default 2,048 and 8,192 tokens) a request of prefix + a fresh 32-token suffix is
timed (time to first token, in-process): cold (nothing cached), a pool hit, a disk hit (a new engine on
the same cache directory: empty pool, the restart case) and a Redis hit (a new engine whose only tier is
Redis). Also: bytes stored per token in each tier.
"""

from __future__ import annotations

import json
import platform
import random
import shutil
import socket
import subprocess
import tempfile
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

    def engine(**tiers) -> Engine:
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
    finally:
        if own_redis is not None:
            own_redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    res.bytes_per_token["pool"] = base.kv.bytes_per_token
    return res


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
    return "\n".join(lines)


def write(res: TierResults, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "tiers.json", out_dir / "tiers.md"
    js.write_text(json.dumps({"setup": res.setup, "rows": res.rows, "bytes_per_token": res.bytes_per_token},
                             indent=2) + "\n")
    md.write_text(to_markdown(res))
    return js, md
