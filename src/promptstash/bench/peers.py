"""`promptstash bench peers`: promptstash against llama.cpp on the same GGUF file, 2 threads each.

Two parts, both with llama.cpp through llama-cpp-python (`pip install -e ".[peers]"`; without it the benchmark
says so and measures promptstash alone):

In-process, for each promptstash weight format asked (default auto, int8, float32; auto is recorded with the
format it resolved to), each figure measured `repeats` times (default 3), alternating: a promptstash measurement,
then a llama.cpp one, then the next repeat; the report gives medians. Prompts are random token ids from a fixed
seed in 1000..30000 (ordinary vocabulary), so both engines get the very same input.

- cold prefill tok/s at 512, 2048 and 8192 tokens: promptstash `generate(ids, max_tokens=1)` in a fresh
  namespace (nothing cached), tokens / TTFT; llama.cpp `reset()` then tokens / the time of `eval(ids)`.
- hit TTFT with 2048 and 8192 cached tokens + 32 new: warm with prefix + 32 tokens A, then time prefix + 32
  other tokens B to the first token. promptstash: the same namespace, `generate(max_tokens=1)`, its TTFT.
  llama.cpp: `eval(prefix + A)`, then `generate(prefix + B)`, which keeps the longest common prefix of its
  context and evaluates the rest, timed to its first token. (NOTE: llama-cpp-python matches the prefix only
  with `reset=True`, the default; `reset=False` appends to the context instead.)
- decode tok/s over 128 greedy tokens (end of text ignored) from a short chat prompt: promptstash's decode time
  is its total time minus TTFT; llama.cpp's the time from the first to the last token `generate` yields
  (temp 0, top_k 1). Both count tokens after the first.

Server (skipped with `--no-server`): a multi-user chat workload against `promptstash serve` and then against
llama.cpp's server (`python -m llama_cpp.server` with its RAM prompt cache), never both at once, each killed
after its run. 8 users, each with its own ~1,500-token document (MuSiQue passages) behind a shared ~1,000-token
system prompt, ask 3 questions as a growing multi-turn chat (each turn resends the history with the previous
answers), max_tokens 32, temperature 0, 4 users at a time, streamed through the official `openai` client.
Measured: TTFT p50 / p90 (to the first content chunk), total wall time, cached tokens the usage reports
(promptstash's `prompt_tokens_details.cached_tokens`; what llama.cpp reports, if anything), and the peak RSS of
each server's process tree (VmRSS summed over the tree and the main process's VmHWM, polled every 0.5 s).

Targets (the performance issue's): decode >= 1.0x llama.cpp for int4 and >= 0.8x for int8; hit TTFT at 8192
<= 0.8x llama.cpp's; cold prefill >= 1.5x at 2048 and 8192; server total time <= 0.6x llama.cpp's; server
peak RSS <= 1.5 GB.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from promptstash.bench.perplexity import THREADS, llama_cpp_version, machine

HOST = "127.0.0.1"
DEFAULT_FORMATS = ("auto", "int8", "float32")
PREFILL_LENS = (512, 2048, 8192)
HIT_LENS = (2048, 8192)
HIT_NEW_TOKENS = 32
DECODE_TOKENS = 128
REPEATS = 3
SEED = 0
TOKEN_RANGE = (1000, 30000)  # random prompt ids: ordinary vocabulary, no special tokens
DECODE_PROMPT = [{"role": "user", "content": "Write a long, detailed story about a lighthouse keeper who finds a "
                                             "message in a bottle. Describe the sea, the weather and the town."}]
QUICK = {"lengths": [128], "hit_lengths": [128], "decode_tokens": 8, "repeats": 1}
# server workload
SERVER = {"users": 8, "questions": 3, "doc_tokens": 1500, "system_tokens": 1000, "max_tokens": 32, "concurrency": 4,
          "n_ctx": 8192}
SERVER_QUICK = {"users": 2, "questions": 2, "doc_tokens": 256, "system_tokens": 128, "max_tokens": 8,
                "concurrency": 2, "n_ctx": 2048}
FOLLOW_UPS = ("Which passages of the document support your answer? Name them by their first words.",
              "Give one more fact from the document that relates to the first question.",
              "Summarize the document in one sentence.")
RSS_POLL_S = 0.5
SERVER_START_S = 600.0
# targets: (figure kind, length or None, which formats, bound, "min" (ratio >= bound) or "max" (ratio <= bound))
DECODE_TARGETS = {"int4": 1.0, "int8": 0.8}
HIT_TARGET = (8192, 0.8)
PREFILL_TARGET = ((2048, 8192), 1.5)
SERVER_WALL_TARGET = 0.6
SERVER_RSS_TARGET = 1.5e9  # bytes (1.5 GB)


# promptstash alone (llama-cpp-python's Llama runs one sequence): decode with this many sequences at once
DECODE_BATCHES = (4, 16)


def random_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(*TOKEN_RANGE) for _ in range(n)]


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


# -- in-process measurements -------------------------------------------------------------------------------
class PromptstashSide:
    """One promptstash engine (one weight format); every measurement in its own namespace."""

    def __init__(self, weights: str, max_len: int, model: str | None, engine: Any = None) -> None:
        """engine: an already loaded engine to measure (kept open by close()); else one is loaded."""
        from promptstash.engine.engine import Engine

        dtype = "float32" if weights == "float32" else "auto"
        start = time.perf_counter()
        self.owned = engine is None
        self.engine = engine or Engine.from_pretrained(model, weights=weights, dtype=dtype, progress=False,
                                                       num_threads=THREADS, kv_cache_tokens=max_len + 512)
        self.load_s = time.perf_counter() - start
        self.weights = weights
        self.resolved = self.engine.model.weight_format
        self.dtype = str(self.engine.model.dtype).removeprefix("torch.")
        self.engine.generate(random_ids(64, SEED - 1), max_tokens=2, ignore_eos=True, namespace=self._ns("warm-up"))

    def _ns(self, what: str) -> str:
        return f"peers-{what}-{uuid.uuid4().hex}"

    def prefill_s(self, ids: list[int]) -> float:
        out = self.engine.generate(ids, max_tokens=1, ignore_eos=True, temperature=0, namespace=self._ns("cold"))
        if out.usage.cached_tokens:
            raise RuntimeError(f"cold prefill reused {out.usage.cached_tokens} cached tokens")
        return out.timings.ttft_s

    def hit_ttft_s(self, prefix: list[int], a: list[int], b: list[int]) -> tuple[float, int]:
        ns = self._ns("hit")
        self.engine.generate(prefix + a, max_tokens=0, namespace=ns)
        out = self.engine.generate(prefix + b, max_tokens=1, ignore_eos=True, temperature=0, namespace=ns)
        return out.timings.ttft_s, out.usage.cached_tokens

    def decode_tok_s(self, ids: list[int], n: int) -> float:
        out = self.engine.generate(ids, max_tokens=n, ignore_eos=True, temperature=0, namespace=self._ns("decode"))
        got = len(out.token_ids)
        if got != n:
            raise RuntimeError(f"decode produced {got} tokens, not {n} ({out.finish_reason})")
        return (got - 1) / (out.timings.total_s - out.timings.ttft_s)

    def decode_batch_tok_s(self, ids: list[int], n: int, num_seqs: int) -> float:
        """Total decode tok/s with num_seqs sequences running at once (distinct prompts, continuous batching):
        tokens after each one's first, over the time from the last first token to the last token."""
        prompts = [ids + random_ids(4, SEED + 100 + i) for i in range(num_seqs)]
        start = time.perf_counter()
        outs = self.engine.generate_many(prompts, max_tokens=n, ignore_eos=True, temperature=0,
                                         namespace=self._ns("batch"))
        wall = time.perf_counter() - start
        first = max(o.timings.ttft_s for o in outs)
        return sum(len(o.token_ids) - 1 for o in outs) / (wall - first)

    def close(self) -> None:
        if self.owned:
            self.engine.close()
        del self.engine
        gc.collect()


