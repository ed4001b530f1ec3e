"""`promptstash bench policies`: eviction policies x pool sizes on multi-turn traces, replayed in simulated time.

Each workload (the Mooncake trace, ShareGPT conversations with their turn structure) is replayed through the
REAL `CacheManager` and `Scheduler`, driven exactly as `Engine.run_step` / `_post_process` drive them
(schedule -> chunks -> commit -> one output token when a chunk reaches the end -> finish), but no model runs:
each step lasts what a cost model of the real engine says it would. The cost model is measured on the real
engine once per run (least squares over timed steps: prefill chunks at a few context depths, decode batches)
or read back from a file (`--cost-model`), so the whole trace replays in seconds per cell.

Per workload, every policy (eviction x admission order) runs at every pool size (a fraction of the trace's
working set, plus an unbounded pool), and the report gives token hit rate, TTFT percentiles, SLO violations
and evictions per cell, the unbounded-cache optimum, the issue's target check (tlru vs lru where lru suffers
most) and the defaults the numbers favour. One short replay on the real model checks the simulator's TTFTs.

    arrivals ──> Scheduler.schedule() ──> chunks ──> step time = cost_model(chunks) ──> clock += step
                      ▲                                                           │
                      └──── CacheManager.commit / Scheduler.finish  <─────────────┘
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import math
import os
import platform
import random
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from promptstash.bench.report import percentile, write_results
from promptstash.bench.workloads import _block_tokens, _data_file, _trace_rows, trace_token_range
from promptstash.cache.eviction import EvictionConfig
from promptstash.cache.hashing import extend_hashes, root_hash
from promptstash.cache.manager import CacheManager
from promptstash.engine.request import Request, RequestStatus, StopChecker
from promptstash.engine.sampling import SamplingParams
from promptstash.engine.scheduler import ScheduledChunk, Scheduler
from promptstash.errors import PromptstashError

# (name, eviction policy, admission order)
POLICIES: tuple[tuple[str, str, str], ...] = (
    ("lru", "lru", "fcfs"), ("tlru", "tlru", "fcfs"), ("cost", "cost", "fcfs"),
    ("lru+lpm", "lru", "lpm"), ("tlru+lpm", "tlru", "lpm"))
DEFAULT_FRACTIONS = (0.05, 0.10, 0.25, 0.50)
WORKLOAD_NAMES = ("mooncake", "sharegpt")
BLOCK_SIZE = 16  # the engine's defaults: the simulator replays the engine as it ships
MAX_NUM_SEQS = 16
MAX_PREFILL_TOKENS = 512
TRACE_SCALE = 16  # Mooncake: 512 / 16 = 32 tokens per hash id, lengths / 16
MODEL_ID, KV_LAYOUT, NAMESPACE = "sim", "sim", "sim"

# ShareGPT scaling (the data's messages are a few words): see build_sharegpt
SHAREGPT_APPS = 8  # apps, each with its own system prompt; a conversation belongs to one (Zipf-like weights)
SHAREGPT_SYSTEM_TOKENS = 768  # tokens of each app's system prompt
SHAREGPT_DOC_MEDIAN = 1024  # median tokens of the document pasted into a conversation's first message
SHAREGPT_DOC_SIGMA = 0.8  # lognormal spread of the document length
SHAREGPT_DOC_MAX = 4096
SHAREGPT_THINK_S = 30.0  # mean think time (exponential) between a reply and the next user turn
SHAREGPT_LAST_REPLY = 32  # output tokens of a last user turn that has no recorded reply
IM_START, IM_END, NEWLINE = 151644, 151645, 198  # Qwen chat-template markers (the word map avoids them)

FEATURES = ("step", "prefill_tokens", "prefill_attention", "decode_seqs", "decode_context")
FEATURE_NOTES = {"step": "seconds per step", "prefill_tokens": "seconds per prefill token",
                 "prefill_attention": "seconds per prefill token x 1k tokens of context (its mean position)",
                 "decode_seqs": "seconds per decoded sequence", "decode_context": "seconds per 1k context tokens "
                 "of the decoded sequences"}


# -- workloads -------------------------------------------------------------------------------------------------
@dataclass
class SimRequest:
    prompt: list[int]
    output: list[int]  # the tokens the replay appends as the output (len >= 1)
    arrival_s: float  # a root request: its arrival; a later turn: its think time (both in trace seconds,
    # which the replay stretches by its time_scale)
    prev: int | None = None  # a later turn: the request whose finish it waits for
    label: str = ""


@dataclass
class SimWorkload:
    name: str
    description: str
    requests: list[SimRequest]
    info: dict[str, Any] = field(default_factory=dict)


def _computed_tokens(req: SimRequest) -> list[int]:
    """Tokens whose K/V the engine computes for a request: the prompt and all outputs but the last."""
    return req.prompt + req.output[:-1]


def workload_figures(requests: Sequence[SimRequest], order: Sequence[int] | None = None,
                     block_size: int = BLOCK_SIZE) -> dict[str, Any]:
    """Working set (unique full blocks the replay computes, prompts and outputs) and the unbounded-cache optimum:
    taking requests in `order` (default: as listed), a prompt hits its leading full blocks already computed by an
    earlier request, at most (prompt_len - 1) // block_size of them, as CacheManager.open matches."""
    root = root_hash(MODEL_ID, KV_LAYOUT, NAMESPACE)
    seen: set[bytes] = set()
    optimum = prompt_total = max_blocks = 0
    for i in order if order is not None else range(len(requests)):
        req = requests[i]
        hashes: list[bytes] = []
        extend_hashes(hashes, root, _computed_tokens(req), block_size)
        cap = (len(req.prompt) - 1) // block_size
        hits = next((j for j, h in enumerate(hashes[:cap]) if h not in seen), min(cap, len(hashes)))
        optimum += hits * block_size
        prompt_total += len(req.prompt)
        seen.update(hashes)
        max_blocks = max(max_blocks, -(-(len(req.prompt) + len(req.output)) // block_size))
    return {"working_set_blocks": len(seen), "optimum_cached_tokens": optimum, "prompt_tokens": prompt_total,
            "optimum_hit_rate": optimum / prompt_total if prompt_total else 0.0, "max_request_blocks": max_blocks,
            "output_tokens": sum(len(r.output) for r in requests), "num_requests": len(requests)}


def build_mooncake(num_requests: int | None = None, scale: int = TRACE_SCALE, grouped: bool = False,
                   vocab_size: int = 151936) -> SimWorkload:
    """The Mooncake synthetic trace (every request by default, else the first num_requests; grouped: those of the
    first recurring prefix groups) at 1/scale: each hash id is 512/scale deterministic tokens, input and output
    lengths are divided by scale (outputs at least 1 token, deterministic pseudo-random ids). Arrivals are the
    trace's timestamps (seconds); the replay stretches them by its time_scale."""
    if scale < 1 or 512 % scale:
        raise PromptstashError(f"trace scale must divide 512, got {scale}")
    block = 512 // scale
    low, high = trace_token_range(vocab_size)
    if num_requests is None:
        text = _data_file("traces/mooncake_synthetic_trace.jsonl").read_text()
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = _trace_rows(num_requests, grouped)
    cache: dict[int, list[int]] = {}
    requests = []
    t0 = rows[0]["timestamp"] if rows else 0
    for i, row in enumerate(rows):
        ids = row["hash_ids"]
        length = max(2, min(-(-row["input_length"] // scale), block * len(ids)))
        tokens: list[int] = []
        for h in ids:
            if h not in cache:
                cache[h] = _block_tokens(h, block, low, high)
            tokens += cache[h]
        rng = random.Random(0x5EED_0000 + i)
        out_len = max(1, -(-row["output_length"] // scale))
        requests.append(SimRequest(tokens[:length], [rng.randrange(low, high) for _ in range(out_len)],
                                   (row["timestamp"] - t0) / 1000.0, label=f"trace {i}"))
    which = "every request" if num_requests is None else (
        f"the first {len(rows)} requests" + (" of recurring prefix groups" if grouped else ""))
    desc = (f"Mooncake synthetic trace, {which}, at 1/{scale} scale ({block} tokens per hash id, input and output "
            "lengths / {scale}); arrivals at the trace's timestamps, stretched by the time scale.").replace(
        "{scale}", str(scale))
    return SimWorkload("mooncake", desc, requests, {"scale": scale, "tokens_per_hash_id": block,
                                                    **workload_figures(requests)})


_WORD = re.compile(r"\w+|[^\w\s]")


def word_ids(text: str, low: int = 1000, high: int = 150000) -> list[int]:
    """A deterministic word -> id map (blake2b of each word or punctuation mark): a stand-in tokenizer, stable
    across runs, so the replay needs no model. Ids in [low, high) avoid the chat-template markers."""
    return [low + int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little") % (high - low)
            for w in _WORD.findall(text)]


def _message(role: str, tokens: list[int]) -> list[int]:
    return [IM_START, *word_ids(role), NEWLINE, *tokens, IM_END, NEWLINE]


def build_sharegpt(num_conversations: int | None = None, seed: int = 0, think_s: float = SHAREGPT_THINK_S,
                   apps: int = SHAREGPT_APPS, system_tokens: int = SHAREGPT_SYSTEM_TOKENS,
                   doc_median: int = SHAREGPT_DOC_MEDIAN) -> SimWorkload:
    """ShareGPT conversations (file order) with their real turn structure: turn k's prompt is the app's system
    prompt, every earlier message and the new user message in Qwen's chat-template layout; its output is the
    recorded assistant reply (so the next turn's prompt starts with this turn's computed tokens, as in a real
    chat); a last user turn without a reply gets SHAREGPT_LAST_REPLY tokens. Text -> ids by word_ids.

    Scaling (the data's messages are a few words, which would make every policy look the same):
    - `apps` apps, each with its own system prompt of `system_tokens` pseudo-random ids; conversation c belongs
      to app j with probability ~ 1 / (j + 1) (seeded);
    - each conversation's first user message carries a pasted document of pseudo-random ids, lognormal length
      (median `doc_median`, sigma SHAREGPT_DOC_SIGMA, at most SHAREGPT_DOC_MAX): the context a later turn reuses.
    Sessions start as a Poisson process at 1 per trace second; each later turn arrives an exponential think time
    (mean `think_s` trace seconds, seeded) after the previous reply finished. The replay stretches both by its
    time_scale (the CPU engine is slower than the service the data came from)."""
    data = json.loads(_data_file("chat/sharegpt_dummy_conversations.json").read_text())
    convs = [c["conversations"] for c in data if any(m["from"] == "human" for m in c["conversations"])]
    if num_conversations is not None:
        convs = convs[:num_conversations]
    rng = random.Random(seed)
    weights = [1.0 / (j + 1) for j in range(apps)]
    systems = [_message("system", [rng.randrange(1000, 150000) for _ in range(system_tokens)]) for _ in range(apps)]
    requests: list[SimRequest] = []
    t = 0.0
    for ci, conv in enumerate(convs):
        t += rng.expovariate(1.0)
        app = rng.choices(range(apps), weights)[0]
        doc_len = min(SHAREGPT_DOC_MAX, max(16, int(rng.lognormvariate(math.log(doc_median), SHAREGPT_DOC_SIGMA))))
        doc = [rng.randrange(1000, 150000) for _ in range(doc_len)]
        history = list(systems[app])
        first_user, prev = True, None
        msgs = [(("user" if m["from"] == "human" else "assistant"), m["value"]) for m in conv]
        for k, (role, text) in enumerate(msgs):
            if role != "user":
                continue
            body = (doc if first_user else []) + word_ids(text)
            first_user = False
            history += _message("user", body)
            prompt = history + [IM_START, *word_ids("assistant"), NEWLINE]
            if k + 1 < len(msgs) and msgs[k + 1][0] == "assistant":
                reply = word_ids(msgs[k + 1][1])
            else:
                reply = [rng.randrange(1000, 150000) for _ in range(SHAREGPT_LAST_REPLY - 1)]
            output = [*reply, IM_END]
            history = prompt + output + [NEWLINE]
            arrival = t if prev is None else rng.expovariate(1.0 / think_s)
            requests.append(SimRequest(prompt, output, arrival, prev, f"conv {ci} turn {k // 2 + 1}"))
            prev = len(requests) - 1
    desc = (f"{len(convs)} ShareGPT conversations ({len(requests)} user turns) with their turn structure; "
            f"{apps} apps with a {system_tokens}-token system prompt each (app j chosen with weight 1/(j+1)), a "
            f"pasted document (lognormal, median {doc_median} tokens) in each first message; words -> ids by a "
            f"deterministic word map; sessions arrive as a Poisson process, later turns an exponential think time "
            f"(mean {think_s:g} s) after the previous reply; both times stretched by the time scale.")
    return SimWorkload("sharegpt", desc, requests, {"apps": apps, "system_tokens": system_tokens,
                                                    "doc_median_tokens": doc_median, "think_s": think_s,
                                                    **workload_figures(requests)})


# -- cost model ------------------------------------------------------------------------------------------------
def step_features(chunks: Sequence[tuple[int, int]]) -> list[float]:
    """FEATURES of one step from its chunks as (start, num_tokens): a 1-token chunk is a decode."""
    prefill = attention = decode = context = 0.0
    for start, n in chunks:
        if n == 1:
            decode += 1
            context += (start + 1) / 1000.0
        else:
            prefill += n
            attention += n * (start + n / 2) / 1000.0
    return [1.0, prefill, attention, decode, context]


def _chunk_pairs(chunks: Sequence[ScheduledChunk]) -> list[tuple[int, int]]:
    return [(c.start, c.num_tokens) for c in chunks]


@dataclass
class CostModel:
    """Step seconds = sum(coef[f] * feature f) over FEATURES (see step_features)."""

    coef: dict[str, float]
    source: str = "given"
    fit: dict[str, Any] = field(default_factory=dict)

    def step_time(self, chunks: Sequence[tuple[int, int]]) -> float:
        return sum(self.coef.get(f, 0.0) * x for f, x in zip(FEATURES, step_features(chunks), strict=True))

    def prefill_time(self, num_tokens: int, start: int = 0, chunk: int = MAX_PREFILL_TOKENS) -> float:
        """Seconds to prefill num_tokens tokens after `start` cached ones, alone, in chunks (no decode)."""
        total, pos, end = 0.0, start, start + num_tokens
        while pos < end:
            stop = min(end, (pos // chunk + 1) * chunk)
            total += self.step_time([(pos, stop - pos)])
            pos = stop
        return total

    def prefill_rate(self, context: int = 1024) -> float:
        """Prefill tokens per second for a full chunk at `context` tokens of context (tlru's speed)."""
        return MAX_PREFILL_TOKENS / max(self.step_time([(context, MAX_PREFILL_TOKENS)]), 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return {"coef": self.coef, "source": self.source, "fit": self.fit, "features": FEATURE_NOTES}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostModel:
        d = d.get("cost_model", d)  # a saved policies.json holds it under "cost_model"
        if "coef" not in d:
            d = {"coef": d}
        unknown = set(d["coef"]) - set(FEATURES)
        if unknown:
            raise PromptstashError(f"cost model has unknown terms {sorted(unknown)}; known: {', '.join(FEATURES)}")
        return cls({f: float(d["coef"].get(f, 0.0)) for f in FEATURES}, d.get("source", "given"), d.get("fit", {}))

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        model = cls.from_dict(json.loads(Path(path).read_text()))
        model.source = f"{Path(path).name} ({model.source})"
        return model


def _lstsq(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Least squares with rows weighted by 1/y (relative error counts, so short decode steps weigh as much as
    long prefills); a term fitted negative is dropped and the rest refitted."""
    w = 1.0 / np.maximum(y, 1e-6)
    active = [j for j in range(len(FEATURES)) if x[:, j].any()]
    while True:
        sol, *_ = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)
        neg = [a for a, c in zip(active, sol, strict=True) if c < 0]
        if not neg:
            break
        active.remove(neg[0])
    coef = dict.fromkeys(FEATURES, 0.0)
    for a, c in zip(active, sol, strict=True):
        coef[FEATURES[a]] = float(c)
    return coef


def fit_cost_model(samples: Sequence[tuple[Sequence[tuple[int, int]], float]]) -> CostModel:
    """Fit a CostModel to (chunks, seconds) samples (_lstsq); steps the first fit misses by more than 3x its
    median relative error (and 25%) are dropped as outliers (a CPU shared with other work) and the rest refitted.
    The fit figures cover the kept steps; `outliers` counts the dropped ones."""
    x = np.array([step_features(c) for c, _ in samples])
    y = np.array([s for _, s in samples])
    keep = np.ones(len(y), dtype=bool)
    for _ in range(2):
        coef = _lstsq(x[keep], y[keep])
        rel = np.abs(x @ np.array([coef[f] for f in FEATURES]) - y) / y
        bound = max(0.25, 3 * float(np.median(rel[keep])))
        new = rel <= bound
        if new.sum() < len(FEATURES) + 2 or (new == keep).all():
            break
        keep = new
    coef = _lstsq(x[keep], y[keep])
    model = CostModel(coef, "fitted")
    samples = [s for s, k in zip(samples, keep, strict=True) if k]
    y = y[keep]
    pred = np.array([model.step_time(c) for c, _ in samples])
    rel = np.abs(pred - y) / y
    ss = float(((y - y.mean()) ** 2).sum())
    model.fit = {"num_steps": len(samples), "outliers": int((~keep).sum()),
                 "r2": 1 - float(((pred - y) ** 2).sum()) / ss if ss else 1.0,
                 "median_rel_error": float(np.median(rel)), "p90_rel_error": float(np.percentile(rel, 90)),
                 "total_measured_s": float(y.sum()), "total_predicted_s": float(pred.sum())}
    return model


def timed_step(engine: Any) -> tuple[list[tuple[int, int]], float]:
    """Run one engine step; returns its chunks as (start, num_tokens) and its wall seconds."""
    sched = engine.scheduler
    seen: list[ScheduledChunk] = []
    original = sched.schedule

    def spy() -> list[ScheduledChunk]:
        chunks = original()
        seen.extend(chunks)
        return chunks

    sched.schedule = spy
    try:
        t = time.perf_counter()
        engine.run_step()
        dt = time.perf_counter() - t
    finally:
        del sched.schedule
    return _chunk_pairs(seen), dt


def measure_cost_model(engine: Any, seed: int = 0, log: Callable[[str], None] = print) -> CostModel:
    """Time real engine steps and fit a CostModel: prefill chunks of 64 / 256 / 512 tokens after 0, 1024 and
    2048 cached tokens, decode batches of 1, 4 and 16 short sequences and 4 long ones (every step is timed,
    the prefills that set these up too). About a minute on a 2-core CPU."""
    rng = random.Random(seed)
    vocab = engine.model.config.vocab_size
    low, high = trace_token_range(vocab)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(low, high) for _ in range(n)]

    samples: list[tuple[list[tuple[int, int]], float]] = []

    def timed_until_done(ids: Sequence[str]) -> None:
        pending = set(ids)
        while pending & engine.unfinished_ids():
            pairs, dt = timed_step(engine)
            if pairs:
                samples.append((pairs, dt))
        for rid in ids:
            engine.completion(rid)

    def submit(prompts: Sequence[list[int]], max_tokens: int, ns: str) -> list[str]:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        return [engine.add_request(p, params, namespace=ns) for p in prompts]

    start = time.perf_counter()
    timed_until_done(submit([tokens(512)], 4, "cm-warmup"))  # first-call costs of each shape: not sampled
    timed_until_done(submit([tokens(64) for _ in range(4)], 4, "cm-warmup"))
    samples.clear()
    for depth in (0, 1024, 2048):
        ns = f"cm-depth-{depth}-{rng.random()}"
        prefix = tokens(depth)
        if depth:
            timed_until_done(submit([prefix], 0, ns))
        for n in (64, 256, 512, 64, 256, 512):
            timed_until_done(submit([prefix + tokens(n)], 1, ns))
        log(f"[cost model] prefill after {depth} cached tokens: {len(samples)} steps timed")
    for batch, depth in ((1, 256), (4, 256), (16, 256), (4, 2048)):
        ns = f"cm-decode-{batch}-{depth}-{rng.random()}"
        prefix = tokens(depth - 32)
        if depth > 512:
            timed_until_done(submit([prefix], 0, ns))
        timed_until_done(submit([prefix + tokens(32) for _ in range(batch)], 8, ns))
        log(f"[cost model] decode batch {batch} at {depth} tokens: {len(samples)} steps timed")
    model = fit_cost_model(samples)
    log(f"[cost model] {len(samples)} steps in {time.perf_counter() - start:.0f} s, {model.fit['outliers']} dropped "
        f"as outliers; R² {model.fit['r2']:.3f}, median error {model.fit['median_rel_error']:.1%}")
    model.source = (f"measured on {engine.model_id} ({platform.machine()}, {engine.config.dtype} activations) in "
                    f"{time.perf_counter() - start:.0f} s")
    model.fit["samples"] = [{"chunks": c, "seconds": s} for c, s in samples]
    return model


# -- the replay ------------------------------------------------------------------------------------------------
class _SimClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _NoText:
    def push(self, token_id: int) -> str:
        return ""


def make_cache(num_blocks: int, eviction: str, clock: Callable[[], float], ttft_slo_s: float,
               prefill_rate: float) -> CacheManager:
    """A CacheManager with the given eviction policy (tlru: the SLO, and the cost model's prefill speed until
    the replay's steps update it, as the engine's measured speed does)."""
    config = EvictionConfig(policy=eviction, ttft_slo_s=ttft_slo_s, prefill_tokens_per_s=prefill_rate)
    return CacheManager(num_blocks, BLOCK_SIZE, MODEL_ID, KV_LAYOUT, True, clock=clock, eviction=config)


def make_scheduler(cache: CacheManager, schedule: str, clock: Callable[[], float]) -> Scheduler:
    """The engine's scheduler (lpm's max wait: the engine's default) on the simulated clock."""
    return Scheduler(cache, MAX_NUM_SEQS, MAX_PREFILL_TOKENS, schedule=schedule, clock=clock)


@dataclass
class ReplayRecord:
    index: int
    arrival_s: float
    ttft_s: float
    finish_s: float
    prompt_tokens: int
    cached_tokens: int


def replay(wl: SimWorkload, cost: CostModel, num_blocks: int, *, eviction: str = "lru", schedule: str = "fcfs",
           ttft_slo_s: float = 1.0, time_scale: float = 1.0) -> dict[str, Any]:
    """Replay a workload in simulated time through the real CacheManager and Scheduler; returns the cell's
    figures (and "records": per-request ReplayRecords). Integrity of the pool is checked at the end."""
    wall = time.perf_counter()
    clock = _SimClock()
    cache = make_cache(num_blocks, eviction, clock, ttft_slo_s, cost.prefill_rate())
    sched = make_scheduler(cache, schedule, clock)
    arrivals: list[tuple[float, int]] = [(r.arrival_s * time_scale, i) for i, r in enumerate(wl.requests)
                                         if r.prev is None]
    heapq.heapify(arrivals)
    children: dict[int, list[int]] = {}
    for i, r in enumerate(wl.requests):
        if r.prev is not None:
            children.setdefault(r.prev, []).append(i)
    index: dict[str, int] = {}
    records: list[ReplayRecord] = []
    steps = busy = 0.0
    rate: float | None = None
    while True:
        while arrivals and arrivals[0][0] <= clock.now:
            t, i = heapq.heappop(arrivals)
            sim = wl.requests[i]
            rid = f"r{i}"
            index[rid] = i
            sched.add(Request(request_id=rid, prompt_token_ids=sim.prompt,
                              sampling=SamplingParams(max_tokens=len(sim.output), ignore_eos=True),
                              namespace=NAMESPACE, tenant=NAMESPACE, stop_checker=StopChecker(_NoText(), ()),
                              eos_token_ids=frozenset(), arrival_time=t))
        chunks = sched.schedule()
        if not chunks:
            if arrivals:
                clock.now = max(clock.now, arrivals[0][0])
                continue
            if sched.has_unfinished():
                raise PromptstashError(f"replay stuck at t={clock.now:.1f}s with {len(sched.waiting)} waiting and "
                                       f"{len(sched.running)} running: the pool ({num_blocks} blocks) is too small")
            break
        dt = cost.step_time(_chunk_pairs(chunks))
        clock.now += dt
        num_prefill = sum(c.num_tokens for c in chunks if c.num_tokens > 1)
        if num_prefill >= 64:  # as Engine._note_prefill_rate: tlru's speed, a moving average of prefill steps
            rate = num_prefill / dt if rate is None else 0.9 * rate + 0.1 * num_prefill / dt
            cache.set_prefill_rate(rate)
        steps += 1
        busy += dt
        for chunk in chunks:  # as Engine._post_process, without a model
            request = chunk.request
            if request.status is not RequestStatus.RUNNING:
                continue
            request.num_computed = chunk.end
            cache.commit(request.request_id, request.token_ids, chunk.end)
            if chunk.end < len(request.token_ids):
                continue
            i = index[request.request_id]
            output = wl.requests[i].output
            request.token_ids.append(output[request.num_output_tokens])
            if request.first_token_time is None:
                request.first_token_time = clock.now
            if request.num_output_tokens >= len(output):
                sched.finish(request)
                request.finish_time = clock.now
                records.append(ReplayRecord(i, request.arrival_time, request.first_token_time - request.arrival_time,
                                            clock.now, request.prompt_len, request.num_cached_tokens or 0))
                for j in children.get(i, ()):
                    heapq.heappush(arrivals, (clock.now + wl.requests[j].arrival_s * time_scale, j))
    cache.check_integrity()
    if len(records) != len(wl.requests):
        raise PromptstashError(f"replay finished {len(records)} of {len(wl.requests)} requests")
    records.sort(key=lambda r: r.index)
    ttft = [r.ttft_s for r in records]
    prompt = sum(r.prompt_tokens for r in records)
    cached = sum(r.cached_tokens for r in records)
    stats = cache.stats()
    return {"num_blocks": num_blocks, "hit_rate": cached / prompt if prompt else 0.0, "cached_tokens": cached,
            "prompt_tokens": prompt, **{f"ttft_p{q}_s": percentile(ttft, q) for q in (50, 90, 95, 99)},
            "ttft_mean_s": statistics.fmean(ttft) if ttft else 0.0,
            "slo_violations": sum(t > ttft_slo_s for t in ttft) / len(ttft) if ttft else 0.0,
            "evictions": stats.num_evictions, "preemptions": sched.num_preemptions, "steps": int(steps),
            "sim_span_s": clock.now, "busy_fraction": busy / clock.now if clock.now else 0.0,
            "replay_wall_s": time.perf_counter() - wall, "records": records}


def time_scale_for(wl: SimWorkload, cost: CostModel, load: float) -> float:
    """The stretch of root arrivals that makes the offered load `load`: the prefill seconds of every prompt
    computed cold, alone, over the span of root arrivals. (With the cache the engine computes less, so no pool
    overloads it when load < 1.)"""
    roots = [r.arrival_s for r in wl.requests if r.prev is None]
    span = max(roots) - min(roots) if len(roots) > 1 else 1.0
    work = sum(cost.prefill_time(len(r.prompt)) for r in wl.requests)
    return work / (load * max(span, 1e-9))


# -- the run ---------------------------------------------------------------------------------------------------
def pool_blocks(wl: SimWorkload, fraction: float | None) -> int:
    """Pool size for a fraction of the working set; None = unbounded (the working set plus room for a full
    batch of the largest requests). Never below what MAX_NUM_SEQS / 4 of the largest requests need at once."""
    info = wl.info
    floor = info["max_request_blocks"] * max(2, MAX_NUM_SEQS // 4)
    if fraction is None:
        return info["working_set_blocks"] + info["max_request_blocks"] * MAX_NUM_SEQS
    return max(floor, int(info["working_set_blocks"] * fraction))


def default_slo(wl: SimWorkload, cost: CostModel) -> float:
    """The TTFT SLO of a workload: the time its median prompt takes to prefill cold and alone, rounded up to
    0.5 s (a request should see its first token within what a typical prompt costs without any cache)."""
    median = int(statistics.median(len(r.prompt) for r in wl.requests))
    return max(0.5, math.ceil(cost.prefill_time(median) * 2) / 2)


def _cell_row(policy: str, eviction: str, schedule: str, pool: str, fraction: float | None,
              res: dict[str, Any]) -> dict[str, Any]:
    return {"policy": policy, "eviction": eviction, "schedule": schedule, "pool": pool, "pool_fraction": fraction,
            **{k: v for k, v in res.items() if k != "records"}}


def run_workload(wl: SimWorkload, cost: CostModel, *, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 policies: Sequence[tuple[str, str, str]] = POLICIES, load: float = 0.8,
                 ttft_slo_s: float | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every policy at every pool size (and unbounded) for one workload, with the target check."""
    scale = time_scale_for(wl, cost, load)
    if ttft_slo_s is None:
        ttft_slo_s = default_slo(wl, cost)
    log(f"[{wl.name}] {len(wl.requests)} requests, working set {wl.info['working_set_blocks']:,} blocks, "
        f"optimum hit rate {wl.info['optimum_hit_rate']:.1%}, time scale {scale:.2f}, TTFT SLO {ttft_slo_s:g} s")
    cells = []
    pools = [(f"{f:.0%}", f) for f in fractions] + [("unbounded", None)]
    for label, fraction in pools:
        nb = pool_blocks(wl, fraction)
        for name, eviction, schedule in policies:
            res = replay(wl, cost, nb, eviction=eviction, schedule=schedule, ttft_slo_s=ttft_slo_s, time_scale=scale)
            cells.append(_cell_row(name, eviction, schedule, label, fraction, res))
            log(f"[{wl.name}] pool {label:>9} ({nb:,} blocks) {name:>8}: hit {res['hit_rate']:.1%}, TTFT p50 "
                f"{res['ttft_p50_s']:.2f} p90 {res['ttft_p90_s']:.2f} p99 {res['ttft_p99_s']:.2f} s, SLO viol. "
                f"{res['slo_violations']:.1%}, evictions {res['evictions']:,} ({res['replay_wall_s']:.1f} s)")
    return {"name": wl.name, "description": wl.description, "info": wl.info, "time_scale": scale, "load": load,
            "ttft_slo_s": ttft_slo_s, "cells": cells, "target": target_check(cells)}


def _cell(cells: Sequence[dict[str, Any]], policy: str, pool: str) -> dict[str, Any] | None:
    return next((c for c in cells if c["policy"] == policy and c["pool"] == pool), None)


def target_check(cells: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The issue's target: at the bounded pool where lru's p90 TTFT is highest relative to the unbounded pool's,
    tlru lowers p90 by 20% or more with a token hit rate at most 2 points lower."""
    ref = _cell(cells, "lru", "unbounded")
    pools = [c["pool"] for c in cells if c["policy"] == "lru" and c["pool"] != "unbounded"]
    if ref is None or not pools or _cell(cells, "tlru", pools[0]) is None:
        return {"measured": False}
    worst = max(pools, key=lambda p: _cell(cells, "lru", p)["ttft_p90_s"] / max(ref["ttft_p90_s"], 1e-9))
    lru, tlru = _cell(cells, "lru", worst), _cell(cells, "tlru", worst)
    p90_change = tlru["ttft_p90_s"] / lru["ttft_p90_s"] - 1 if lru["ttft_p90_s"] else 0.0
    hit_change = (tlru["hit_rate"] - lru["hit_rate"]) * 100
    return {"measured": True, "pool": worst, "lru_p90_s": lru["ttft_p90_s"], "tlru_p90_s": tlru["ttft_p90_s"],
            "lru_vs_unbounded_p90": lru["ttft_p90_s"] / max(ref["ttft_p90_s"], 1e-9),
            "p90_change": p90_change, "hit_rate_change_points": hit_change,
            "passed": p90_change <= -0.20 and hit_change >= -2.0}


def recommend(workloads: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Defaults from the numbers: the (eviction, schedule) with the lowest geometric mean of p90 TTFT relative to
    lru over every bounded pool of every workload, among those whose hit rate is never more than 2 points below
    lru's; it must beat lru by 5% on that mean, else lru / fcfs stays."""
    scores: dict[tuple[str, str], list[float]] = {}
    worst_hit: dict[tuple[str, str], float] = {}
    for w in workloads:
        cells = w["cells"]
        for c in cells:
            if c["pool"] == "unbounded":
                continue
            lru = _cell(cells, "lru", c["pool"])
            if lru is None:
                continue
            key = (c["eviction"], c["schedule"])
            scores.setdefault(key, []).append(max(c["ttft_p90_s"], 1e-6) / max(lru["ttft_p90_s"], 1e-6))
            worst_hit[key] = min(worst_hit.get(key, 0.0), (c["hit_rate"] - lru["hit_rate"]) * 100)
    means = {k: math.exp(statistics.fmean(math.log(x) for x in v)) for k, v in scores.items() if v}
    ok = {k: m for k, m in means.items() if worst_hit[k] >= -2.0}
    best = min(ok, key=ok.get) if ok else ("lru", "fcfs")
    if ok.get(best, 1.0) > 0.95:
        best = ("lru", "fcfs")
    return {"eviction": best[0], "schedule": best[1], "p90_vs_lru_geomean": {f"{e}/{s}": m for (e, s), m in
                                                                              means.items()},
            "worst_hit_rate_change_points": {f"{e}/{s}": h for (e, s), h in worst_hit.items()}}


# -- validation on the real model ------------------------------------------------------------------------------
def validate(engine: Any, cost: CostModel, num_requests: int = 40, load: float = 0.9, fraction: float = 0.25,
             max_prompt: int = 512, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Replay the first num_requests Mooncake requests of recurring prefix groups (1/16 scale, prompts cut to
    max_prompt tokens, which keeps their prefix structure) on the real engine, wall clock, one every interval
    (the cost model's prefill time of their uncached tokens at the optimum, per request, / load), with a pool of
    `fraction` of their working set; and the same in the simulator. Returns predicted vs measured TTFT p50 / p90,
    total time and hit rate."""
    from promptstash.engine.engine import Engine

    wl = build_mooncake(4 * num_requests, grouped=True)
    reqs = [dataclasses.replace(r, prompt=r.prompt[:max_prompt]) for r in wl.requests[:num_requests]]
    figures = workload_figures(reqs)
    work = sum(cost.prefill_time(len(r.prompt)) for r in reqs) * (1 - figures["optimum_hit_rate"])
    gap = work / len(reqs) / load
    reqs = [dataclasses.replace(r, arrival_s=k * gap) for k, r in enumerate(reqs)]
    vwl = SimWorkload("validation", "", reqs, figures)
    nb = pool_blocks(vwl, fraction)
    pred = replay(vwl, cost, nb)
    config = dataclasses.replace(engine.config, num_blocks=nb, kv_disk_dir=None, redis_url=None)
    real = Engine(engine.model, engine.tokenizer, config, engine.model_id)
    log(f"[validate] {len(reqs)} requests on the real engine, pool {nb} blocks, one every {gap:.2f} s "
        f"(predicted span {pred['sim_span_s']:.0f} s)")
    load_before = os.getloadavg()[0]
    steps: list[tuple[list[tuple[int, int]], float]] = []
    t0 = time.perf_counter()
    added: dict[str, tuple[int, float]] = {}
    k = 0
    while k < len(reqs) or real.has_unfinished():
        now = time.perf_counter() - t0
        while k < len(reqs) and reqs[k].arrival_s <= now:
            params = SamplingParams(max_tokens=len(reqs[k].output), ignore_eos=True)
            rid = real.add_request(list(reqs[k].prompt), params, namespace="validate")
            added[rid] = (k, time.perf_counter() - t0 - reqs[k].arrival_s)
            k += 1
        pairs, dt = timed_step(real)
        if pairs:
            steps.append((pairs, dt))
        elif k < len(reqs):
            time.sleep(max(0.0, min(0.01, reqs[k].arrival_s - (time.perf_counter() - t0))))
    total = time.perf_counter() - t0
    load_after = os.getloadavg()[0]
    step_measured = sum(dt for _, dt in steps)
    step_predicted = sum(cost.step_time(p) for p, _ in steps)
    ratios = sorted(dt / max(cost.step_time(p), 1e-9) for p, dt in steps)
    real.check_integrity()
    ttft = [0.0] * len(reqs)
    cached = 0
    for rid, (i, late) in added.items():
        c = real.completion(rid)
        ttft[i] = c.timings.ttft_s + late
        cached += c.usage.cached_tokens
    measured = {"ttft_p50_s": percentile(ttft, 50), "ttft_p90_s": percentile(ttft, 90), "total_s": total,
                "hit_rate": cached / vwl.info["prompt_tokens"]}
    predicted = {"ttft_p50_s": pred["ttft_p50_s"], "ttft_p90_s": pred["ttft_p90_s"], "total_s": pred["sim_span_s"],
                 "hit_rate": pred["hit_rate"]}
    error = {k: (predicted[k] / measured[k] - 1 if measured[k] else None) for k in measured}
    log(f"[validate] measured p50 {measured['ttft_p50_s']:.2f} p90 {measured['ttft_p90_s']:.2f} total "
        f"{total:.1f} s; predicted p50 {predicted['ttft_p50_s']:.2f} p90 {predicted['ttft_p90_s']:.2f} total "
        f"{predicted['total_s']:.1f} s")
    log(f"[validate] the real steps: {step_measured:.1f} s measured vs {step_predicted:.1f} s the cost model gives "
        f"for the same {len(steps)} steps (median step ratio {percentile(ratios, 50):.2f}); load average "
        f"{load_before:.1f} before, {load_after:.1f} after")
    return {"num_requests": len(reqs), "num_blocks": nb, "interval_s": gap, "prompt_tokens": vwl.info["prompt_tokens"],
            "measured": measured, "predicted": predicted, "relative_error": error,
            "steps": {"num_steps": len(steps), "measured_s": step_measured, "cost_model_s": step_predicted,
                      "ratio_p10": percentile(ratios, 10), "ratio_p50": percentile(ratios, 50),
                      "ratio_p90": percentile(ratios, 90)},
            "load_average": [load_before, load_after],
            "per_request": [{"measured_ttft_s": m, "predicted_ttft_s": p.ttft_s}
                            for m, p in zip(ttft, pred["records"], strict=True)]}


def run(*, workloads: Sequence[str] = WORKLOAD_NAMES, fractions: Sequence[float] = DEFAULT_FRACTIONS,
        cost_model: str | Path | dict[str, Any] | CostModel | None = None, model: str | None = None,
        validate_model: bool = True, ttft_slo_s: dict[str, float] | float | None = None, load: float = 0.8,
        quick: bool = False, policies: Sequence[tuple[str, str, str]] = POLICIES,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole benchmark: cost model (measured on the real engine, or given), validation on the real model
    (unless validate_model is False), then every workload x policy x pool. quick: small traces (300 Mooncake
    requests of recurring prefix groups, 100 ShareGPT conversations)."""
    start = time.perf_counter()
    engine = None
    if isinstance(cost_model, CostModel):
        cost = cost_model
    elif isinstance(cost_model, dict):
        cost = CostModel.from_dict(cost_model)
    elif cost_model is not None:
        cost = CostModel.load(cost_model)
    else:
        from promptstash.engine.engine import Engine

        engine = Engine.from_pretrained(model, progress=False)
        cost = measure_cost_model(engine, log=log)
    log(f"[cost model] {cost.source}: " + ", ".join(f"{k} {v:.3g}" for k, v in cost.coef.items())
        + (f"; fit R² {cost.fit['r2']:.3f}, median error {cost.fit['median_rel_error']:.1%}" if "r2" in cost.fit
           else ""))
    validation = None
    if validate_model:
        if engine is None:
            from promptstash.engine.engine import Engine

            engine = Engine.from_pretrained(model, progress=False)
        validation = validate(engine, cost, log=log)
    results = []
    for name in workloads:
        if name == "mooncake":
            wl = build_mooncake(300, grouped=True) if quick else build_mooncake()
        elif name == "sharegpt":
            wl = build_sharegpt(100 if quick else None)
        else:
            raise PromptstashError(f"unknown policies workload {name!r}; available: {', '.join(WORKLOAD_NAMES)}")
        slo = ttft_slo_s.get(name) if isinstance(ttft_slo_s, dict) else ttft_slo_s
        results.append(run_workload(wl, cost, fractions=fractions, policies=policies, load=load, ttft_slo_s=slo,
                                    log=log))
    rec = recommend(results)
    log(f"defaults: eviction={rec['eviction']}, schedule={rec['schedule']}")
    return {"setup": {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cpus": os.cpu_count(),
                      "block_size": BLOCK_SIZE,
                      "max_num_seqs": MAX_NUM_SEQS, "max_prefill_tokens": MAX_PREFILL_TOKENS, "load": load,
                      "fractions": list(fractions), "policies": [list(p) for p in policies], "quick": quick,
                      "model": engine.model_id if engine is not None else None, "wall_s": time.perf_counter() - start},
            "cost_model": cost.to_dict(), "validation": validation, "workloads": results, "recommendation": rec}


# -- report ----------------------------------------------------------------------------------------------------
def _pct(x: float | None, signed: bool = False) -> str:
    return "–" if x is None else (f"{x:+.1%}" if signed else f"{x:.1%}")


def to_markdown(res: dict[str, Any]) -> str:
    s, cm = res["setup"], res["cost_model"]
    lines = [f"# Eviction policies x pool sizes ({s['date']})", "",
             "Multi-turn traces replayed in simulated time through the real `CacheManager` and `Scheduler` "
             f"(block size {s['block_size']}, {s['max_num_seqs']} sequences, {s['max_prefill_tokens']}-token prefill "
             "chunks, as the engine ships), each step lasting what the cost model of the real engine predicts. "
             f"Arrivals are stretched so that computing every prompt cold would keep the engine {s['load']:.0%} busy "
             "(no pool overloads it). Pools are fractions of each trace's working set (unique blocks computed); "
             "`unbounded` holds everything (its hit rate is the unbounded-cache optimum). Policies: eviction "
             "(`lru`, `tlru`, `cost`) + admission order (`fcfs`, `lpm` = longest cached prefix first, a request "
             "waiting over 10 s first: the engine's default). tlru's TTFT target is the trace's SLO and its prefill "
             "speed a moving average of the replayed prefill steps, as the engine measures it; its next-turn size "
             "is measured (the policy's default); cost runs with its defaults. The SLO of a trace is the time its "
             "median prompt takes to prefill cold and alone (cost model), rounded up to 0.5 s. Hit rate = cached / "
             "prompt tokens at first admission; TTFT from arrival to the first output token (queueing included).",
             "",
             f"Cost model ({cm['source']}): step seconds = "
             + " + ".join(f"{v:.3g} x {k}" for k, v in cm["coef"].items() if v) + "."
             + (f" Fit over {cm['fit']['num_steps']} timed steps: R² {cm['fit']['r2']:.3f}, median error "
                f"{cm['fit']['median_rel_error']:.1%}, p90 error {cm['fit']['p90_rel_error']:.1%}."
                if "r2" in cm.get("fit", {}) else ""), ""]
    v = res.get("validation")
    if v:
        m, p, e = v["measured"], v["predicted"], v["relative_error"]
        lines += ["## Validation on the real model", "",
                  f"{v['num_requests']} Mooncake requests ({v['prompt_tokens']:,} prompt tokens), one every "
                  f"{v['interval_s']:.2f} s, pool {v['num_blocks']} blocks, on the real engine (wall clock) vs the "
                  "simulator:", "", "| | measured | predicted | error |", "|---|---:|---:|---:|"]
        for key, name in (("ttft_p50_s", "TTFT p50 (s)"), ("ttft_p90_s", "TTFT p90 (s)"), ("total_s", "total (s)"),
                          ("hit_rate", "hit rate")):
            fmt = _pct if key == "hit_rate" else (lambda x: f"{x:.2f}")
            lines.append(f"| {name} | {fmt(m[key])} | {fmt(p[key])} | {_pct(e[key], True)} |")
        st = v.get("steps")
        if st:
            la = v["load_average"]
            lines += ["", f"Step by step, the {st['num_steps']} real steps took {st['measured_s']:.1f} s where the "
                      f"cost model gives {st['cost_model_s']:.1f} s for the same chunks (real / model per step: p10 "
                      f"{st['ratio_p10']:.2f}, median {st['ratio_p50']:.2f}, p90 {st['ratio_p90']:.2f}); the machine's "
                      f"1-minute load average was {la[0]:.1f} before and {la[1]:.1f} after, on "
                      f"{s.get('cpus')} cores shared with other work. A TTFT error beyond the step error is the "
                      "queue: once the real engine falls behind, every later request waits longer."]
        lines.append("")
    for w in res["workloads"]:
        info = w["info"]
        lines += [f"## {w['name']}", "", w["description"], "",
                  f"{info['num_requests']:,} requests, {info['prompt_tokens']:,} prompt tokens, working set "
                  f"{info['working_set_blocks']:,} blocks; unbounded-cache optimum (computed from the tokens): "
                  f"{info['optimum_hit_rate']:.1%}. Time scale {w['time_scale']:.2f}; TTFT SLO {w['ttft_slo_s']:g} s.",
                  "", "| pool | policy | blocks | hit rate | TTFT p50 | p90 | p95 | p99 | SLO viol. | evictions |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in w["cells"]:
            lines.append(f"| {c['pool']} | {c['policy']} | {c['num_blocks']:,} | {c['hit_rate']:.1%} | "
                         f"{c['ttft_p50_s']:.2f} | {c['ttft_p90_s']:.2f} | {c['ttft_p95_s']:.2f} | "
                         f"{c['ttft_p99_s']:.2f} | {c['slo_violations']:.1%} | {c['evictions']:,} |")
        t = w["target"]
        if t.get("measured"):
            lines += ["", f"Target (tlru vs lru at the pool where lru suffers most, **{t['pool']}**: lru p90 "
                      f"{t['lru_vs_unbounded_p90']:.2f}x the unbounded pool's): p90 {t['lru_p90_s']:.2f} s -> "
                      f"{t['tlru_p90_s']:.2f} s ({t['p90_change']:+.1%}, target -20% or better), hit rate "
                      f"{t['hit_rate_change_points']:+.1f} points (target >= -2): "
                      f"**{'met' if t['passed'] else 'not met'}**."]
        lines.append("")
    rec = res["recommendation"]
    lines += ["## Defaults", "", "Geometric mean over the bounded pools of every workload of p90 TTFT relative to "
              "lru (lower is better), and the worst hit-rate change against lru:", "",
              "| eviction/schedule | p90 vs lru | worst hit-rate change |", "|---|---:|---:|"]
    for k, m in rec["p90_vs_lru_geomean"].items():
        lines.append(f"| {k} | {m:.3f} | {rec['worst_hit_rate_change_points'][k]:+.1f} pts |")
    lines += ["", f"defaults: eviction={rec['eviction']}, schedule={rec['schedule']}", "",
              f"Run time {s['wall_s']:.0f} s (`promptstash bench policies`)."]
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path, log: Callable[[str], None] = print) -> Path | None:
    """Per workload: hit rate, p90 TTFT and SLO violations against pool size, one line per policy."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("note: matplotlib is not installed; skipping the plot")
        return None
    ws = res["workloads"]
    fig, axes = plt.subplots(len(ws), 3, figsize=(15, 4.2 * len(ws)), squeeze=False)
    for row, w in zip(axes, ws, strict=True):
        bounded = [c for c in w["cells"] if c["pool_fraction"] is not None]
        for name in dict.fromkeys(c["policy"] for c in bounded):
            cs = sorted((c for c in bounded if c["policy"] == name), key=lambda c: c["pool_fraction"])
            xs = [c["pool_fraction"] * 100 for c in cs]
            row[0].plot(xs, [c["hit_rate"] * 100 for c in cs], marker="o", label=name)
            row[1].plot(xs, [c["ttft_p90_s"] for c in cs], marker="o", label=name)
            row[2].plot(xs, [c["slo_violations"] * 100 for c in cs], marker="o", label=name)
        unb = _cell(w["cells"], "lru", "unbounded")
        if unb is not None:
            row[0].axhline(unb["hit_rate"] * 100, color="gray", ls="--", label="unbounded")
            row[1].axhline(unb["ttft_p90_s"], color="gray", ls="--", label="unbounded")
        for ax, (title, ylabel) in zip(row, (("token hit rate", "%"), ("TTFT p90", "s"),
                                             (f"SLO violations (TTFT > {w['ttft_slo_s']:g} s)", "% of requests")),
                                       strict=True):
            ax.set_title(f"{w['name']}: {title}")
            ax.set_xlabel("pool (% of working set)")
            ax.set_ylabel(ylabel)
            ax.set_xscale("log")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write(res: dict[str, Any], out_dir: Path, log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """Write policies.json, policies.md and (with matplotlib) policies.png under out_dir."""
    return write_results(res, out_dir, "policies", to_markdown(res), lambda path: plot(res, path, log=log),
                         default=_jsonable)


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")
