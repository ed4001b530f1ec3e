"""`promptstash bench summary`: one results page from the workload reports in a results directory.

It holds the seed table reproduced for our engine (TTFT, throughput, memory, cost, from the `rag`
workload, caching on vs off in the same run) and each workload's on/off table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WORKLOADS = ("rag", "chat", "system-prompt", "trace")
SEED_ROWS = (  # the seed's claims, to set our measurements beside
    ("TTFT (p50)", "2.8 s → 0.4 s"),
    ("Throughput", "120 → 850 req/s"),
    ("KV memory (peak)", "−42%"),
    ("Input cost", "−88%"),
)


def _load(out_dir: Path, workload: str) -> dict[str, Any] | None:
    path = out_dir / f"workload-{workload}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _change(on: float, off: float) -> str:
    return f"{(on / off - 1) * 100:+.0f}%" if off else "–"


def seed_table(rag: dict[str, Any]) -> list[str]:
    on, off = rag["summary"]["on"], rag["summary"]["off"]
    rows = [
        ("TTFT (p50)", f"{off['ttft_p50_s']:.2f} s → {on['ttft_p50_s']:.2f} s",
         f"{off['ttft_p50_s'] / on['ttft_p50_s']:.1f}× lower"),
        ("Throughput", f"{off['requests_per_s']:.3f} → {on['requests_per_s']:.3f} req/s",
         f"{on['requests_per_s'] / off['requests_per_s']:.2f}×"),
        ("KV memory (peak)", f"{off['peak_kv_bytes'] / 2**20:,.0f} → {on['peak_kv_bytes'] / 2**20:,.0f} MiB",
         _change(on["peak_kv_bytes"], off["peak_kv_bytes"])),
        ("Input cost, Anthropic-style", f"${off['cost_no_cache']:.4f} → ${on['cost_anthropic_style']:.4f}",
         _change(on["cost_anthropic_style"], off["cost_no_cache"])),
        ("Input cost, OpenAI-style", f"${off['cost_no_cache']:.4f} → ${on['cost_openai_style']:.4f}",
         _change(on["cost_openai_style"], off["cost_no_cache"])),
    ]
    seed = dict(SEED_ROWS)
    lines = ["| metric | seed's claim | ours: off → on | change |", "|---|---|---|---|"]
    for name, ours, change in rows:
        claim = seed["Input cost"] if name.startswith("Input cost") else seed.get(name, "")
        lines.append(f"| {name} | {claim} | {ours} | {change} |")
    return lines


def render(out_dir: Path) -> str:
    reports = {w: _load(out_dir, w) for w in WORKLOADS}
    lines = ["# Benchmark results", "",
             "Produced by `make bench` (`promptstash bench prefix | tiers | rag | chat | system-prompt | trace | "
             "rag --modules | modules | perplexity | peers | semantic | cluster | summary`) on a 2-core x86_64 CPU "
             "without a GPU: the "
             "default model (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF dequantized), float32, torch 2.13.0 CPU. "
             "Every workload measures caching on and off in the same run (off: the same weights with prefix "
             "caching disabled).", ""]
    rag = reports["rag"]
    if rag is not None:
        s = rag["setup"]
        lines += ["## The seed's table, reproduced on this machine (`rag` workload)", "",
                  f"Setup: {s['num_requests']} MuSiQue questions, each with a shared system prompt and "
                  f"{s.get('k')} passages drawn from a pool of {rag['workload'].get('pool_size')} "
                  f"(prefix recurrence {rag['workload'].get('prefix_recurrence_rate', 0):.0%}), concurrency "
                  f"{s['concurrency']}, {s['max_tokens']} output tokens, in-process. The seed's figures came from a "
                  "GPU serving many users; ours are what this CPU measured, whatever they are.", ""]
        lines += seed_table(rag) + [""]
    rag_modules = _load(out_dir, "rag-modules")
    if rag_modules is not None:
        s = rag_modules["setup"]
        repair = rag_modules["workload"].get("module_repair") or s.get("module_repair") or "the engine's default"
        lines += ["### The same table with modules (`bench rag --modules`)", "",
                  f"The same workload with every passage marked as a module (`\"module\": true`), assembled with "
                  f"`module_repair` `{repair}`: a passage seen once is reused wherever it appears later, not only "
                  "behind an identical prefix. Approximate: its quality cost is measured in "
                  "[modules.md](modules.md).", ""]
        lines += seed_table(rag_modules) + [""]
    lines += ["## Workloads: caching on vs off", ""]
    keys = ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "e2e_p50_s", "requests_per_s", "total_tokens_per_s",
            "hit_rate", "peak_kv_bytes", "cost_per_1k_openai_style", "cost_per_1k_anthropic_style")
    for w in WORKLOADS:
        report = reports[w]
        if report is None:
            lines += [f"### {w}", "", "(not run)", ""]
            continue
        on, off, ratio = report["summary"]["on"], report["summary"]["off"], report.get("ratio", {})
        lines += [f"### {w}", "", report["workload"].get("description", ""), "",
                  "| metric | on | off | on / off |", "|---|---:|---:|---:|"]
        for k in keys:
            r = ratio.get(k)
            lines.append(f"| {k} | {_num(on.get(k))} | {_num(off.get(k))} | {'–' if r is None else f'{r:.3g}'} |")
        if w == "trace" and "optimum_cached_tokens" in report["workload"]:
            lines.append(f"\nCached tokens {on['cached_tokens']:,} vs the unbounded-cache optimum "
                         f"{report['workload']['optimum_cached_tokens']:,}.")
        lines += ["", f"Details and plots: [workload-{w}.md](workload-{w}.md), ![{w}](workload-{w}.png)", ""]
    agent = json.loads((out_dir / "agent.json").read_text()) if (out_dir / "agent.json").exists() else None
    if agent is not None:
        s, on, off = agent["setup"], agent["on"], agent["off"]
        lines += ["## Agents: tool calling with a long tool list (`bench agent`)", "",
                  f"{s['agents']} agents at once, {s['num_tools']} tools ({s['tools_tokens']:,} tokens), {s['steps']} "
                  "steps each with `tool_choice: \"required\"`, caching on vs off in the same run.", "",
                  "| | on | off |", "|---|---:|---:|",
                  f"| total time | {on['wall_s']:.1f} s | {off['wall_s']:.1f} s |",
                  f"| TTFT mean | {on['ttft_mean_s']:.2f} s | {off['ttft_mean_s']:.2f} s |",
                  f"| cached / prompt tokens | {on['hit_rate']:.0%} | {off['hit_rate']:.0%} |", "",
                  f"Speedup {agent['speedup_wall']:.2f}× (total time). Per step: [agent.md](agent.md).", ""]
    grammar = json.loads((out_dir / "grammar.json").read_text()) if (out_dir / "grammar.json").exists() else None
    if grammar is not None:
        lines += ["## Constrained decoding (`bench grammar`)", "",
                  "| grammar | free tok/s | constrained tok/s | grammar share of a step | output parses |",
                  "|---|---:|---:|---:|---|"]
        for row in grammar["decode"]:
            share = row["step_us"] * 1e-6 * row["constrained_tok_s"]
            lines.append(f"| {row['case']} | {row['free_tok_s']:.1f} | {row['constrained_tok_s']:.1f} | {share:.3%} | "
                         f"{'yes' if row['valid'] else 'no'} |")
        lines += ["", "Compile times and llguidance vs xgrammar schema coverage: [grammar.md](grammar.md).", ""]
    lines += peers_section(out_dir) + perplexity_section(out_dir) + semantic_section(out_dir)
    lines += policies_section(out_dir) + cluster_section(out_dir)
    lines += ["Other results: [prefix caching vs transformers](prefix.md), [tiers](tiers.md), [modules: quality and "
              "speed of every repair strategy](modules.md), [rag with modules](workload-rag-modules.md).", ""]
    return "\n".join(lines)


def _load_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _targets_line(targets: list[dict[str, Any]]) -> str:
    measured = [t for t in targets if t["passed"] is not None]
    failed = [f"{t['target']} ({t['format']})" for t in measured if not t["passed"]]
    return (f"Issue targets met: {len(measured) - len(failed)} of {len(measured)} measured"
            + (f"; not met: {', '.join(failed)}." if failed else "."))


def peers_section(out_dir: Path) -> list[str]:
    """`bench peers`: the in-process table (promptstash per format vs llama.cpp) and the server figures."""
    res = _load_json(out_dir / "peers.json")
    if res is None:
        return []
    s = res["setup"]
    names = [f["format"] if f["format"] == f["resolved"] else f"{f['format']} → {f['resolved']}"
             for f in res["formats"]]
    lines = ["## promptstash vs llama.cpp (`bench peers`)", "",
             f"The same GGUF file, {s['threads']} threads each, medians of {s['repeats']} alternating repeat(s) "
             "(random-token prompts; for TTFT the ratio is promptstash's time / llama.cpp's, lower is better)."
             + (f" {res['llama_cpp_note']}." if res.get("llama_cpp_note") else ""), "",
             "| figure | " + " | ".join(f"promptstash {n}" for n in names) + " | llama.cpp | "
             + " | ".join(f"ratio {n}" for n in names) + " |", "|---|" + "---:|" * (2 * len(names) + 1)]
    for r in res["rows"]:
        def value(v: float | None, unit: str = r["unit"]) -> str:
            return "–" if v is None else (f"{v:.3f} s" if unit == "s" else f"{v:,.1f}")

        unit = "" if r["unit"] == "s" else f" ({r['unit']})"
        lines.append(f"| {r['figure']}{unit} | " + " | ".join(value(r["values"][f["format"]]) for f in res["formats"])
                     + f" | {value(r['llama_cpp'])} | " + " | ".join(
                         "–" if r["ratios"][f["format"]] is None else f"{r['ratios'][f['format']]:.2f}×"
                         for f in res["formats"]) + " |")
    srv = res.get("server")
    if srv is not None:
        ps, ll = srv["promptstash"], srv.get("llama_cpp")
        st = srv["settings"]
        ratio = f" ({ps['wall_s'] / ll['wall_s']:.2f}×)" if ll else ""
        lines += ["", f"Server, {st['users']} users x {st['questions']} chat turns over their own documents behind a "
                  f"shared system prompt, {st['concurrency']} at a time: total time {ps['wall_s']:.1f} s"
                  + (f" vs llama.cpp {ll['wall_s']:.1f} s{ratio}" if ll else "")
                  + f", TTFT p50 {ps['ttft_p50_s']:.2f} s" + (f" vs {ll['ttft_p50_s']:.2f} s" if ll else "")
                  + f", peak RSS {ps['peak_rss_bytes'] / 2**20:,.0f} MiB"
                  + (f" vs {ll['peak_rss_bytes'] / 2**20:,.0f} MiB" if ll else "") + "."]
    lines += ["", _targets_line(res["targets"]) + " Details: [peers.md](peers.md).", ""]
    return lines


def perplexity_section(out_dir: Path) -> list[str]:
    """`bench perplexity`: perplexity per weight format and llama.cpp's on the same GGUF."""
    res = _load_json(out_dir / "perplexity.json")
    if res is None:
        return []
    s = res["setup"]
    lines = ["## Perplexity by weight format (`bench perplexity`)", "",
             f"{s['windows']} windows of {s['window_len']} tokens of MuSiQue passages."
             + (f" {res['llama_cpp_note']}." if res.get("llama_cpp_note") else ""), "",
             "| scorer | perplexity |", "|---|---:|"]
    for name, sc in res["scores"].items():
        lines.append(f"| {'llama.cpp (same GGUF)' if sc['engine'] == 'llama.cpp' else 'promptstash ' + name} | "
                     f"{sc['perplexity']:.4f} |")
    lines.append("")
    for b in res["bounds"]:
        verdict = "not measured" if b["passed"] is None else ("PASS" if b["passed"] else "FAIL")
        ratio = "" if b["ratio"] is None else f" (ratio {b['ratio']:.4f})"
        lines.append(f"- {b['bound']}: {verdict}{ratio}")
    lines += ["", "Details: [perplexity.md](perplexity.md).", ""]
    return lines