class LlamaSide:
    """llama.cpp (llama-cpp-python) on the GGUF file, one context of n_ctx tokens."""

    def __init__(self, gguf: Path, n_ctx: int) -> None:
        from llama_cpp import Llama

        start = time.perf_counter()
        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=512, n_threads=THREADS, n_threads_batch=THREADS,
                         logits_all=False, verbose=False)
        self.load_s = time.perf_counter() - start
        self.decode_tok_s(random_ids(64, SEED - 1), 2)  # warm-up, as promptstash's

    def prefill_s(self, ids: list[int]) -> float:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - start

    def hit_ttft_s(self, prefix: list[int], a: list[int], b: list[int]) -> tuple[float, int]:
        self.llm.reset()
        self.llm.eval(prefix + a)
        start = time.perf_counter()
        gen = self.llm.generate(prefix + b, temp=0.0, top_k=1)  # reset=True: keeps the longest common prefix
        next(gen)
        ttft = time.perf_counter() - start
        gen.close()
        return ttft, common_prefix(prefix + a, prefix + b)

    def decode_tok_s(self, ids: list[int], n: int) -> float:
        self.llm.reset()
        times = []
        gen = self.llm.generate(ids, temp=0.0, top_k=1)
        for _ in gen:
            times.append(time.perf_counter())
            if len(times) == n:
                break
        gen.close()
        return (len(times) - 1) / (times[-1] - times[0])

    def close(self) -> None:
        self.llm.close()
        del self.llm
        gc.collect()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def measure(ps: PromptstashSide, llama: LlamaSide | None, lengths: Sequence[int], hit_lengths: Sequence[int],
            decode_ids: list[int], decode_tokens: int, repeats: int, llama_samples: dict[str, Any],
            log: Callable[[str], None]) -> dict[str, Any]:
    """Every figure for one promptstash format, alternating with llama.cpp repeat by repeat; llama.cpp's samples
    are appended to llama_samples (pooled over the formats)."""
    res: dict[str, Any] = {"format": ps.weights, "resolved": ps.resolved, "dtype": ps.dtype, "load_s": ps.load_s,
                           "prefill": [], "hit": [], "decode": None}

    def pooled(kind: str, n: int | None) -> dict[str, Any]:
        rows = llama_samples.setdefault(kind, [])
        row = next((r for r in rows if r["len"] == n), None)
        if row is None:
            row = {"len": n, "samples": [], **({"cached_tokens": []} if kind == "hit" else {})}
            rows.append(row)
        return row

    for n in lengths:
        ids = random_ids(n, SEED + n)
        ours, theirs = [], pooled("prefill", n)
        for _ in range(repeats):
            ours.append(ps.prefill_s(ids))
            if llama is not None:
                theirs["samples"].append(llama.prefill_s(ids))
        res["prefill"].append({"len": n, "samples_s": ours, "tok_s": n / _median(ours)})
        log(f"  {ps.weights}: cold prefill {n}: {n / _median(ours):,.0f} tok/s"
            + (f" (llama.cpp {n / _median(theirs['samples']):,.0f})" if llama is not None else ""))
    for n in hit_lengths:
        prefix = random_ids(n, SEED + 7 * n + 1)
        a = random_ids(HIT_NEW_TOKENS, SEED + 2)
        b = random_ids(HIT_NEW_TOKENS, SEED + 3)
        if a[0] == b[0]:
            b[0] = TOKEN_RANGE[0] + (a[0] + 1 - TOKEN_RANGE[0]) % (TOKEN_RANGE[1] - TOKEN_RANGE[0])
        ours, cached, theirs = [], [], pooled("hit", n)
        for _ in range(repeats):
            ttft, c = ps.hit_ttft_s(prefix, a, b)
            ours.append(ttft)
            cached.append(c)
            if llama is not None:
                ttft, c = llama.hit_ttft_s(prefix, a, b)
                theirs["samples"].append(ttft)
                theirs["cached_tokens"].append(c)
        res["hit"].append({"len": n, "samples_s": ours, "ttft_s": _median(ours), "cached_tokens": cached})
        log(f"  {ps.weights}: hit TTFT {n}+{HIT_NEW_TOKENS}: {_median(ours):.3f} s, cached {cached}"
            + (f" (llama.cpp {_median(theirs['samples']):.3f} s)" if llama is not None else ""))
    ours, theirs = [], pooled("decode", None)
    for _ in range(repeats):
        ours.append(ps.decode_tok_s(decode_ids, decode_tokens))
        if llama is not None:
            theirs["samples"].append(llama.decode_tok_s(decode_ids, decode_tokens))
    res["decode"] = {"tokens": decode_tokens, "samples_tok_s": ours, "tok_s": _median(ours)}
    log(f"  {ps.weights}: decode {_median(ours):.1f} tok/s"
        + (f" (llama.cpp {_median(theirs['samples']):.1f})" if llama is not None else ""))
    res["decode_batch"] = []
    for num_seqs in DECODE_BATCHES:
        samples = [ps.decode_batch_tok_s(decode_ids, decode_tokens, num_seqs) for _ in range(repeats)]
        res["decode_batch"].append({"num_seqs": num_seqs, "samples_tok_s": samples, "tok_s": _median(samples)})
        log(f"  {ps.weights}: decode with {num_seqs} sequences: {_median(samples):.1f} tok/s in all")
    return res


