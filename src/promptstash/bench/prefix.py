"""`promptstash bench prefix`: what exact prefix reuse saves on the default model, beside transformers.

Measures, in one run: TTFT cold vs cache hit for shared prefixes (+ a 32-token suffix); prefill and
decode tokens/s for our engine and for transformers' own implementation in each dtype; KV bytes per token;
and the overhead of caching on a prompt that shares nothing (caching on vs off).
"""

from __future__ import annotations

import json
import platform
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from promptstash.engine.engine import Engine

SUFFIX_LEN = 32


@dataclass
class PrefixResults:
    setup: dict[str, Any] = field(default_factory=dict)
    ttft: list[dict[str, Any]] = field(default_factory=list)
    throughput: list[dict[str, Any]] = field(default_factory=list)
    overhead: dict[str, Any] = field(default_factory=dict)
    kv_bytes_per_token: dict[str, int] = field(default_factory=dict)


def random_tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    # ordinary text tokens only (Qwen's special tokens start at 151643)
    return [rng.randrange(100, min(vocab, 150000)) for _ in range(n)]


def _hf_model(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@torch.inference_mode()
def _hf_ttft(model, ids: Sequence[int]) -> float:
    start = time.perf_counter()
    out = model(torch.tensor([list(ids)]), use_cache=True, logits_to_keep=1)
    out.logits[0, -1].argmax()
    return time.perf_counter() - start


@torch.inference_mode()
def _hf_decode_tps(model, ids: Sequence[int], num_tokens: int) -> float:
    """Greedy decode with transformers' own KV cache; times only the decode steps."""
    out = model(torch.tensor([list(ids)]), use_cache=True, logits_to_keep=1)
    past, token = out.past_key_values, out.logits[0, -1].argmax()
    start = time.perf_counter()
    for _ in range(num_tokens - 1):
        out = model(token.view(1, 1), past_key_values=past, use_cache=True, logits_to_keep=1)
        past, token = out.past_key_values, out.logits[0, -1].argmax()
    return (num_tokens - 1) / (time.perf_counter() - start)


def _ours_decode_tps(engine: Engine, ids: Sequence[int], num_tokens: int, namespace: str) -> float:
    out = engine.generate(list(ids), max_tokens=num_tokens, ignore_eos=True, namespace=namespace)
    return (num_tokens - 1) / max(out.timings.total_s - out.timings.ttft_s, 1e-9)


def run(prefix_lens: Sequence[int] = (512, 2048, 8192), throughput_lens: Sequence[int] = (512, 2048),
        dtypes: Sequence[str] = ("float32", "bfloat16"), decode_tokens: int = 32, model: str | None = None,
        baseline: bool = True, seed: int = 0, repeats: int = 3, log=print) -> PrefixResults:
    rng = random.Random(seed)
    res = PrefixResults()
    res.setup = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
                 "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
                 "suffix_len": SUFFIX_LEN, "decode_tokens": decode_tokens, "date": time.strftime("%Y-%m-%d")}
    for dtype in dtypes:
        max_len = max(prefix_lens) + SUFFIX_LEN + decode_tokens + 16
        engine = Engine.from_pretrained(model, dtype=dtype, kv_cache_tokens=max(32768, 2 * max_len))
        res.setup["model"] = engine.model_id
        res.kv_bytes_per_token[dtype] = engine.kv.bytes_per_token
        vocab = engine.model.config.vocab_size
        hf = _hf_model(engine.model_path, engine.model.dtype) if baseline else None
        first = dtype == dtypes[0]
        engine.generate(random_tokens(rng, 64, vocab), max_tokens=2, namespace="warmup")  # first-call costs
        if hf is not None:
            _hf_ttft(hf, random_tokens(rng, 64, vocab))
        if first:  # TTFT cold vs hit, in the first (default) dtype
            for n in prefix_lens:
                prefix = random_tokens(rng, n, vocab)
                ns = f"ttft-{n}-{rng.random()}"
                cold = engine.generate(prefix + random_tokens(rng, SUFFIX_LEN, vocab), max_tokens=1, namespace=ns)
                hit = engine.generate(prefix + random_tokens(rng, SUFFIX_LEN, vocab), max_tokens=1, namespace=ns)
                row = {"dtype": dtype, "prefix_len": n, "prompt_len": n + SUFFIX_LEN,
                       "cold_ttft_s": cold.timings.ttft_s, "hit_ttft_s": hit.timings.ttft_s,
                       "hit_cached_tokens": hit.usage.cached_tokens,
                       "speedup": cold.timings.ttft_s / hit.timings.ttft_s}
                if hf is not None:
                    row["transformers_ttft_s"] = _hf_ttft(hf, prefix + random_tokens(rng, SUFFIX_LEN, vocab))
                res.ttft.append(row)
                log(f"[ttft {dtype}] prefix {n}: cold {row['cold_ttft_s']:.3f}s, hit {row['hit_ttft_s']:.3f}s "
                    f"({row['speedup']:.1f}x), cached {hit.usage.cached_tokens}"
                    + (f", transformers {row['transformers_ttft_s']:.3f}s" if hf is not None else ""))
        for n in throughput_lens:  # ours and transformers interleaved, median of `repeats`
            ours_p, ours_d, hf_p, hf_d = [], [], [], []
            for _ in range(repeats):
                ns = f"tp-{rng.random()}"
                ours_p.append(n / engine.generate(random_tokens(rng, n, vocab), max_tokens=1,
                                                  namespace=ns).timings.ttft_s)
                ours_d.append(_ours_decode_tps(engine, random_tokens(rng, n, vocab), decode_tokens, ns))
                if hf is not None:
                    hf_p.append(n / _hf_ttft(hf, random_tokens(rng, n, vocab)))
                    hf_d.append(_hf_decode_tps(hf, random_tokens(rng, n, vocab), decode_tokens))
            row = {"dtype": dtype, "prompt_len": n, "repeats": repeats, "prefill_tps": statistics.median(ours_p),
                   "decode_tps": statistics.median(ours_d)}
            if hf is not None:
                row["transformers_prefill_tps"] = statistics.median(hf_p)
                row["transformers_decode_tps"] = statistics.median(hf_d)
            res.throughput.append(row)
            log(f"[throughput {dtype}] {n} tokens: prefill {row['prefill_tps']:.1f} tok/s, decode "
                f"{row['decode_tps']:.2f} tok/s" + (f"; transformers prefill {row['transformers_prefill_tps']:.1f}, "
                                                   f"decode {row['transformers_decode_tps']:.2f}" if hf else ""))
        if first:  # overhead of caching on a prompt that shares nothing: on vs off, alternating
            off = Engine.from_pretrained(model, dtype=dtype, enable_prefix_caching=False)
            on_times, off_times = [], []
            n = throughput_lens[-1]
            for _ in range(5):
                on_times.append(engine.generate(random_tokens(rng, n, vocab), max_tokens=1).timings.ttft_s)
                off_times.append(off.generate(random_tokens(rng, n, vocab), max_tokens=1).timings.ttft_s)
            on, offm = statistics.median(on_times), statistics.median(off_times)
            res.overhead = {"dtype": dtype, "prompt_len": n, "caching_on_ttft_s": on, "caching_off_ttft_s": offm,
                            "slowdown_pct": 100.0 * (on / offm - 1.0)}
            log(f"[overhead] unshared {n}-token prompt: on {on:.3f}s, off {offm:.3f}s "
                f"({res.overhead['slowdown_pct']:+.2f}%)")
            del off
        del engine, hf
    return res