def semantic_section(out_dir: Path) -> list[str]:
    """`bench semantic`: the semantic cache's hit rate on paraphrases at the threshold keeping false hits <= 1%."""
    res = _load_json(out_dir / "semantic.json")
    if res is None:
        return []
    from promptstash.bench import semantic

    s, c = res["setup"], res.get("chosen")
    lines = ["## Semantic cache: hits and false hits (`bench semantic`)", "",
             f"{s['pairs']} hand-written pairs over {s['question_texts']} MT-Bench question texts: true paraphrases "
             "and near-misses (negation, number, entity, unit, comparison).", ""]
    if c:
        lines.append(f"Lowest threshold with false hits <= {s['false_hit_bound']:.0%}: **{c['threshold']:.3g}**, "
                     f"paraphrase hit rate {c['hit_rate_guarded']:.1%}, false-hit rate "
                     f"{c['false_hit_rate_guarded']:.1%}.")
    lines += ["", semantic.verdict(res), "", "Details: [semantic.md](semantic.md).", ""]
    return lines


def policies_section(out_dir: Path) -> list[str]:
    """`bench policies`: the issue's target check per trace and the defaults the numbers favour."""
    res = _load_json(out_dir / "policies.json")
    if res is None:
        return []
    lines = ["## Eviction policies x pool sizes (`bench policies`)", "",
             "Traces replayed in simulated time through the real cache manager and scheduler, step times from a "
             "cost model measured on the real engine. tlru vs lru at the pool size where lru suffers most (target: "
             "p90 TTFT -20% or better, hit rate at most 2 points lower):", ""]
    for w in res["workloads"]:
        t = w["target"]
        if t.get("measured"):
            lines.append(f"- {w['name']}, pool {t['pool']}: p90 {t['lru_p90_s']:.2f} s -> {t['tlru_p90_s']:.2f} s "
                         f"({t['p90_change']:+.1%}), hit rate {t['hit_rate_change_points']:+.1f} points: "
                         f"{'met' if t['passed'] else 'not met'}")
    rec = res["recommendation"]
    lines += ["", f"Defaults from these numbers: eviction={rec['eviction']}, schedule={rec['schedule']}. "
              "Every cell: [policies.md](policies.md), ![policies](policies.png)", ""]
    return lines