def llama_summary(samples: dict[str, Any], decode_tokens: int) -> dict[str, Any]:
    """Medians of llama.cpp's pooled samples, in the same shape as a promptstash format's figures."""
    return {
        "prefill": [{"len": r["len"], "samples_s": r["samples"], "tok_s": r["len"] / _median(r["samples"])}
                    for r in samples.get("prefill", []) if r["samples"]],
        "hit": [{"len": r["len"], "samples_s": r["samples"], "ttft_s": _median(r["samples"]),
                 "cached_tokens": r["cached_tokens"]} for r in samples.get("hit", []) if r["samples"]],
        "decode": next(({"tokens": decode_tokens, "samples_tok_s": r["samples"], "tok_s": _median(r["samples"])}
                        for r in samples.get("decode", []) if r["samples"]), None),
    }


# -- the table and the targets -----------------------------------------------------------------------------
def figure_rows(formats: list[dict[str, Any]], llama: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per figure: each format's value, llama.cpp's, and promptstash / llama.cpp per format (for TTFT a
    ratio of times: lower is better)."""
    def row(figure: str, kind: str, n: int | None, unit: str, higher_better: bool,
            get: Callable[[dict[str, Any]], float | None]) -> dict[str, Any]:
        values = {f["format"]: get(f) for f in formats}
        theirs = get(llama) if llama is not None else None
        ratios = {k: (v / theirs if v is not None and theirs else None) for k, v in values.items()}
        return {"figure": figure, "kind": kind, "len": n, "unit": unit, "higher_is_better": higher_better,
                "values": values, "llama_cpp": theirs, "ratios": ratios}

    def pick(part: str, n: int, key: str) -> Callable[[dict[str, Any]], float | None]:
        return lambda side: next((r[key] for r in side.get(part, []) if r["len"] == n), None)

    lens = sorted({r["len"] for f in formats for r in f["prefill"]})
    hits = sorted({r["len"] for f in formats for r in f["hit"]})
    rows = [row(f"cold prefill {n:,} tokens", "prefill", n, "tok/s", True, pick("prefill", n, "tok_s"))
            for n in lens]
    rows += [row(f"hit TTFT {n:,} cached + {HIT_NEW_TOKENS} new", "hit", n, "s", False, pick("hit", n, "ttft_s"))
             for n in hits]
    tokens = next((f["decode"]["tokens"] for f in formats if f.get("decode")), DECODE_TOKENS)
    rows.append(row(f"decode ({tokens} tokens)", "decode", None, "tok/s", True,
                    lambda side: side["decode"]["tok_s"] if side.get("decode") else None))
    for num_seqs in sorted({b["num_seqs"] for f in formats for b in f.get("decode_batch", [])}):
        rows.append(row(f"decode, {num_seqs} sequences at once, all sequences", "decode_batch", num_seqs, "tok/s",
                        True, lambda side, k=num_seqs: next(
                            (b["tok_s"] for b in side.get("decode_batch", []) if b["num_seqs"] == k), None)))
    return rows


def _target(name: str, fmt: str, ratio: float | None, bound: float, at_least: bool) -> dict[str, Any]:
    passed = None if ratio is None else (ratio >= bound if at_least else ratio <= bound)
    return {"target": name, "format": fmt, "ratio": ratio, "bound": bound, "at_least": at_least, "passed": passed}


def evaluate_targets(formats: list[dict[str, Any]], rows: list[dict[str, Any]],
                     server: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The issue's targets as rows; passed None where the figure was not measured (length not asked, no
    llama.cpp)."""
    out = []
    by = {(r["kind"], r["len"]): r for r in rows}
    for f in formats:
        name = f["format"] if f["format"] == f["resolved"] else f"{f['format']} ({f['resolved']})"
        bound = DECODE_TARGETS.get(f["resolved"])
        if bound is not None:
            ratio = by[("decode", None)]["ratios"][f["format"]]
            out.append(_target(f"decode >= {bound:.1f}x llama.cpp", name, ratio, bound, True))
        n, bound = HIT_TARGET
        r = by.get(("hit", n))
        out.append(_target(f"hit TTFT at {n:,} <= {bound:.1f}x llama.cpp's", name,
                           r["ratios"][f["format"]] if r else None, bound, False))
        lens, bound = PREFILL_TARGET
        for n in lens:
            r = by.get(("prefill", n))
            out.append(_target(f"cold prefill at {n:,} >= {bound:.1f}x llama.cpp", name,
                               r["ratios"][f["format"]] if r else None, bound, True))
    if server is not None:
        ps, ll = server.get("promptstash"), server.get("llama_cpp")
        ratio = ps["wall_s"] / ll["wall_s"] if ps and ll else None
        out.append(_target(f"server total time <= {SERVER_WALL_TARGET:.1f}x llama.cpp's", "server", ratio,
                           SERVER_WALL_TARGET, False))
        rss = ps["peak_rss_bytes"] if ps else None
        out.append({"target": f"server peak RSS <= {SERVER_RSS_TARGET / 1e9:.1f} GB", "format": "server",
                    "value": rss, "bound": SERVER_RSS_TARGET, "at_least": False,
                    "passed": None if rss is None else rss <= SERVER_RSS_TARGET})
    return out


# -- server part: processes, memory, the workload ----------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (from /proc/<pid>/task/<tid>/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError, ValueError):
                    todo += [int(c) for c in (task / "children").read_text().split()]
    return out


class RssPoller:
    """Peak memory of a process tree: max over polls of the summed VmRSS, and the main process's VmHWM."""

    def __init__(self, pid: int, interval_s: float = RSS_POLL_S) -> None:
        self.pid, self.interval = pid, interval_s
        self.peak_tree_kib = 0
        self.hwm_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="peers-rss", daemon=True)

    def _poll(self) -> None:
        total = sum(_status_kib(p, "VmRSS") or 0 for p in process_tree(self.pid))
        self.peak_tree_kib = max(self.peak_tree_kib, total)
        self.hwm_kib = max(self.hwm_kib, _status_kib(self.pid, "VmHWM") or 0)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._poll()
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def peak_bytes(self) -> int:
        return 1024 * max(self.peak_tree_kib, self.hwm_kib)


