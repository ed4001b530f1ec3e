"""Reports of the workload benchmarks: per-run summaries (caching on and off), on/off ratios, JSON, Markdown
and PNG plots (plots need matplotlib; without it they are skipped with a printed note)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from promptstash.config import PriceSheet

SUMMARY_FIELDS = ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "e2e_p50_s", "e2e_p90_s", "e2e_p99_s", "e2e_mean_s",
                  "requests_per_s", "output_tokens_per_s", "total_tokens_per_s", "hit_rate", "prompt_tokens",
                  "cached_tokens", "completion_tokens", "peak_kv_blocks", "peak_kv_bytes", "cost_no_cache",
                  "cost_openai_style", "cost_anthropic_style", "cost_per_1k_no_cache", "cost_per_1k_openai_style",
                  "cost_per_1k_anthropic_style")


@dataclass
class BenchResult:
    setup: dict[str, Any] = field(default_factory=dict)  # workload, target, options, model, date
    workload: dict[str, Any] = field(default_factory=dict)  # description + workload info
    summary: dict[str, dict[str, Any]] = field(default_factory=dict)  # "on" / "off" -> SUMMARY_FIELDS
    ratio: dict[str, float | None] = field(default_factory=dict)  # on / off, per numeric summary field
    requests: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # "on" / "off" -> per-request rows


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty sequence; 0.0 when empty."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def costs(prompt: int, cached: int, completion: int, writes: int, prices: PriceSheet) -> dict[str, float]:
    """Dollars under each price sheet. OpenAI-style: cached input at `openai_read`. Anthropic-style (automatic
    caching): `writes` (newly computed cacheable tokens) at `anthropic_write_5m`, reads at `anthropic_read`."""
    pin, pout = prices.input_per_mtok / 1e6, prices.output_per_mtok / 1e6
    out = completion * pout
    uncached = prompt - cached
    return {"no_cache": prompt * pin + out,
            "openai_style": (uncached + cached * prices.openai_read) * pin + out,
            "anthropic_style": (uncached - writes + writes * prices.anthropic_write_5m
                                + cached * prices.anthropic_read) * pin + out}


def summarize(run: Any, prices: PriceSheet | None = None) -> dict[str, Any]:
    """SUMMARY_FIELDS of one RunData. Cache writes (on only): the full blocks of each prompt not read from
    the cache; an off run writes nothing."""
    prices = prices or PriceSheet()
    recs = run.records
    ttft, e2e = [r.ttft_s for r in recs], [r.e2e_s for r in recs]
    prompt = sum(r.prompt_tokens for r in recs)
    cached = sum(r.cached_tokens for r in recs)
    completion = sum(r.completion_tokens for r in recs)
    bs = run.block_size
    writes = sum(max(0, r.prompt_tokens // bs * bs - r.cached_tokens) for r in recs) if run.mode == "on" else 0
    wall = max(run.wall_s, 1e-9)
    money = costs(prompt, cached, completion, writes, prices)
    per_1k = 1000.0 / max(1, len(recs))
    out: dict[str, Any] = {"num_requests": len(recs), "wall_s": run.wall_s}
    for name, values in (("ttft", ttft), ("e2e", e2e)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}_s"] = percentile(values, q)
    out |= {"e2e_mean_s": sum(e2e) / len(e2e) if e2e else 0.0, "requests_per_s": len(recs) / wall,
            "output_tokens_per_s": completion / wall, "total_tokens_per_s": (prompt + completion) / wall,
            "hit_rate": cached / prompt if prompt else 0.0, "prompt_tokens": prompt, "cached_tokens": cached,
            "completion_tokens": completion, "cache_write_tokens": writes, "peak_kv_blocks": run.peak_kv_blocks,
            "peak_kv_bytes": None if run.kv_bytes_per_block is None else run.peak_kv_blocks * run.kv_bytes_per_block}
    for sheet, dollars in money.items():
        out[f"cost_{sheet}"] = dollars
        out[f"cost_per_1k_{sheet}"] = dollars * per_1k
    return out


def ratios(on: dict[str, Any], off: dict[str, Any]) -> dict[str, float | None]:
    """on / off for every numeric field (None where off is 0 or either is missing)."""
    out: dict[str, float | None] = {}
    for key, a in on.items():
        b = off.get(key)
        if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
            out[key] = a / b if b else None
    return out


def build_result(setup: dict[str, Any], workload: dict[str, Any], runs: dict[str, Any],
                 prices: PriceSheet | None = None) -> BenchResult:
    """A BenchResult from RunData keyed "on" and "off"."""
    summary = {mode: summarize(run, prices) for mode, run in runs.items()}
    requests = {mode: [asdict(r) for r in sorted(run.records, key=lambda r: r.index)] for mode, run in runs.items()}
    return BenchResult(setup, workload, summary, ratios(summary["on"], summary["off"]), requests)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def stem(res: BenchResult) -> str:
    """File name stem of a result: workload-<name>, with -modules for the modules mode (passages as modules)."""
    return f"workload-{res.setup.get('workload')}" + ("-modules" if res.setup.get("modules") else "")


def to_markdown(res: BenchResult) -> str:
    s, w = res.setup, res.workload
    mode = ""
    if s.get("modules"):
        repair = f"`{s['module_repair']}`" if s.get("module_repair") else "the server's default"
        mode = (f" Modules mode: each passage is a module part (`\"module\": true`), module repair {repair}; OFF "
                "ignores the marks.")
    title = f"{s.get('workload')} with modules" if s.get("modules") else s.get("workload")
    lines = [f"# Workload benchmark: {title} ({s.get('date', '')})", "",
             f"Target: {s.get('target')}; model `{s.get('model')}`; {s.get('num_requests')} requests, concurrency "
             f"{s.get('concurrency')}, max_tokens {s.get('max_tokens')} (greedy, ignore_eos). "
             "OFF = " + ("a second engine on the same weights with prefix caching off."
                         if s.get("target") == "in-process" else "a fresh cache_salt per request.") + mode, "",
             f"Workload: {w.get('description', '')}", ""]
    info = {k: v for k, v in w.items() if k != "description"}
    if info:
        lines += ["Workload figures: " + ", ".join(f"{k} {_fmt(v)}" for k, v in info.items()), ""]
    lines += ["| metric | caching on | caching off | on / off |", "|---|---:|---:|---:|"]
    on, off = res.summary.get("on", {}), res.summary.get("off", {})
    for key in SUMMARY_FIELDS:
        lines.append(f"| {key} | {_fmt(on.get(key))} | {_fmt(off.get(key))} | {_fmt(res.ratio.get(key))} |")
    lines += ["", "Costs in dollars at the price sheet in setup.prices: OpenAI-style cached input at 50%; "
              "Anthropic-style counts newly computed cacheable (full-block) tokens as 1.25x writes, reads at 0.1x."]
    return "\n".join(lines) + "\n"


def plot(res: BenchResult, out_dir: Path, stem: str, log=print) -> list[Path]:
    """PNG plots: TTFT CDF on vs off, TTFT vs cached fraction, cumulative hit rate over time, cost per 1k
    requests. Returns the files written; none (with a printed note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("note: matplotlib is not installed; skipping plots (pip install matplotlib)")
        return []
    paths = []
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for mode, rows in res.requests.items():
        ttft = sorted(r["ttft_s"] for r in rows)
        axes[0][0].plot(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], label=f"caching {mode}")
        axes[0][1].scatter([r["cached_tokens"] / max(1, r["prompt_tokens"]) for r in rows],
                           [r["ttft_s"] for r in rows], label=f"caching {mode}", s=12)
        done = sorted(rows, key=lambda r: r["end_s"])
        cum_p = cum_c = 0
        hit = []
        for r in done:
            cum_p, cum_c = cum_p + r["prompt_tokens"], cum_c + r["cached_tokens"]
            hit.append(cum_c / max(1, cum_p))
        axes[1][0].plot([r["end_s"] for r in done], hit, label=f"caching {mode}")
    sheets = ("no_cache", "openai_style", "anthropic_style")
    for j, mode in enumerate(res.summary):
        axes[1][1].bar([i + 0.4 * j for i in range(len(sheets))],
                       [res.summary[mode][f"cost_per_1k_{s}"] for s in sheets], width=0.4, label=f"caching {mode}")
    axes[1][1].set_xticks([i + 0.2 for i in range(len(sheets))], sheets)
    titles = [("TTFT CDF", "TTFT (s)", "fraction of requests"), ("TTFT vs cached fraction", "cached / prompt tokens",
              "TTFT (s)"), ("cumulative hit rate over time", "time (s)", "cached / prompt tokens"),
              ("cost per 1k requests", "price sheet", "dollars")]
    for ax, (title, x, y) in zip([a for row in axes for a in row], titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.legend()
    marked = " with modules" if res.setup.get("modules") else ""
    fig.suptitle(f"{res.setup.get('workload')}{marked} ({res.setup.get('target')})")
    fig.tight_layout()
    path = out_dir / f"{stem}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
    return paths


def write(res: BenchResult, out_dir: Path, log=print) -> list[Path]:
    """Write `<stem>.json`, `<stem>.md` and (with matplotlib) `<stem>.png` under out_dir (see stem())."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = stem(res)
    js, md = out_dir / f"{name}.json", out_dir / f"{name}.md"
    js.write_text(json.dumps(asdict(res), indent=2) + "\n")
    md.write_text(to_markdown(res))
    return [js, md, *plot(res, out_dir, name, log=log)]


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def write_results(res: dict[str, Any], out_dir: Path, name: str, markdown: str,
                  plot: Callable[[Path], Path | None] | None = None, *, indent: int = 1,
                  default: Callable[[Any], Any] | None = None) -> tuple[Path, Path]:
    """NAME.json, NAME.md and, given `plot(path)`, NAME.png under out_dir; returns the JSON and Markdown paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{name}.json", out_dir / f"{name}.md"
    js.write_text(json.dumps(res, indent=indent, default=default) + "\n")
    md.write_text(markdown)
    if plot is not None:
        plot(out_dir / f"{name}.png")
    return js, md
