"""`promptstash bench perplexity`: does quantizing the weights cost quality? Perplexity on held-out text.

The text: MuSiQue passages (`shared/data/rag/musique_dev.json`, the distinct passages of the examples in file
order, titles and texts joined by blank lines), tokenized once with promptstash's tokenizer and cut into
`windows` consecutive windows of `window_len` tokens. Every window is a separate sequence starting at
position 0 (no BOS: the Qwen models have none); every position but the last predicts the next token, so a run
scores windows * (window_len - 1) tokens.

Scored by promptstash in each weight format (float32 weights with float32 activations; int8 and int4
weight-only with the engine's automatic activation dtype), one engine at a time (freed before the next), with
prefix caching off so every position is computed; and by llama.cpp (llama-cpp-python, `pip install -e
".[peers]"`) on the same GGUF file (the default model's Q4_K_M), fed the same token ids, with logits for every
position. Per scorer: mean negative log-likelihood (log_softmax of the float32 logits, summed in float64) and
perplexity = exp(mean NLL). Both sides run on 2 threads.

Bounds (the quantization issue's): int8 within 1% of float32, and int4 within 1% of llama.cpp on the Q4_K_M
file. NOTE: that file is not all Q4_K: for this model most linear weights are Q5_0, a few Q6_K / Q8_0 (and float32
norms); llama.cpp runs each as stored, and promptstash's int4 read from a GGUF keeps the tensors stored above 4 bits
as int8 (models/gguf.py), since requantizing them to 4 bits cost ~10% perplexity here.
"""

from __future__ import annotations

import gc
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from promptstash.bench.report import cpu_name

FORMATS = ("float32", "int8", "int4")
THREADS = 2
BOUND = 0.01  # relative perplexity difference allowed by both bounds
BOUNDS = (  # (name, numerator scorer, denominator scorer)
    ("int8 within 1% of float32", "int8", "float32"),
    ("int4 within 1% of llama.cpp Q4_K_M", "int4", "llama.cpp"),
)


# -- the text and its windows ------------------------------------------------------------------------------
def musique_text(min_chars: int) -> str:
    """Distinct MuSiQue passages in file order, joined until the text has at least min_chars characters
    (all of them if the file has fewer). Raises DataNotFoundError when the data is absent."""
    from promptstash.bench.workloads import _data_file

    examples = json.loads(_data_file("rag/musique_dev.json").read_text())
    seen: set[str] = set()
    parts: list[str] = []
    size = 0
    for ex in examples:
        for ctx in ex["ctxs"]:
            passage = "\n".join(p for p in (ctx.get("title", "").strip(), ctx["text"].strip()) if p)
            if passage and passage not in seen:
                seen.add(passage)
                parts.append(passage)
                size += len(passage) + 2
            if size >= min_chars:
                return "\n\n".join(parts)
    return "\n\n".join(parts)