@contextlib.contextmanager
def server_process(cmd: list[str], ready_path: str, log_path: Path, env: dict[str, str] | None = None
                   ) -> Iterator[tuple[subprocess.Popen, float]]:
    """Start a server, wait until `ready_path` answers 200 (its URL), yield (process, start seconds); kill it."""
    import httpx

    start = time.monotonic()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    try:
        while True:
            if proc.poll() is not None or time.monotonic() - start > SERVER_START_S:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{cmd[2:4]} did not start (exit {proc.poll()}):\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready_path, timeout=5).status_code == 200:
                    break
            time.sleep(0.25)
        yield proc, time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)


def served_format(log_text: str) -> dict[str, str | None]:
    """The weight format and activation dtype from `promptstash serve`'s ready line (None if it does not say)."""
    from promptstash.deploy.local import DeploymentError
    from promptstash.deploy.local import served_format as ready_line_format

    try:
        weights, dtype = ready_line_format(log_text)
    except DeploymentError:
        return {"weights": None, "dtype": None}
    return {"weights": weights, "dtype": dtype}


def serve_has_weights_flag() -> bool:
    out = subprocess.run([sys.executable, "-m", "promptstash.cli", "serve", "--help"], capture_output=True,
                         text=True, timeout=120)
    return "--weights" in out.stdout


