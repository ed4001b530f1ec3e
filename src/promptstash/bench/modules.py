"""`promptstash bench modules`: quality and speed of module reuse (issue 10, point 5), one strategy at a time.

Two workloads from `shared/data` (see its README.md):

- musique: each MuSiQue question with its 10 passages, every passage a module (clipped to `passage_chars`
  characters, the window centred on a gold answer's first mention when the passage has one, so that a
  2-core CPU can run it), a short fixed system prompt, the question last;
- longdoc: 5 documents of about 1,000 tokens each (a question's 10 passages, whole, joined in pairs: the
  gold passages are among them), every document a module, the question last.

For each question, its passages are first seen in other requests, in other orders and combinations (warm-up
requests with module_repair="none", one token each), so the measured request finds every module cached but
in a new order. Then each strategy answers the question, one request at a time:

- prefix: today's prefix-only caching, the same parts without module marks, in a namespace warmed with the
  system prompt only (a new passage order shares nothing beyond it);
- none | legolink:K | cacheblend:R: modules assembled with that repair, in the warmed namespace;
- full: everything recomputed (the reference), in the warmed namespace, after every approximate run (its
  exact K/V may be published as a prefix: nothing measured after it in that namespace could hit it but its
  own teacher-forced pass).

Measured per strategy: answer F1 / exact match (SQuAD normalisation, best over the gold answers); the mean
per-token log-likelihood of the first gold answer, teacher-forced after the prompt, relative to `full`;
agreement of the first 16 greedy tokens with `full` (the common prefix length over the longer of the two,
both cut at 16 tokens: 1.0 = the same first 16 tokens, or the same shorter answer); TTFT p50; and the share
of module tokens recomputed (usage.recomputed_tokens / module tokens; 1.0 for full and prefix).
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import shlex
import string
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from promptstash.bench.report import percentile
from promptstash.bench.workloads import DataNotFoundError, _data_file

DEFAULT_STRATEGIES = ("prefix", "none", "legolink:16", "legolink:32", "cacheblend:0.1", "cacheblend:0.15",
                      "cacheblend:0.3", "full")
REFERENCE_STRATEGIES = ("prefix", "full")  # the others are approximate
WORKLOAD_NAMES = ("musique", "longdoc")
DEFAULT_QUESTIONS = {"musique": 12, "longdoc": 3}  # ~21 minutes on 2 cores (~63 s and ~160 s a question)
DEFAULT_PASSAGE_CHARS = 700  # musique: ~180 tokens per passage, ~1,800-token prompts
LONGDOC_PASSAGE_CHARS = 1850  # longdoc: two clipped passages make a document of ~1,000 tokens
LONGDOC_OFFSET = 25  # longdoc uses other questions than musique (the file has 50)
AGREEMENT_TOKENS = 16
SYSTEM = "You are a precise assistant. Answer the question using only the documents the user gives."
INTRO = "Documents:"
INSTRUCTION = "Reply with the answer only, no explanation."
WARMUP_QUESTION = "Which topics do these documents cover?"
TARGETS = {"ll_within": 0.02, "f1_fraction": 0.98, "speedup": {"longdoc": 4.0, "musique": 2.0}}


# -- scoring ---------------------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Sequence[str]) -> float:
    """Token F1 (SQuAD style), the best over the gold answers."""
    return max((_f1(prediction, g) for g in golds), default=0.0)


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised gold answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def agreement(tokens: Sequence[int], reference: Sequence[int], n: int = AGREEMENT_TOKENS) -> float:
    """Common-prefix agreement of the first n tokens: the length of the common prefix of both sequences cut at
    n, over the longer of the two cut sequences (1.0 when both are empty)."""
    a, b = list(tokens)[:n], list(reference)[:n]
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return same / longest


def ll_change(ll: float | None, ll_full: float | None) -> float | None:
    """Relative change of a (negative) mean log-likelihood against full's: (ll - full) / |full|; negative =
    the gold answer is less likely than with full. None when either is unknown or full's is 0."""
    if ll is None or ll_full is None or ll_full == 0:
        return None
    return (ll - ll_full) / abs(ll_full)