def cut_windows(token_ids: Sequence[int], window_len: int, windows: int) -> list[list[int]]:
    """The first `windows` consecutive, non-overlapping windows of window_len tokens (fewer if the text is short;
    a partial window at the end is dropped)."""
    if window_len < 2:
        raise ValueError(f"window_len must be >= 2 (a window predicts window_len - 1 tokens), got {window_len}")
    count = min(windows, len(token_ids) // window_len)
    return [list(token_ids[i * window_len:(i + 1) * window_len]) for i in range(count)]


def window_nll(logits: torch.Tensor, token_ids: Sequence[int]) -> tuple[float, int]:
    """(summed negative log-likelihood, number of predictions) of one window: logits[i] [V] predicts
    token_ids[i + 1]; the last row (predicting past the window) is not used."""
    n = len(token_ids) - 1
    if logits.shape[0] < n:
        raise ValueError(f"{logits.shape[0]} logit rows for a window of {len(token_ids)} tokens")
    logp = torch.log_softmax(logits[:n].float(), dim=-1)
    target = torch.as_tensor(token_ids[1:], dtype=torch.long)
    picked = logp.gather(1, target[:, None])[:, 0]
    return float(-picked.double().sum()), n


def perplexity(total_nll: float, count: int) -> float:
    return math.exp(total_nll / count) if count else float("nan")


# -- scorers -----------------------------------------------------------------------------------------------
def score_promptstash(weights: str, windows: list[list[int]], model: str | None,
                      log: Callable[[str], None]) -> dict[str, Any]:
    from promptstash.engine.engine import Engine

    window_len = max(len(w) for w in windows)
    dtype = "float32" if weights == "float32" else "auto"
    start = time.perf_counter()
    engine = Engine.from_pretrained(model, weights=weights, dtype=dtype, progress=False, num_threads=THREADS,
                                    enable_prefix_caching=False, kv_cache_tokens=window_len + 64)
    load_s = time.perf_counter() - start
    try:
        start = time.perf_counter()
        total, count = 0.0, 0
        for ids in windows:
            out = engine.prompt_logits(ids)
            if out.num_cached_tokens:
                raise RuntimeError(f"{out.num_cached_tokens} tokens came from the cache; every position must be "
                                   "computed")
            nll, n = window_nll(out.logits, ids)
            total += nll
            count += n
        eval_s = time.perf_counter() - start
        res = {"name": weights, "engine": "promptstash", "weight_format": engine.model.weight_format,
               "dtype": str(engine.model.dtype).removeprefix("torch."), "mean_nll": total / count,
               "perplexity": perplexity(total, count), "tokens": count, "load_s": load_s, "eval_s": eval_s}
    finally:
        del engine
        gc.collect()
    log(f"promptstash {weights}: perplexity {res['perplexity']:.4f} over {count:,} tokens "
        f"({res['dtype']} activations, {eval_s:.1f} s)")
    return res


def llama_cpp_version() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return getattr(llama_cpp, "__version__", "unknown")


def score_llama_cpp(gguf: Path, windows: list[list[int]], log: Callable[[str], None]) -> dict[str, Any]:
    import numpy as np
    from llama_cpp import Llama

    window_len = max(len(w) for w in windows)
    start = time.perf_counter()
    llm = Llama(model_path=str(gguf), n_ctx=window_len, n_batch=min(512, window_len), n_threads=THREADS,
                n_threads_batch=THREADS, logits_all=True, verbose=False)
    load_s = time.perf_counter() - start
    try:
        start = time.perf_counter()
        total, count = 0.0, 0
        for ids in windows:
            llm.reset()
            llm.eval(ids)
            scores = torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32, copy=True))
            nll, n = window_nll(scores, ids)
            total += nll
            count += n
        eval_s = time.perf_counter() - start
    finally:
        llm.close()
        del llm
        gc.collect()
    res = {"name": "llama.cpp", "engine": "llama.cpp", "weight_format": "gguf (as stored)", "dtype": "float32",
           "mean_nll": total / count, "perplexity": perplexity(total, count), "tokens": count, "load_s": load_s,
           "eval_s": eval_s}
    log(f"llama.cpp: perplexity {res['perplexity']:.4f} over {count:,} tokens ({eval_s:.1f} s)")
    return res


# -- the run -----------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    import os

    cpu = cpu_name()

    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu, "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "llama_cpp": llama_cpp_version(),
            "threads": THREADS}