def _clip_tokens(tokenizer: Any, text: str, n: int) -> str:
    return tokenizer.decode(tokenizer.encode(text)[:n])


def build_conversations(tokenizer: Any, users: int, doc_tokens: int, system_tokens: int,
                        questions: int) -> tuple[str, list[dict[str, Any]]]:
    """The shared system prompt and, per user, a document of doc_tokens tokens of MuSiQue passages (its own
    examples) and its questions (the example's question, then follow-ups)."""
    from promptstash.bench.workloads import _data_file

    examples = json.loads(_data_file("rag/musique_dev.json").read_text())
    rules = "\n".join(
        f"Guideline {i}: read every passage of the document before answering; quote names, dates and numbers "
        f"exactly as written; when passages disagree, say so and name both; answer in at most two sentences; "
        f"never invent facts that the document does not state (rule set {i})." for i in range(1, 200))
    system = _clip_tokens(tokenizer, "You are a careful research assistant. Answer questions about the user's "
                                     "document using only its passages.\n" + rules, system_tokens)
    convs = []
    for u in range(users):
        passages: list[str] = []
        for ex in examples[u::users]:
            passages += [c["text"] for c in ex["ctxs"]]
            if len(tokenizer.encode("\n\n".join(passages))) >= doc_tokens:
                break
        doc = _clip_tokens(tokenizer, "\n\n".join(passages), doc_tokens)
        qs = [examples[u % len(examples)]["question"], *FOLLOW_UPS][:questions]
        convs.append({"user": u, "document": doc, "questions": qs})
    return system, convs


def run_user(base_url: str, model: str, system: str, conv: dict[str, Any], max_tokens: int,
             t0: float) -> list[dict[str, Any]]:
    """One user's chat: each turn resends the history with the previous answers; streamed."""
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="peers", timeout=1800, max_retries=0)
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    records = []
    for turn, question in enumerate(conv["questions"]):
        content = f"Document:\n{conv['document']}\n\nQuestion: {question}" if turn == 0 else question
        messages.append({"role": "user", "content": content})
        start = time.perf_counter()
        stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True, stream_options={"include_usage": True})
        ttft, parts, usage = None, [], None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if ttft is None:
                    ttft = time.perf_counter() - start
                parts.append(chunk.choices[0].delta.content)
            if getattr(chunk, "usage", None) is not None:
                usage = chunk.usage
        e2e = time.perf_counter() - start
        details = getattr(usage, "prompt_tokens_details", None) if usage is not None else None
        records.append({"user": conv["user"], "turn": turn + 1, "ttft_s": ttft if ttft is not None else e2e,
                        "e2e_s": e2e, "start_s": start - t0, "chars": len("".join(parts)),
                        "prompt_tokens": usage.prompt_tokens if usage is not None else None,
                        "completion_tokens": usage.completion_tokens if usage is not None else None,
                        "cached_tokens": getattr(details, "cached_tokens", None) if details is not None else None})
        messages.append({"role": "assistant", "content": "".join(parts)})
    return records


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def run_workload(base_url: str, pid: int, system: str, convs: list[dict[str, Any]], max_tokens: int,
                 concurrency: int) -> dict[str, Any]:
    import httpx

    model = httpx.get(base_url + "/v1/models", timeout=60).json()["data"][0]["id"]
    with RssPoller(pid) as rss:
        run_user(base_url, model, "You are brief.", {"user": -1, "document": "", "questions": ["Say hi."]}, 1,
                 time.perf_counter())  # warm-up: first-request setup is not part of the workload
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="peers-user") as pool:
            futures = [pool.submit(run_user, base_url, model, system, c, max_tokens, t0) for c in convs]
            records = [r for f in futures for r in f.result()]
        wall = time.perf_counter() - t0
    ttfts = [r["ttft_s"] for r in records]
    cached = [r["cached_tokens"] for r in records if r["cached_tokens"] is not None]
    prompt = [r["prompt_tokens"] for r in records if r["prompt_tokens"] is not None]
    return {"model": model, "wall_s": wall, "requests": len(records), "ttft_p50_s": _percentile(ttfts, 0.5),
            "ttft_p90_s": _percentile(ttfts, 0.9), "e2e_mean_s": statistics.fmean(r["e2e_s"] for r in records),
            "prompt_tokens": sum(prompt) if prompt else None, "cached_tokens": sum(cached) if cached else None,
            "usage_reported": sum(r["prompt_tokens"] is not None for r in records),
            "cached_reported": len(cached), "peak_rss_bytes": rss.peak_bytes, "peak_tree_rss_bytes":
            1024 * rss.peak_tree_kib, "main_vmhwm_bytes": 1024 * rss.hwm_kib, "records": records}