def to_markdown(res: PrefixResults) -> str:
    s = res.setup
    lines = [f"# Prefix caching benchmark ({s.get('date', '')})", "",
             f"Model `{s.get('model')}`; {s.get('processor')} ({s.get('machine')}); torch {s.get('torch')}. "
             f"Prompts: random token ids; each prefix is followed by a {s.get('suffix_len')}-token suffix. "
             "Produced by `make bench` (`promptstash bench prefix`); one run, figures as measured.", "",
             "## TTFT: cold vs cache hit", "",
             "| dtype | prefix | cold TTFT (s) | hit TTFT (s) | cold / hit | cached tokens | transformers TTFT (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res.ttft:
        hf = f"{r['transformers_ttft_s']:.3f}" if "transformers_ttft_s" in r else "-"
        lines.append(f"| {r['dtype']} | {r['prefix_len']} | {r['cold_ttft_s']:.3f} | {r['hit_ttft_s']:.3f} | "
                     f"{r['speedup']:.1f}x | {r['hit_cached_tokens']} | {hf} |")
    lines += ["", "## Prefill and decode throughput (ours vs transformers, same dtype)", "",
              "Median of 3 runs each, interleaved. Decode: tokens/s over the decode steps after a prefill of "
              "`prompt` tokens; transformers decodes with its own KV cache.", "",
              "| dtype | prompt | prefill tok/s | transformers prefill tok/s | decode tok/s | "
              "transformers decode tok/s |", "|---|---:|---:|---:|---:|---:|"]
    for r in res.throughput:
        hp = f"{r['transformers_prefill_tps']:.1f}" if "transformers_prefill_tps" in r else "-"
        hd = f"{r['transformers_decode_tps']:.2f}" if "transformers_decode_tps" in r else "-"
        lines.append(f"| {r['dtype']} | {r['prompt_len']} | {r['prefill_tps']:.1f} | {hp} | "
                     f"{r['decode_tps']:.2f} | {hd} |")
    o = res.overhead
    if o:
        lines += ["", "## Overhead of caching on a prompt that shares nothing", "",
                  f"{o['prompt_len']}-token unshared prompts, median of 5 ({o['dtype']}): caching on "
                  f"{o['caching_on_ttft_s']:.3f} s, off {o['caching_off_ttft_s']:.3f} s "
                  f"({o['slowdown_pct']:+.2f}%)."]
    lines += ["", "## KV bytes per token", ""]
    lines += [f"- {k}: {v:,} bytes" for k, v in res.kv_bytes_per_token.items()]
    return "\n".join(lines) + "\n"


def write(res: PrefixResults, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "prefix.json", out_dir / "prefix.md"
    js.write_text(json.dumps(asdict(res), indent=2) + "\n")
    md.write_text(to_markdown(res))
    return js, md