def evaluate(scores: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The bounds as rows: ratio of perplexities, and PASS / FAIL (None: a side was not measured)."""
    rows = []
    for name, num, den in BOUNDS:
        a, b = scores.get(num), scores.get(den)
        ratio = a["perplexity"] / b["perplexity"] if a and b else None
        rows.append({"bound": name, "numerator": num, "denominator": den, "ratio": ratio, "limit": 1 + BOUND,
                     "passed": None if ratio is None else abs(ratio - 1) <= BOUND})
    return rows


def run(window_len: int = 512, windows: int = 8, formats: Sequence[str] = FORMATS, model: str | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    from promptstash.models.loader import GGUF_WEIGHTS, resolve_model
    from promptstash.models.tokenizer import Tokenizer

    started = time.perf_counter()
    torch.set_num_threads(THREADS)
    resolved = resolve_model(model, progress=False)
    tokenizer = Tokenizer.from_dir(resolved.path)
    text = musique_text(min_chars=window_len * windows * 6)  # ~4 characters a token, with a margin
    ids = tokenizer.encode(text)
    cut = cut_windows(ids, window_len, windows)
    if not cut:
        raise RuntimeError(f"the text has {len(ids)} tokens, fewer than one window of {window_len}")
    if len(cut) < windows:
        log(f"the text has {len(ids):,} tokens: {len(cut)} windows of {window_len}, not {windows}")
    log(f"bench perplexity: {len(cut)} windows x {window_len} tokens of MuSiQue passages, formats "
        f"{', '.join(formats)} and llama.cpp, {THREADS} threads")
    scores: dict[str, dict[str, Any]] = {}
    for fmt in formats:
        scores[fmt] = score_promptstash(fmt, cut, model, log)
    gguf = resolved.path / GGUF_WEIGHTS
    llama_note = None
    if llama_cpp_version() is None:
        llama_note = ("llama.cpp not measured: llama_cpp is not importable (pip install -e \".[peers]\"; PyPI ships "
                      "llama-cpp-python as source, so pip builds llama.cpp: needs cmake and a C++ compiler)")
    elif not gguf.is_file():
        llama_note = f"llama.cpp not measured: the model has no GGUF file ({gguf})"
    if llama_note is None:
        scores["llama.cpp"] = score_llama_cpp(gguf, cut, log)
    else:
        log(llama_note)
    return {
        "setup": {"window_len": window_len, "windows": len(cut), "windows_asked": windows,
                  "text_tokens": len(ids), "model": resolved.model_id, "gguf": str(gguf) if gguf.is_file() else None,
                  "formats": list(formats), "data": "rag/musique_dev.json (distinct passages, file order)"},
        "machine": machine(), "scores": scores, "llama_cpp_note": llama_note, "bounds": evaluate(scores),
        "elapsed_s": time.perf_counter() - started,
    }


def _verdict(passed: bool | None) -> str:
    return "not measured" if passed is None else ("**PASS**" if passed else "**FAIL**")


def to_markdown(res: dict[str, Any]) -> str:
    s, m = res["setup"], res["machine"]
    lines = [
        "# Perplexity by weight format, and llama.cpp on the same GGUF", "",
        f"{s['windows']} windows of {s['window_len']} tokens of MuSiQue passages (held-out text, tokenized once with "
        f"promptstash's tokenizer), each scored from position 0: mean negative log-likelihood of every next token "
        f"(log_softmax of the float32 logits), perplexity = exp(mean NLL). Model {s['model']}. Machine: "
        f"{m['cpu']} ({m['cpus']} CPUs), {m['platform']}, torch {m['torch']}, llama-cpp-python "
        f"{m['llama_cpp'] or 'not installed'}, {m['threads']} threads each. "
        f"Command: `promptstash bench perplexity --window-len {s['window_len']} --windows {s['windows_asked']}`.", "",
        "| scorer | weights | activations | tokens | mean NLL | perplexity | vs float32 | load | scoring |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = res["scores"].get("float32")
    for name, sc in res["scores"].items():
        rel = f"{sc['perplexity'] / base['perplexity'] - 1:+.2%}" if base else "–"
        scorer = "llama.cpp" if sc["engine"] == "llama.cpp" else f"promptstash {name}"
        lines.append(f"| {scorer} | {sc['weight_format']} | {sc['dtype']} | {sc['tokens']:,} | {sc['mean_nll']:.4f} | "
                     f"{sc['perplexity']:.4f} | {rel} | {sc['load_s']:.1f} s | {sc['eval_s']:.1f} s |")
    if res.get("llama_cpp_note"):
        lines += ["", res["llama_cpp_note"] + "."]
    lines += ["", "| bound | ratio of perplexities | limit | verdict |", "|---|---:|---:|---|"]
    for b in res["bounds"]:
        ratio = "–" if b["ratio"] is None else f"{b['ratio']:.4f}"
        lines.append(f"| {b['bound']} ({b['numerator']} / {b['denominator']}) | {ratio} | "
                     f"{2 - b['limit']:.2f} .. {b['limit']:.2f} | {_verdict(b['passed'])} |")
    lines += ["", f"Total time {res['elapsed_s']:.0f} s.", ""]
    return "\n".join(lines)


def write(res: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "perplexity.json", out_dir / "perplexity.md"
    js.write_text(json.dumps(res, indent=1) + "\n")
    md.write_text(to_markdown(res))
    return js, md