def run_server_part(gguf: Path | None, tokenizer: Any, settings: dict[str, Any], work: Path, with_llama: bool,
                    log: Callable[[str], None],
                    conversations: tuple[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    system, convs = conversations or build_conversations(tokenizer, settings["users"], settings["doc_tokens"],
                                                         settings["system_tokens"], settings["questions"])
    res: dict[str, Any] = {"settings": settings, "system_tokens": len(tokenizer.encode(system)),
                           "doc_tokens": [len(tokenizer.encode(c["document"])) for c in convs]}
    work.mkdir(parents=True, exist_ok=True)
    env = {"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    port = free_port()
    cmd = [sys.executable, "-m", "promptstash.cli", "serve", "--host", HOST, "--port", str(port), "--no-disk-cache",
           "--log-level", "warning"]
    if serve_has_weights_flag():
        cmd += ["--weights", "auto"]
    res["promptstash_cmd"] = " ".join(cmd[1:])
    log(f"server: promptstash serve ({settings['users']} users x {settings['questions']} turns, concurrency "
        f"{settings['concurrency']})")
    with server_process(cmd, f"http://{HOST}:{port}/health", work / "promptstash-serve.log", env) as (proc, start_s):
        res["promptstash"] = {**run_workload(f"http://{HOST}:{port}", proc.pid, system, convs,
                                             settings["max_tokens"], settings["concurrency"]), "start_s": start_s}
    res["promptstash"].update(served_format((work / "promptstash-serve.log").read_text(errors="replace")))
    log(f"  promptstash: {res['promptstash']['wall_s']:.1f} s, TTFT p50 {res['promptstash']['ttft_p50_s']:.2f} s, "
        f"peak RSS {res['promptstash']['peak_rss_bytes'] / 2**20:,.0f} MiB")
    res["llama_cpp"] = None
    if with_llama and gguf is not None:
        port = free_port()
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", str(THREADS),
               "--n_threads_batch", str(THREADS), "--n_ctx", str(settings["n_ctx"]), "--cache", "true",
               "--cache_type", "ram", "--logits_all", "false", "--interrupt_requests", "false", "--verbose", "false",
               "--host", HOST, "--port", str(port)]
        res["llama_cpp_cmd"] = " ".join(cmd[1:])
        log("server: llama_cpp.server")
        with server_process(cmd, f"http://{HOST}:{port}/v1/models", work / "llama-cpp-server.log") as (proc, start_s):
            res["llama_cpp"] = {**run_workload(f"http://{HOST}:{port}", proc.pid, system, convs,
                                               settings["max_tokens"], settings["concurrency"]), "start_s": start_s}
        log(f"  llama.cpp: {res['llama_cpp']['wall_s']:.1f} s, TTFT p50 {res['llama_cpp']['ttft_p50_s']:.2f} s, "
            f"peak RSS {res['llama_cpp']['peak_rss_bytes'] / 2**20:,.0f} MiB")
    return res


# -- the run -----------------------------------------------------------------------------------------------
def run(formats: Sequence[str] | None = None, lengths: Sequence[int] | None = None,
        hit_lengths: Sequence[int] | None = None, decode_tokens: int | None = None, repeats: int | None = None,
        server: bool = True, quick: bool = False, users: int | None = None, model: str | None = None,
        work_dir: Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    from promptstash.models.loader import GGUF_WEIGHTS, resolve_model
    from promptstash.models.tokenizer import Tokenizer

    started = time.perf_counter()
    formats = list(formats or DEFAULT_FORMATS)
    lengths = list(lengths or (QUICK["lengths"] if quick else PREFILL_LENS))
    hit_lengths = list(hit_lengths or (QUICK["hit_lengths"] if quick else HIT_LENS))
    decode_tokens = decode_tokens or (QUICK["decode_tokens"] if quick else DECODE_TOKENS)
    repeats = repeats or (QUICK["repeats"] if quick else REPEATS)
    settings = dict(SERVER_QUICK if quick else SERVER)
    if users:
        settings["users"] = users
    torch.set_num_threads(THREADS)
    resolved = resolve_model(model, progress=False)
    tokenizer = Tokenizer.from_dir(resolved.path)
    gguf = resolved.path / GGUF_WEIGHTS
    note = None
    if llama_cpp_version() is None:
        note = ("llama.cpp not measured: llama_cpp is not importable (pip install -e \".[peers]\"; PyPI ships "
                "llama-cpp-python as source, so pip builds llama.cpp: needs cmake and a C++ compiler)")
    elif not gguf.is_file():
        note = f"llama.cpp not measured: the model has no GGUF file ({gguf})"
    if note:
        log(note)
    with_llama = note is None
    conversations, server_note = None, None
    if server:  # the server workload's documents, before the long in-process part: missing data skips it
        from promptstash.bench.workloads import DataNotFoundError

        try:
            conversations = build_conversations(tokenizer, settings["users"], settings["doc_tokens"],
                                                settings["system_tokens"], settings["questions"])
        except DataNotFoundError as exc:
            server_note = f"server part skipped: {exc}"
            log(server_note)
    max_len = max([*lengths, *(n + 2 * HIT_NEW_TOKENS for n in hit_lengths), 256 + decode_tokens])
    log(f"bench peers: formats {', '.join(formats)}; cold prefill {lengths}, hit {hit_lengths} + {HIT_NEW_TOKENS}, "
        f"decode {decode_tokens} tokens; {repeats} repeats, {THREADS} threads each")
    llama = LlamaSide(gguf, max_len + 256) if with_llama else None
    decode_ids = tokenizer.encode(tokenizer.apply_chat_template(DECODE_PROMPT, add_generation_prompt=True))
    per_format, llama_samples = [], {}
    try:
        for fmt in formats:
            ps = PromptstashSide(fmt, max_len, model)
            log(f"promptstash {fmt}: {ps.resolved} weights, {ps.dtype} activations (loaded in {ps.load_s:.1f} s)")
            try:
                per_format.append(measure(ps, llama, lengths, hit_lengths, decode_ids, decode_tokens, repeats,
                                          llama_samples, log))
            finally:
                ps.close()
                del ps
                gc.collect()
    finally:
        llama_load_s = llama.load_s if llama is not None else None
        if llama is not None:
            llama.close()
            del llama
            gc.collect()
    llama_res = llama_summary(llama_samples, decode_tokens) if with_llama else None
    if llama_res is not None:
        llama_res["load_s"] = llama_load_s
    rows = figure_rows(per_format, llama_res)
    server_res = None
    if conversations is not None:
        import tempfile

        work = work_dir or Path(tempfile.mkdtemp(prefix="promptstash-peers-"))
        server_res = run_server_part(gguf if gguf.is_file() else None, tokenizer, settings, work, with_llama, log,
                                     conversations)
    return {
        "setup": {"formats": formats, "lengths": lengths, "hit_lengths": hit_lengths, "hit_new_tokens": HIT_NEW_TOKENS,
                  "decode_tokens": decode_tokens, "decode_prompt_tokens": len(decode_ids), "repeats": repeats,
                  "seed": SEED, "token_range": list(TOKEN_RANGE), "threads": THREADS, "quick": quick,
                  "model": resolved.model_id, "gguf": str(gguf) if gguf.is_file() else None, "server": server},
        "machine": machine(), "llama_cpp_note": note, "server_note": server_note, "formats": per_format,
        "llama_cpp": llama_res, "rows": rows, "server": server_res,
        "targets": evaluate_targets(per_format, rows, server_res), "elapsed_s": time.perf_counter() - started,
    }


# -- report ------------------------------------------------------------------------------------------------
def _value(v: float | None, unit: str) -> str:
    if v is None:
        return "–"
    return f"{v:.3f} s" if unit == "s" else f"{v:,.1f}"


def _ratio(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def _verdict(passed: bool | None) -> str:
    return "not measured" if passed is None else ("**PASS**" if passed else "**FAIL**")


def _mib(v: int | None) -> str:
    return "–" if v is None else f"{v / 2**20:,.0f} MiB"


def to_markdown(res: dict[str, Any]) -> str:
    s, m = res["setup"], res["machine"]
    names = [f["format"] if f["format"] == f["resolved"] else f"{f['format']} → {f['resolved']}"
             for f in res["formats"]]
    users = res["server"]["settings"]["users"] if res.get("server") else None
    cmd = (f"promptstash bench peers --formats {' '.join(s['formats'])} --lengths {' '.join(map(str, s['lengths']))} "
           f"--hit-lengths {' '.join(map(str, s['hit_lengths']))} --decode-tokens {s['decode_tokens']} "
           f"--repeats {s['repeats']}" + (" --quick" if s["quick"] else "") + ("" if s["server"] else " --no-server")
           + (f" --users {users}" if users else ""))
    lines = [
        "# promptstash vs llama.cpp (same GGUF, same threads)", "",
        f"Model {s['model']}; llama.cpp through llama-cpp-python {m['llama_cpp'] or '(not installed)'} on the same "
        f"GGUF file. {s['threads']} threads each; machine: {m['cpu']} ({m['cpus']} CPUs), {m['platform']}, torch "
        f"{m['torch']}. Medians of {s['repeats']} repeat(s) after a warm-up, promptstash and llama.cpp "
        f"alternating; llama.cpp's figure pools its runs beside every format. Random token ids (seed {s['seed']}, ids "
        f"{s['token_range'][0]}..{s['token_range'][1]}) as prompts; decode from a {s['decode_prompt_tokens']}-token "
        f"chat prompt, greedy, end of text ignored. Command: `{cmd}`.", "",
    ]
    if res.get("llama_cpp_note"):
        lines += [res["llama_cpp_note"] + ".", ""]
    lines += ["Activations: " + ", ".join(f"{n}: {f['dtype']}" for n, f in zip(names, res["formats"], strict=True))
              + ". For TTFT, lower is better and the ratio is promptstash's time / llama.cpp's.", ""]
    lines += ["| figure | " + " | ".join(f"promptstash {n}" for n in names) + " | llama.cpp | "
              + " | ".join(f"ratio {n}" for n in names) + " |",
              "|---|" + "---:|" * (2 * len(names) + 1)]
    for r in res["rows"]:
        unit = "" if r["unit"] == "s" else f" ({r['unit']})"
        lines.append(f"| {r['figure']}{unit} | " + " | ".join(_value(r["values"][f["format"]], r["unit"])
                                                             for f in res["formats"])
                     + f" | {_value(r['llama_cpp'], r['unit'])} | "
                     + " | ".join(_ratio(r["ratios"][f["format"]]) for f in res["formats"]) + " |")
    hit_cached = [(f, h) for f in res["formats"] for h in f["hit"]]
    if hit_cached:
        lines += ["", "Cached tokens of the hit requests (promptstash, per repeat): "
                  + "; ".join(f"{f['format']} {h['len']:,}: {h['cached_tokens']}" for f, h in hit_cached) + "."]
    if res.get("server_note"):
        lines += ["", res["server_note"]]
    srv = res.get("server")
    if srv is not None:
        st = srv["settings"]
        ps, ll = srv["promptstash"], srv.get("llama_cpp")
        served = f" ({ps['weights']} weights, {ps['dtype']} activations)" if ps.get("weights") else ""
        lines += [
            "", "## Server: multi-user chat", "",
            f"{st['users']} users, each with its own document (~{statistics.fmean(srv['doc_tokens']):,.0f} tokens of "
            f"MuSiQue passages) behind a shared {srv['system_tokens']:,}-token system prompt, {st['questions']} "
            f"questions each as a growing chat (every turn resends the history), max_tokens {st['max_tokens']}, "
            f"temperature 0, {st['concurrency']} users at a time, streamed with the `openai` client. "
            f"promptstash{served}: `{srv['promptstash_cmd']}`"
            + (f"; llama.cpp: `{srv['llama_cpp_cmd']}`" if srv.get("llama_cpp_cmd") else "")
            + ". The RSS target is checked against the larger of the two peaks below.", "",
            "| | promptstash | llama.cpp | ratio |", "|---|---:|---:|---:|"]

        def both(label: str, key: str, fmt: Callable[[Any], str], ratio: bool = True) -> None:
            a, b = ps.get(key), ll.get(key) if ll else None
            r = _ratio(a / b) if ratio and a is not None and b else "–"
            lines.append(f"| {label} | {fmt(a)} | {fmt(b) if ll else '–'} | {r} |")

        both("total time", "wall_s", lambda v: "–" if v is None else f"{v:.1f} s")
        both("TTFT p50", "ttft_p50_s", lambda v: "–" if v is None else f"{v:.2f} s")
        both("TTFT p90", "ttft_p90_s", lambda v: "–" if v is None else f"{v:.2f} s")
        both("requests", "requests", lambda v: "–" if v is None else f"{v}", ratio=False)
        both("prompt tokens (usage)", "prompt_tokens", lambda v: "not reported" if v is None else f"{v:,}",
             ratio=False)
        both("cached tokens (usage)", "cached_tokens", lambda v: "not reported" if v is None else f"{v:,}",
             ratio=False)
        both("peak RSS while serving (process tree, polled)", "peak_tree_rss_bytes", _mib)
        both("peak RSS of the process (VmHWM, loading included)", "main_vmhwm_bytes", _mib)
        both("server start", "start_s", lambda v: "–" if v is None else f"{v:.1f} s", ratio=False)
    lines += ["", "## Targets", "", "| target | format | measured | verdict |", "|---|---|---:|---|"]
    for t in res["targets"]:
        measured = _mib(t["value"]) if "value" in t else _ratio(t["ratio"])
        lines.append(f"| {t['target']} | {t['format']} | {measured} | {_verdict(t['passed'])} |")
    lines += ["", f"Total time {res['elapsed_s']:.0f} s.", ""]
    return "\n".join(lines)


def write(res: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "peers.json", out_dir / "peers.md"
    js.write_text(json.dumps(res, indent=1) + "\n")
    md.write_text(to_markdown(res))
    return js, md