def clip_passage(text: str, max_chars: int | None, answers: Sequence[str] = ()) -> str:
    """At most max_chars characters at word boundaries: around the first mention of a gold answer when the
    passage has one (so clipping keeps what answers the question), else from the start."""
    if max_chars is None or len(text) <= max_chars:
        return text
    low = text.lower()
    hits = [(low.find(a.lower()), len(a)) for a in answers if a and low.find(a.lower()) >= 0]
    start = 0
    if hits:
        pos, length = min(hits)
        start = max(0, min(len(text) - max_chars, pos + length // 2 - max_chars // 2))
    piece = text[start:start + max_chars]
    if start > 0 and " " in piece:
        piece = piece[piece.index(" ") + 1:]
    if start + max_chars < len(text) and " " in piece:
        piece = piece[:piece.rindex(" ")]
    return piece.strip()


# -- workloads -------------------------------------------------------------------------------------------
@dataclass
class Item:
    """One question: its documents (each a module), the measured order and the warm-up orders."""

    qid: str
    question: str
    answers: list[str]
    documents: list[str]
    order: list[int]  # the measured request's document order (indices into documents)
    warmups: list[list[int]]  # earlier requests' document orders: other orders and combinations


@dataclass
class ModulesWorkload:
    name: str
    description: str
    items: list[Item]
    info: dict[str, Any] = field(default_factory=dict)


def _orders(n: int, rng: random.Random) -> tuple[list[int], list[list[int]]]:
    """A measured order of n documents and two warm-up requests that together cover every document, in other
    orders and combinations (each about half of them, plus one of the other half)."""
    perm = list(range(n))
    rng.shuffle(perm)
    half = max(1, n // 2)
    first, second = perm[:half], perm[half:]
    warm1 = first + second[:1]
    warm2 = second + first[:1]
    for w in (warm1, warm2):
        rng.shuffle(w)
    order = list(range(n))
    for _ in range(100):  # a new order: unlike either warm-up's, and not starting like them
        rng.shuffle(order)
        if n < 3 or (order[0] not in (warm1[0], warm2[0]) and order[:len(warm1)] != warm1):
            break
    return order, [w for w in (warm1, warm2) if w]


def _examples() -> list[dict[str, Any]]:
    return json.loads(_data_file("rag/musique_dev.json").read_text())


def _passage(ctx: dict[str, str], text: str) -> str:
    title = (ctx.get("title") or "").strip()
    return f"{title}\n{text}" if title else text


def build_musique(num_questions: int, *, passage_chars: int | None = DEFAULT_PASSAGE_CHARS, seed: int = 0,
                  offset: int = 0) -> ModulesWorkload:
    """The first num_questions MuSiQue questions (from `offset`), each with its 10 passages as modules."""
    examples = _examples()[offset:offset + num_questions]
    items = []
    for i, ex in enumerate(examples):
        docs = [_passage(c, clip_passage(c["text"], passage_chars, ex["answers"])) for c in ex["ctxs"]]
        order, warmups = _orders(len(docs), random.Random(seed * 1_000_003 + offset + i))
        items.append(Item(f"musique-{offset + i}", ex["question"], list(ex["answers"]), docs, order, warmups))
    clip = f"clipped to {passage_chars} characters (around a gold answer's first mention when present)" \
        if passage_chars else "whole"
    return ModulesWorkload("musique", f"{len(items)} MuSiQue questions (file order from {offset}), each with its 10 "
                           f"passages as modules, {clip}; passages seen first in 2 warm-up requests (other orders "
                           "and combinations), then measured in a new order.", items,
                           {"passage_chars": passage_chars, "offset": offset, "documents_per_question": 10})


def build_longdoc(num_questions: int, *, num_documents: int = 5, passage_chars: int | None = LONGDOC_PASSAGE_CHARS,
                  seed: int = 0, offset: int = LONGDOC_OFFSET) -> ModulesWorkload:
    """num_questions questions (file order from `offset`), each over num_documents documents of about 1,000
    tokens: the question's own passages (clipped to passage_chars around a gold answer, like musique's) joined
    in consecutive groups, so its gold passages are among them."""
    examples = _examples()[offset:offset + num_questions]
    items = []
    for i, ex in enumerate(examples):
        ctxs = ex["ctxs"]
        per = max(1, -(-len(ctxs) // num_documents))
        docs = ["\n\n".join(_passage(c, clip_passage(c["text"], passage_chars, ex["answers"])) for c in ctxs[j:j + per])
                for j in range(0, len(ctxs), per)]
        order, warmups = _orders(len(docs), random.Random(seed * 1_000_003 + offset + i))
        items.append(Item(f"longdoc-{offset + i}", ex["question"], list(ex["answers"]), docs, order, warmups))
    return ModulesWorkload("longdoc", f"{len(items)} MuSiQue questions (file order from {offset}), each over "
                           f"{num_documents} documents of about 1,000 tokens (its 10 passages, each clipped to "
                           f"{passage_chars} characters around a gold answer's first mention when present, joined in "
                           "pairs: the gold passages are among them) as modules; documents seen first in 2 warm-up "
                           "requests (other orders and combinations), then measured in a new order.", items,
                           {"passage_chars": passage_chars, "offset": offset, "documents_per_question": num_documents})


def build(name: str, num_questions: int | None = None, **options: Any) -> ModulesWorkload:
    n = DEFAULT_QUESTIONS[name] if num_questions is None else num_questions
    if name == "musique":
        return build_musique(n, **options)
    if name == "longdoc":
        return build_longdoc(n, **options)
    raise ValueError(f"unknown modules workload {name!r}; available: {', '.join(WORKLOAD_NAMES)}")


def messages(item: Item, order: Sequence[int], question: str, *, modules: bool = True) -> list[dict[str, Any]]:
    """System prompt, then one user message: the intro, the documents in `order` (module parts when modules),
    the question and the answer instruction."""
    parts: list[dict[str, Any]] = [{"type": "text", "text": INTRO}]
    for j in order:
        part: dict[str, Any] = {"type": "text", "text": item.documents[j]}
        if modules:
            part["module"] = True
        parts.append(part)
    parts.append({"type": "text", "text": f"Question: {question}\n{INSTRUCTION}"})
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": parts}]


# -- measurement -----------------------------------------------------------------------------------------
@dataclass
class Run:
    """One strategy answering one question."""

    workload: str
    qid: str
    strategy: str
    answer: str
    token_ids: list[int]
    f1: float
    em: float
    gold_ll: float | None  # mean log-likelihood per token of the first gold answer, teacher-forced
    gold_tokens: int
    ttft_s: float
    total_s: float
    prompt_tokens: int
    cached_tokens: int
    module_cached_tokens: int
    recomputed_tokens: int
    computed_tokens: int
    module_tokens: int  # tokens inside module spans (0 for prefix: no marks)
    num_modules: int
    num_module_hits: int
    recomputed_fraction: float | None  # of module tokens (1.0 for full and prefix)
    tf_computed_tokens: int | None = None  # tokens the teacher-forced pass computed (prompt + answer)
    agreement: float | None = None  # with full's first 16 tokens
    same_as_full: bool | None = None  # the whole greedy answer equals full's


def _is_approximate(strategy: str) -> bool:
    return strategy not in REFERENCE_STRATEGIES


def _logit_rows(engine: Any, ids: list[int], options: dict[str, Any], namespace: str
                ) -> tuple[dict[int, Any], int | None]:
    """Prefill ids; returns {prompt position: logits row} for the computed positions and the computed count."""
    out = engine.prompt_logits(ids, namespace=namespace, **options)
    positions = getattr(out, "positions", None)
    if positions is None:  # rows are the computed positions, from num_cached_tokens on
        positions = range(out.num_cached_tokens, out.num_cached_tokens + out.logits.shape[0])
    usage = getattr(out, "usage", None)
    computed = None if usage is None else usage.prompt_tokens - usage.cached_tokens
    return {int(p): out.logits[i] for i, p in enumerate(positions)}, computed


def _gold_log_likelihood(engine: Any, prompt_ids: list[int], answer_ids: list[int], spans: Sequence[Any],
                         strategy: str, namespace: str) -> tuple[float, int | None]:
    """Mean log-probability per token of answer_ids after prompt_ids (teacher-forced), with the strategy; and
    the number of tokens the teacher-forced passes computed (None if unknown).

    NOTE: after an exact run (prefix, full) the namespace may hold the prompt and the greedy answer as published
    blocks; when the answer starts like the gold one, prompt + gold answer then hits the cache past the last
    prompt token and those positions give no logits. Each such position p is computed again from ids[:p + 1]
    (the cache never serves a prompt's last token), which costs a block at most."""
    import torch

    ids = list(prompt_ids) + list(answer_ids)
    options: dict[str, Any] = {"modules": tuple(spans), "module_repair": strategy} if strategy != "prefix" else {}
    rows, computed = _logit_rows(engine, ids, options, namespace)
    need = [len(prompt_ids) - 1 + k for k in range(len(answer_ids))]  # row at p predicts token p + 1
    for p in [p for p in need if p not in rows]:
        more, n = _logit_rows(engine, ids[:p + 1], options, namespace)
        if p not in more:
            raise RuntimeError(f"the engine gave no logits for the last prompt position {p}")
        rows[p] = more[p]
        computed = None if computed is None or n is None else computed + n
    logp = torch.log_softmax(torch.stack([rows[p] for p in need]).float(), dim=-1)
    return float(logp[torch.arange(len(answer_ids)), torch.tensor(answer_ids)].mean()), computed


def _usage_fields(usage: Any) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "cached_tokens": usage.cached_tokens,
            "module_cached_tokens": getattr(usage, "module_cached_tokens", 0),
            "recomputed_tokens": getattr(usage, "recomputed_tokens", 0),
            "computed_tokens": usage.prompt_tokens - usage.cached_tokens,
            "num_modules": getattr(usage, "num_modules", 0), "num_module_hits": getattr(usage, "num_module_hits", 0)}


def measure_item(engine: Any, workload: str, item: Item, strategies: Sequence[str], *, max_tokens: int,
                 run_id: str, log: Callable[[str], None] = print) -> list[Run]:
    """Warm up the item's modules, then run every strategy on it (approximate ones first, `full` last)."""
    from promptstash.engine.sampling import SamplingParams

    ns = f"bench-modules-{run_id}-{item.qid}"
    ns_prefix = f"{ns}-prefix"
    for w in item.warmups:  # the documents, seen in other orders and combinations
        rid = engine.add_request(messages(item, w, WARMUP_QUESTION), SamplingParams(max_tokens=1), namespace=ns,
                                 module_repair="none")
        engine.run_until_done([rid])
    if "prefix" in strategies:  # prefix-only caching has the system prompt and the intro cached, nothing more
        engine.generate(messages(item, [], WARMUP_QUESTION, modules=False), max_tokens=1, namespace=ns_prefix)
    tokenizer = engine.tokenizer
    answer_ids = tokenizer.encode(item.answers[0], add_special_tokens=False)
    rendered = engine.render(messages(item, item.order, item.question), ns)
    module_tokens = sum(m.end - m.start for m in rendered.modules)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=("\n",))
    ordered = [s for s in strategies if s not in ("full",)] + [s for s in strategies if s == "full"]
    runs = []
    for strategy in ordered:
        if strategy == "prefix":
            msgs, namespace, repair = messages(item, item.order, item.question, modules=False), ns_prefix, None
            prompt_ids, spans = engine.render(msgs, namespace).token_ids, ()
        else:
            msgs, namespace, repair = messages(item, item.order, item.question), ns, strategy
            prompt_ids, spans = rendered.token_ids, rendered.modules
        rid = engine.add_request(msgs, params, namespace=namespace, module_repair=repair)
        c = engine.run_until_done([rid])[0]
        if c.finish_reason == "error":
            raise RuntimeError(f"{item.qid} {strategy}: the engine failed the request: {c.error}")
        ll, tf_computed = _gold_log_likelihood(engine, prompt_ids, answer_ids, spans, strategy, namespace)
        usage = _usage_fields(c.usage)
        if strategy in REFERENCE_STRATEGIES:
            fraction = 1.0
        else:
            fraction = usage["recomputed_tokens"] / module_tokens if module_tokens else None
        runs.append(Run(workload, item.qid, strategy, c.text.strip(), list(c.token_ids), f1_score(c.text, item.answers),
                        exact_match(c.text, item.answers), ll, len(answer_ids), c.timings.ttft_s, c.timings.total_s,
                        module_tokens=module_tokens if strategy != "prefix" else 0, recomputed_fraction=fraction,
                        tf_computed_tokens=tf_computed, **usage))
        r = runs[-1]
        log(f"[{workload} {item.qid}] {strategy:>15}: ttft {r.ttft_s:6.2f}s, computed {r.computed_tokens:5d}/"
            f"{r.prompt_tokens} tokens, modules {r.num_module_hits}/{r.num_modules} hit, f1 {r.f1:.2f}, "
            f"gold ll {r.gold_ll:.3f} (teacher-forced pass computed {r.tf_computed_tokens}), answer {r.answer[:60]!r}")
    full = next((r for r in runs if r.strategy == "full"), None)
    if full is not None:
        for r in runs:
            r.agreement = agreement(r.token_ids, full.token_ids)
            r.same_as_full = r.token_ids == full.token_ids
    return runs


# -- summaries -------------------------------------------------------------------------------------------
def _mean(values: Sequence[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(runs: Sequence[Run], strategies: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per strategy: means over questions, TTFT p50, and the changes against full."""
    out: dict[str, dict[str, Any]] = {}
    for s in strategies:
        rs = [r for r in runs if r.strategy == s]
        if not rs:
            continue
        out[s] = {"questions": len(rs), "f1": _mean([r.f1 for r in rs]), "em": _mean([r.em for r in rs]),
                  "gold_ll": _mean([r.gold_ll for r in rs]), "agreement": _mean([r.agreement for r in rs]),
                  "same_as_full": _mean([None if r.same_as_full is None else float(r.same_as_full) for r in rs]),
                  "ttft_p50_s": percentile([r.ttft_s for r in rs], 50),
                  "recomputed_fraction": _mean([r.recomputed_fraction for r in rs]),
                  "computed_tokens": _mean([r.computed_tokens for r in rs]),
                  "prompt_tokens": _mean([r.prompt_tokens for r in rs]),
                  "module_hits": sum(r.num_module_hits for r in rs), "modules": sum(r.num_modules for r in rs)}
    full_ll = {r.qid: r.gold_ll for r in runs if r.strategy == "full"}
    for s, row in out.items():  # the mean per-question size of the change, either way
        changes = [ll_change(r.gold_ll, full_ll.get(r.qid)) for r in runs if r.strategy == s]
        row["gold_ll_abs_change"] = _mean([abs(c) for c in changes if c is not None])
    full = out.get("full")
    for row in out.values():
        row["gold_ll_change"] = ll_change(row["gold_ll"], full["gold_ll"]) if full else None
        row["f1_vs_full"] = (row["f1"] / full["f1"] if full["f1"] else None) if full else None
        row["speedup"] = full["ttft_p50_s"] / row["ttft_p50_s"] if full and row["ttft_p50_s"] else None
    return out


def _quality_ok(row: dict[str, Any], full: dict[str, Any]) -> tuple[bool, bool]:
    ll_ok = row["gold_ll_change"] is not None and row["gold_ll_change"] >= -TARGETS["ll_within"]
    f1_ok = row["f1"] >= TARGETS["f1_fraction"] * full["f1"] - 1e-12
    return ll_ok, f1_ok


def best_approximate(summary: dict[str, dict[str, Any]]) -> str | None:
    """The fastest approximate strategy meeting both quality targets; else the one whose gold log-likelihood is
    closest to full's. None without full or approximate strategies."""
    full = summary.get("full")
    approx = [s for s in summary if _is_approximate(s)]
    if full is None or not approx:
        return None
    good = [s for s in approx if all(_quality_ok(summary[s], full))]
    if good:
        return min(good, key=lambda s: summary[s]["ttft_p50_s"])
    return max(approx, key=lambda s: summary[s]["gold_ll_change"] if summary[s]["gold_ll_change"] is not None
               else float("-inf"))


def targets(summary: dict[str, dict[str, Any]], workload: str) -> dict[str, Any] | None:
    """The issue's targets for one workload's best approximate strategy: PASS/FAIL each."""
    best = best_approximate(summary)
    if best is None:
        return None
    row, full = summary[best], summary["full"]
    ll_ok, f1_ok = _quality_ok(row, full)
    need = TARGETS["speedup"].get(workload, 2.0)
    speed_ok = row["speedup"] is not None and row["speedup"] >= need
    return {"strategy": best, "ll_ok": ll_ok, "f1_ok": f1_ok, "speedup_ok": speed_ok, "speedup_target": need,
            "gold_ll_change": row["gold_ll_change"], "gold_ll_abs_change": row["gold_ll_abs_change"],
            "f1": row["f1"], "f1_full": full["f1"],
            "speedup": row["speedup"], "passed": ll_ok and f1_ok and speed_ok}


# -- the benchmark ---------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def command_line() -> str:
    argv = sys.argv[1:] if sys.argv and Path(sys.argv[0]).name == "promptstash" else sys.argv[1:]
    return shlex.join(["promptstash", *argv])


def run_engine(engine: Any, workloads: Sequence[ModulesWorkload], strategies: Sequence[str], *, max_tokens: int = 16,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every strategy on every item of the workloads; returns the result dict (see write)."""
    run_id = uuid.uuid4().hex[:8]
    engine.generate([100] * 8, max_tokens=1, namespace=f"bench-modules-{run_id}-warmup")  # first-call costs
    result: dict[str, Any] = {"workloads": {}}
    for w in workloads:
        start = time.perf_counter()
        runs: list[Run] = []
        for i, item in enumerate(w.items):
            log(f"[{w.name}] question {i + 1}/{len(w.items)}: {item.question}")
            runs += measure_item(engine, w.name, item, strategies, max_tokens=max_tokens, run_id=run_id, log=log)
        summary = summarize(runs, strategies)
        doc_tokens = [r.module_tokens / max(1, r.num_modules) for r in runs if r.strategy != "prefix" and r.num_modules]
        info = {**w.info, "mean_prompt_tokens": _mean([r.prompt_tokens for r in runs]),
                "mean_document_tokens": _mean(doc_tokens)}
        result["workloads"][w.name] = {"description": w.description, "info": info, "summary": summary,
                                       "targets": targets(summary, w.name), "runs": [asdict(r) for r in runs],
                                       "wall_s": time.perf_counter() - start}
        log(f"[{w.name}] done in {time.perf_counter() - start:.0f}s")
    return result


def run(args: Any, log: Callable[[str], None] = print) -> dict[str, Any]:
    """`promptstash bench modules`: load the model, build the workloads, measure (see the module docstring)."""
    from promptstash.engine.engine import Engine

    start = time.perf_counter()
    strategies = list(getattr(args, "strategies", None) or DEFAULT_STRATEGIES)
    questions = getattr(args, "questions", None)
    dtype = "float32" if getattr(args, "dtype", "auto") in (None, "auto") else args.dtype
    max_tokens = getattr(args, "max_tokens", 16) or 16
    try:
        workloads = [build(name, questions) for name in WORKLOAD_NAMES]
    except DataNotFoundError as exc:
        raise DataNotFoundError(f"bench modules needs the MuSiQue data: {exc}") from exc
    log(f"bench modules: loading {getattr(args, 'model', None) or 'the default model'} ({dtype}) ...")
    engine = Engine.from_pretrained(getattr(args, "model", None), dtype=dtype, progress=False)
    result = run_engine(engine, workloads, strategies, max_tokens=max_tokens, log=log)
    result["setup"] = {"command": command_line(), "model": engine.model_id, "dtype": dtype,
                       "strategies": strategies, "max_tokens": max_tokens, "agreement_tokens": AGREEMENT_TOKENS,
                       "questions": {w.name: len(w.items) for w in workloads}, "machine": machine(),
                       "date": time.strftime("%Y-%m-%d"), "targets": TARGETS,
                       "block_size": engine.config.block_size, "max_prefill_tokens": engine.config.max_prefill_tokens}
    result["wall_s"] = time.perf_counter() - start
    return result


# -- reports ---------------------------------------------------------------------------------------------
def _f(value: Any, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:+.1f}%"


def _ok(flag: bool) -> str:
    return "PASS" if flag else "FAIL"


def table(summary: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| strategy | F1 | EM | gold LL (nats/token) | LL vs full | agreement@16 | same answer as full | "
             "TTFT p50 (s) | speedup vs full | module tokens recomputed | computed tokens | module hits |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s, r in summary.items():
        hits = f"{r['module_hits']}/{r['modules']}" if r["modules"] else "-"
        lines.append(f"| {s} | {_f(r['f1'])} | {_f(r['em'])} | {_f(r['gold_ll'])} | {_pct(r['gold_ll_change'])} | "
                     f"{_f(r['agreement'])} | {_f(r['same_as_full'], '{:.2f}')} | {_f(r['ttft_p50_s'], '{:.2f}')} | "
                     f"{_f(r['speedup'], '{:.1f}×')} | {_f(r['recomputed_fraction'], '{:.1%}')} | "
                     f"{_f(r['computed_tokens'], '{:,.0f}')} / {_f(r['prompt_tokens'], '{:,.0f}')} | {hits} |")
    return lines


def target_lines(t: dict[str, Any] | None, workload: str) -> list[str]:
    if t is None:
        return ["Targets: not evaluated (needs `full` and at least one approximate strategy)."]
    full_note = " (full's F1 is 0: not informative)" if not t["f1_full"] else ""
    return [f"Targets ({workload}), best approximate strategy `{t['strategy']}` (the fastest meeting both quality "
            "targets, else the closest gold log-likelihood):",
            f"- {_ok(t['ll_ok'])}: gold-answer log-likelihood within 2% of full (at most 2% lower; higher is no loss): "
            f"{_pct(t['gold_ll_change'])} (mean per-question change, either way: "
            f"{_f(t.get('gold_ll_abs_change'), '{:.1%}')})",
            f"- {_ok(t['f1_ok'])}: F1 at least 98% of full: {t['f1']:.3f} vs {t['f1_full']:.3f}{full_note}",
            f"- {_ok(t['speedup_ok'])}: TTFT at least {t['speedup_target']:g}× lower than full: "
            f"{_f(t['speedup'], '{:.1f}×')}"]


def to_markdown(res: dict[str, Any]) -> str:
    s = res.get("setup", {})
    m = s.get("machine", {})
    lines = [f"# Modules: quality and speed of reuse at any position ({s.get('date', '')})", "",
             f"Command: `{s.get('command')}` ({res.get('wall_s', 0) / 60:.1f} minutes). Machine: {m.get('cpu')}, "
             f"{m.get('cores')} cores ({m.get('torch_threads')} torch threads), torch {m.get('torch')}. "
             f"Model `{s.get('model')}`, {s.get('dtype')}; greedy, at most {s.get('max_tokens')} tokens, stop at a "
             "newline; one request at a time.", "",
             "Strategies: `prefix` = today's prefix-only caching (the same text without module marks, a namespace "
             "with the system prompt cached); `none` / `legolink:K` / `cacheblend:R` = modules assembled with that "
             "repair; `full` = everything recomputed (the reference). Every module was cached by two earlier "
             "requests that used the documents in other orders and combinations.", "",
             "Columns: F1 / EM against the gold answers (SQuAD normalisation); gold LL = mean log-likelihood per "
             "token of the first gold answer, teacher-forced after the prompt, and its change against full "
             "(negative = less likely); agreement@16 = common prefix of the first 16 greedy tokens with full's, over "
             "the longer of the two (1 = identical); TTFT p50 over the questions; module tokens recomputed = "
             "usage.recomputed_tokens / module tokens (full and prefix compute everything: 100%); computed tokens = "
             "prompt tokens not served from the cache, mean per request.", ""]
    for name, w in res.get("workloads", {}).items():
        info = w.get("info", {})
        lines += [f"## {name}", "", w.get("description", ""), "",
                  f"Mean prompt {_f(info.get('mean_prompt_tokens'), '{:,.0f}')} tokens, mean document "
                  f"{_f(info.get('mean_document_tokens'), '{:,.0f}')} tokens; measured in {w.get('wall_s', 0):.0f}s.",
                  "", *table(w["summary"]), "", *target_lines(w.get("targets"), name), ""]
    both = _common_best(res)
    if both:
        lines += [both, ""]
    lines += _default_lines(res)
    lines += ["Few questions per workload (a 2-core CPU): F1 and EM move in steps of 1/questions; the log-likelihood "
              "and agreement columns are the finer measures of what a strategy changes.", ""]
    return "\n".join(lines)


DEFAULT_RULE = ("the approximate strategy whose gold log-likelihood stays closest to full's (the smallest mean "
                "per-question change, either way, averaged over the workloads) among those that meet the speed "
                "targets (TTFT at least 2x lower than full's on MuSiQue, 4x on long documents)")


def choose_default(res: dict[str, Any]) -> dict[str, Any] | None:
    """The server default `module_repair`, by DEFAULT_RULE; None if nothing qualifies."""
    ws = res.get("workloads", {})
    if not ws:
        return None
    scores: dict[str, float] = {}
    for s in next(iter(ws.values()))["summary"]:
        if not _is_approximate(s):
            continue
        rows = {name: w["summary"].get(s) for name, w in ws.items()}
        if any(r is None or r.get("gold_ll_abs_change") is None or not r.get("speedup")
               or r["speedup"] < TARGETS["speedup"].get(name, 2.0) for name, r in rows.items()):
            continue
        scores[s] = sum(r["gold_ll_abs_change"] for r in rows.values()) / len(rows)  # type: ignore[index]
    if not scores:
        return None
    best = min(scores, key=scores.__getitem__)
    return {"strategy": best, "scores": scores}


def _default_lines(res: dict[str, Any]) -> list[str]:
    choice = choose_default(res)
    if choice is None:
        return []
    ranked = sorted(choice["scores"].items(), key=lambda kv: kv[1])
    return [f"Default `module_repair` chosen by this run: **`{choice['strategy']}`** — {DEFAULT_RULE}. "
            "Mean change either way: " + ", ".join(f"`{s}` {v:.1%}" for s, v in ranked) + ".", ""]


def _common_best(res: dict[str, Any]) -> str | None:
    """The approximate strategies that pass every target on every workload."""
    ws = res.get("workloads", {})
    if not ws or any(w.get("targets") is None for w in ws.values()):
        return None
    approx = [s for s in next(iter(ws.values()))["summary"] if _is_approximate(s)]
    passing = []
    for s in approx:
        ok = True
        for name, w in ws.items():
            summary = w["summary"]
            if s not in summary:
                ok = False
                break
            ll_ok, f1_ok = _quality_ok(summary[s], summary["full"])
            speed = summary[s]["speedup"]
            ok &= ll_ok and f1_ok and speed is not None and speed >= TARGETS["speedup"].get(name, 2.0)
        if ok:
            passing.append(s)
    return ("Strategies meeting every target on every workload: " + (", ".join(f"`{s}`" for s in passing)
                                                                     if passing else "none") + ".")


def plot(res: dict[str, Any], path: Path, log: Callable[[str], None] = print) -> Path | None:
    """Quality (F1, and gold log-likelihood change vs full) against TTFT p50, one column per workload."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("note: matplotlib is not installed; skipping the plot (pip install matplotlib)")
        return None
    ws = res.get("workloads", {})
    if not ws:
        return None
    fig, axes = plt.subplots(2, len(ws), figsize=(6 * len(ws), 8), squeeze=False)
    for col, (name, w) in enumerate(ws.items()):
        for row, (key, label, scale) in enumerate((("f1", "answer F1", 1.0),
                                                   ("gold_ll_change", "gold LL change vs full (%)", 100.0))):
            ax = axes[row][col]
            for s, r in w["summary"].items():
                if r.get(key) is None:
                    continue
                ax.scatter(r["ttft_p50_s"], r[key] * scale, s=30)
                ax.annotate(s, (r["ttft_p50_s"], r[key] * scale), fontsize=8, xytext=(3, 3),
                            textcoords="offset points")
            ax.set_xscale("log")
            ax.set_xlabel("TTFT p50 (s, log scale)")
            ax.set_ylabel(label)
            ax.set_title(f"{name}: {label} vs TTFT")
            ax.grid(True, alpha=0.3)
    fig.suptitle(f"modules: quality vs TTFT ({res.get('setup', {}).get('model', '')})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(res: dict[str, Any], out_dir: Path, log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """modules.json, modules.md and (with matplotlib) modules.png under out_dir; returns the JSON and MD paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "modules.json", out_dir / "modules.md"
    js.write_text(json.dumps(res, indent=2) + "\n")
    md.write_text(to_markdown(res))
    plot(res, out_dir / "modules.png", log=log)
    return js, md