def cluster_section(out_dir: Path) -> list[str]:
    """`bench cluster`: one replica vs three behind HAProxy (affinity, round robin), where the hits came from."""
    res = _load_json(out_dir / "cluster.json")
    if res is None:
        return []
    from promptstash.bench import cluster

    s = res["setup"]
    lines = ["## Scale-out: one replica vs three behind HAProxy (`bench cluster`)", "",
             f"{s['requests']} requests per run, {s['concurrency']} in flight, a fresh cache_salt per run; three "
             f"replicas share a {s['redis']} as the KV tier. Share of prompt tokens from each replica's pool, from "
             "Redis and computed (on this 2-core machine throughput cannot scale; where the hits came from is the "
             "figure):", "",
             "| workload | configuration | requests per replica | pool | Redis | computed | TTFT p50 (s) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in res["runs"]:
        sh, ttft = r["shares"], r["ttft_p50_s"]
        spread = "/".join(str(v["requests"]) for v in r["replicas"].values())
        lines.append(f"| {r['workload']} | {r['config']} | {spread} | {sh['pool']:.0%} | {sh['redis']:.0%} | "
                     f"{sh['computed']:.0%} | {'–' if ttft is None else f'{ttft:.2f}'} |")
    lines += ["", *(f"- {f}" for f in cluster.findings(res)), "", "Per replica: [cluster.md](cluster.md).", ""]
    return lines


def _num(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}"


def write(out_dir: Path) -> Path:
    path = out_dir / "README.md"
    path.write_text(render(out_dir))
    return path
