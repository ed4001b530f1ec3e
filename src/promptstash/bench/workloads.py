"""`promptstash bench rag | chat | system-prompt | trace`: realistic workloads, caching ON vs OFF in one run.

Each workload is a list of requests (chat messages or token ids) in a fixed, stated order, built from the
public data in `shared/data` (see its README.md). A run sends them twice: with caching ON (one cache namespace
for the run, cold at its start) and OFF (in-process: a second Engine sharing the weights with
`enable_prefix_caching=False`; against a URL: a fresh `cache_salt` per request, so nothing is shared).
Requests are replayed closed-loop: `concurrency` in flight, the next sent when one finishes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from promptstash.config import PriceSheet
from promptstash.engine.engine import Engine
from promptstash.engine.sampling import SamplingParams
from promptstash.errors import PromptstashError

WORKLOADS = ("rag", "chat", "system-prompt", "trace")
TRACE_BLOCK_TOKENS = 512  # tokens per hash id in the Mooncake trace

Prompt = list[dict[str, Any]] | list[int]


class DataNotFoundError(PromptstashError, FileNotFoundError):
    """The shared workload data folder (or one of its files) is missing."""


@dataclass
class BenchRequest:
    prompt: Prompt  # chat messages, or token ids (trace)
    label: str  # where it comes from, e.g. "conv 3 turn 2"


@dataclass
class Workload:
    name: str
    description: str  # how the requests were built, in order; goes into the report
    requests: list[BenchRequest]
    info: dict[str, Any] = field(default_factory=dict)  # workload-specific figures (recurrence, optimum...)


@dataclass
class RequestRecord:
    index: int  # position in the workload
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float
    e2e_s: float
    start_s: float  # since the run started
    end_s: float


@dataclass
class RunData:
    """One measured pass over a workload (caching on or off)."""

    mode: str  # "on" | "off"
    records: list[RequestRecord]
    wall_s: float
    peak_kv_blocks: int
    block_size: int
    kv_bytes_per_block: int | None  # None when unknown (remote server)


# -- data --------------------------------------------------------------------------------------------------
def data_dir() -> Path:
    """The shared data folder: $PROMPTSTASH_DATA_DIR, else `../shared/data` beside the project root.

    Raises DataNotFoundError (with where it looked) when absent."""
    env = os.environ.get("PROMPTSTASH_DATA_DIR")
    path = Path(env) if env else (Path(__file__).resolve().parents[3] / ".." / "shared" / "data").resolve()
    if not path.is_dir():
        raise DataNotFoundError(f"workload data not found at {path}: set PROMPTSTASH_DATA_DIR to the folder "
                                "holding rag/, chat/ and traces/ (see shared/data/README.md)")
    return path


def _data_file(relative: str) -> Path:
    path = data_dir() / relative
    if not path.is_file():
        raise DataNotFoundError(f"workload data file {path} is missing")
    return path


def _clip(text: str, max_chars: int | None) -> str:
    return text if max_chars is None else text[:max_chars]


# -- workloads ---------------------------------------------------------------------------------------------
RAG_SYSTEM = ("You answer questions using only the passages below. Cite the passage number you rely on, answer in "
              "one short sentence, and say 'unknown' if the passages do not contain the answer.")


def build_rag(num_requests: int = 20, k: int = 3, pool_size: int = 6, passage_chars: int | None = None,
              seed: int = 0, modules: bool = False) -> Workload:
    """MuSiQue questions (in file order, cycling), each with k passages drawn at random from a pool of
    `pool_size` passages (the first distinct passages of the file), placed in pool order after a shared system
    prompt. A small pool makes passages recur; a passage is reusable by prefix caching only when every passage
    before it recurs too, so info reports both the passage recurrence and the prefix recurrence.
    modules: each passage is a module part (`"module": true`), reusable wherever it recurs."""
    examples = json.loads(_data_file("rag/musique_dev.json").read_text())
    pool: list[str] = []  # passage texts (the data's titles are empty)
    for ex in examples:
        for ctx in ex["ctxs"]:
            if len(pool) < pool_size and ctx["text"] not in pool:
                pool.append(ctx["text"])
    k = min(k, len(pool))
    rng = random.Random(seed)
    requests, seen_passages, seen_prefixes = [], set(), set()
    recurring = prefix_recurring = 0
    for i in range(num_requests):
        chosen = sorted(rng.sample(range(len(pool)), k))
        recurring += sum(j in seen_passages for j in chosen)
        prefix_recurring += sum(tuple(chosen[:n + 1]) in seen_prefixes for n in range(k))
        seen_passages.update(chosen)
        seen_prefixes.update(tuple(chosen[:n + 1]) for n in range(k))
        question = examples[i % len(examples)]["question"]
        if modules:  # the same text, joined by the renderer's "\n" between parts; each passage on its own
            system: str | list[dict[str, Any]] = [{"type": "text", "text": f"{RAG_SYSTEM}\n"}] + [
                {"type": "text", "text": f"[Passage {j + 1}]\n{_clip(pool[j], passage_chars)}\n", "module": True}
                for j in chosen]
        else:
            passages = "\n\n".join(f"[Passage {j + 1}]\n{_clip(pool[j], passage_chars)}" for j in chosen)
            system = f"{RAG_SYSTEM}\n\n{passages}"
        requests.append(BenchRequest([{"role": "system", "content": system},
                                      {"role": "user", "content": question}], f"q{i % len(examples)} p{chosen}"))
    total = max(1, num_requests * k)
    marked = ", each passage a module" if modules else ""
    return Workload("rag", f"{num_requests} MuSiQue questions; each: shared system prompt + {k} passages drawn "
                    f"from a pool of {len(pool)} (sorted by pool index{marked}), then the question.", requests,
                    {"k": k, "pool_size": len(pool), "passage_recurrence_rate": recurring / total,
                     "prefix_recurrence_rate": prefix_recurring / total, "modules": modules})


CHAT_SYSTEM = "You are a friendly, concise assistant."


def _conversation_turns(conv: list[dict[str, str]], ci: int, message_chars: int | None) -> list[BenchRequest]:
    """One request per user turn of a ShareGPT conversation, each with the whole history before it."""
    history: list[dict[str, str]] = [{"role": "system", "content": CHAT_SYSTEM}]
    turns = []
    for m in conv:
        role = "user" if m["from"] == "human" else "assistant"
        history.append({"role": role, "content": _clip(m["value"], message_chars)})
        if role == "user":
            turns.append(BenchRequest(list(history), f"conv {ci} turn {len(turns) + 1}"))
    return turns


def build_chat(num_requests: int = 20, num_conversations: int = 4, message_chars: int | None = 2000) -> Workload:
    """ShareGPT conversations with at least two user turns (file order), in waves of `num_conversations`
    interleaved round-robin by turn, one request per user turn; each request resends the whole history, with
    the data's assistant turns as replies. Waves continue until num_requests requests."""
    data = json.loads(_data_file("chat/sharegpt_dummy_conversations.json").read_text())
    convs = [c["conversations"] for c in data if sum(m["from"] == "human" for m in c["conversations"]) >= 2]
    requests: list[BenchRequest] = []
    wave = max(1, num_conversations)
    used = 0
    for first in range(0, len(convs), wave):
        if len(requests) >= num_requests:
            break
        turns = [_conversation_turns(convs[ci], ci, message_chars) for ci in range(first, first + wave)
                 if ci < len(convs)]
        used += len(turns)
        for round_ in range(max(len(t) for t in turns)):
            requests += [t[round_] for t in turns if round_ < len(t)]
    return Workload("chat", f"{used} ShareGPT conversations, {wave} at a time interleaved round-robin by turn; each "
                    "request resends the whole history (assistant turns from the data).", requests[:num_requests],
                    {"num_conversations": used, "interleaved": wave})


def system_prompt_text() -> str:
    """A long (~1,000+ tokens with a Qwen tokenizer) shared system prompt: a support policy."""
    topics = ["billing", "refunds", "shipping", "returns", "warranty", "accounts", "passwords", "privacy",
              "orders", "discounts", "gift cards", "subscriptions", "invoices", "taxes", "deliveries",
              "damaged items", "exchanges", "loyalty points", "business accounts", "accessibility"]
    rules = [f"Policy {i + 1} ({t}): when a customer asks about {t}, first restate the question, then answer from "
             f"the official {t} guidelines, cite the relevant section, avoid speculation, keep a warm tone, and "
             f"offer a follow-up step; escalate to a human agent if the {t} case involves legal or safety issues."
             for i, t in enumerate(topics)]
    return "You are the customer support assistant of ACME Corp.\n" + "\n".join(rules)


def build_system_prompt(num_requests: int = 20, system_chars: int | None = None) -> Workload:
    """One long shared system prompt (clipped to system_chars), then distinct short MT-Bench first-turn
    questions (file order, cycling)."""
    lines = _data_file("chat/mt_bench_questions.jsonl").read_text().splitlines()
    questions = [json.loads(line)["turns"][0] for line in lines if line.strip()]
    system = _clip(system_prompt_text(), system_chars)
    requests = [BenchRequest([{"role": "system", "content": system},
                              {"role": "user", "content": questions[i % len(questions)]}], f"mt_bench {i}")
                for i in range(num_requests)]
    return Workload("system-prompt", f"one shared system prompt ({len(system)} characters) + {num_requests} "
                    "distinct MT-Bench questions.", requests, {"system_prompt_chars": len(system)})


def _block_tokens(hash_id: int, n: int, low: int, high: int) -> list[int]:
    rng = random.Random(hash_id * 1_000_003 + 17)  # same id -> same tokens
    return [rng.randrange(low, high) for _ in range(n)]


def trace_token_range(vocab_size: int) -> tuple[int, int]:
    """Token ids used for trace blocks: ordinary ids (Qwen's special tokens start at 151643)."""
    high = min(vocab_size, 150000)
    return min(100, high // 2), high


def _trace_rows(num_requests: int, grouped: bool) -> list[dict[str, Any]]:
    """Trace rows in trace order: the first num_requests, or (grouped) those of the fewest prefix groups (same
    first hash id, recurring in the trace; groups taken by first appearance) that give num_requests."""
    lines = _data_file("traces/mooncake_synthetic_trace.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    if not grouped:
        return rows[:num_requests]
    counts: dict[int, int] = {}
    for r in rows:
        counts[r["hash_ids"][0]] = counts.get(r["hash_ids"][0], 0) + 1
    roots: set[int] = set()
    total = 0
    for r in rows:
        root = r["hash_ids"][0]
        if total >= num_requests:
            break
        if counts[root] >= 2 and root not in roots:
            roots.add(root)
            total += counts[root]
    return [r for r in rows if r["hash_ids"][0] in roots][:num_requests]


def build_trace(num_requests: int = 20, scale: int = 32, vocab_size: int = 151936, grouped: bool = True) -> Workload:
    """Mooncake trace requests in trace order (timestamps ignored: closed loop). grouped (default): the requests
    of the first prefix groups (sessions sharing a first block) that recur, since the trace's first requests
    share nothing; otherwise the first `num_requests` requests.
    Each hash id becomes 512/scale deterministic tokens; input_length is divided by `scale` likewise.
    info["optimum_cached_tokens"]: what an unbounded cache would serve, from the hash ids alone (a block hits
    when its hash-id prefix was seen in an earlier request; it never counts more than the prompt)."""
    if scale < 1 or TRACE_BLOCK_TOKENS % scale:
        raise PromptstashError(f"trace scale must divide {TRACE_BLOCK_TOKENS}, got {scale}")
    block = TRACE_BLOCK_TOKENS // scale
    low, high = trace_token_range(vocab_size)
    seen: set[tuple[int, ...]] = set()
    requests, optimum, prompt_total = [], 0, 0
    for i, row in enumerate(_trace_rows(num_requests, grouped)):
        ids = row["hash_ids"]
        length = min(-(-row["input_length"] // scale), block * len(ids))
        tokens = [t for h in ids for t in _block_tokens(h, block, low, high)][:length]
        prefixes = [tuple(ids[:j + 1]) for j in range(len(ids))]
        hits = next((j for j, p in enumerate(prefixes) if p not in seen), len(prefixes))
        optimum += min(hits * block, length)
        prompt_total += length
        seen.update(prefixes)
        requests.append(BenchRequest(tokens, f"trace {i} ({len(ids)} blocks)"))
    which = "the requests of the first recurring prefix groups" if grouped else "the first requests"
    return Workload("trace", f"{len(requests)} Mooncake synthetic trace requests ({which}) in order, "
                    f"1/{scale} scale ({block} tokens per hash id); closed-loop replay, timestamps ignored.", requests,
                    {"scale": scale, "block_tokens": block, "optimum_cached_tokens": optimum,
                     "optimum_hit_rate": optimum / prompt_total if prompt_total else 0.0,
                     "prompt_tokens": prompt_total})


def build(name: str, num_requests: int = 20, *, k: int = 3, scale: int = 32, vocab_size: int = 151936,
          text_chars: int | None = None, modules: bool = False) -> Workload:
    """The workload `name` (one of WORKLOADS). text_chars clips passages, messages and the system-prompt
    workload's prompt (None = as in the data; chat's default clip is 2,000 characters per message).
    modules (rag only): passages are module parts."""
    if modules and name != "rag":
        raise PromptstashError(f"modules mode is for the rag workload, not {name!r}")
    if name == "rag":
        return build_rag(num_requests, k=k, passage_chars=text_chars, modules=modules)
    if name == "chat":
        return build_chat(num_requests, message_chars=text_chars or 2000)
    if name == "system-prompt":
        return build_system_prompt(num_requests, system_chars=text_chars)
    if name == "trace":
        return build_trace(num_requests, scale=scale, vocab_size=vocab_size)
    raise PromptstashError(f"unknown workload {name!r}; available: {', '.join(WORKLOADS)}")


# -- in-process runs ---------------------------------------------------------------------------------------
def caching_off_twin(engine: Engine) -> Engine:
    """A second Engine on the same weights and tokenizer with prefix caching off (no lower tiers)."""
    config = dataclasses.replace(engine.config, enable_prefix_caching=False, kv_disk_dir=None, redis_url=None)
    return Engine(engine.model, engine.tokenizer, config, engine.model_id)


def run_engine(engine: Engine, requests: Sequence[BenchRequest], *, mode: str, concurrency: int = 4,
               max_tokens: int = 16, module_repair: str | None = None) -> RunData:
    """Replay `requests` in order with `concurrency` in flight; greedy, ignore_eos (fixed output length).
    A fresh namespace per run, so a run starts cold. Peak KV = max over steps of pool blocks in use.
    module_repair: for prompts with modules (None = the engine's default)."""
    namespace = f"bench-{mode}-{uuid.uuid4().hex}"
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    pending = deque(enumerate(requests))
    inflight: dict[str, tuple[int, float]] = {}
    records: list[RequestRecord] = []
    peak = 0
    bar = tqdm(total=len(requests), desc=f"caching {mode}", unit="req", file=sys.stderr, leave=False)
    t0 = time.perf_counter()
    while pending or inflight:
        while pending and len(inflight) < max(1, concurrency):
            i, req = pending.popleft()
            rid = engine.add_request(req.prompt, params, namespace=namespace, module_repair=module_repair)
            inflight[rid] = (i, time.perf_counter() - t0)
        if not engine.run_step().num_scheduled:
            engine.wait_for_work(0.005)
        peak = max(peak, engine.stats().cache.usage.num_in_use)
        unfinished = engine.unfinished_ids()  # NOTE: not the step's updates: another thread may step it too
        for rid in [r for r in inflight if r not in unfinished]:
            i, start = inflight.pop(rid)
            c = engine.completion(rid)
            records.append(RequestRecord(i, c.usage.prompt_tokens, c.usage.cached_tokens,
                                         c.usage.completion_tokens, c.timings.ttft_s, c.timings.total_s,
                                         start, time.perf_counter() - t0))
            bar.update()
    bar.close()
    bs = engine.config.block_size
    return RunData(mode, records, time.perf_counter() - t0, peak, bs, engine.kv.bytes_per_token * bs)


# -- runs against a URL ------------------------------------------------------------------------------------
def _sse_events(response) -> Iterator[dict[str, Any]]:
    for line in response.iter_lines():
        if line.startswith("data:"):
            data = line[5:].strip()
            if data == "[DONE]":
                return
            yield json.loads(data)


def _url_request(client, base: str, model: str, req: BenchRequest, max_tokens: int, salt: str,
                 module_repair: str | None = None) -> dict[str, Any]:
    """One streamed request; returns ttft_s, e2e_s and the usage (prompt, cached, completion tokens)."""
    chat = isinstance(req.prompt[0], dict)
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                            "stream": True, "stream_options": {"include_usage": True}, "cache_salt": salt}
    body["messages" if chat else "prompt"] = req.prompt
    if module_repair is not None:
        body["module_repair"] = module_repair
    start = time.perf_counter()
    ttft, usage = None, None
    with client.stream("POST", f"{base}/v1/{'chat/completions' if chat else 'completions'}", json=body) as r:
        if r.status_code != 200:
            r.read()
            raise PromptstashError(f"{base} answered {r.status_code}: {r.text[:300]}")
        for event in _sse_events(r):
            if "error" in event:
                raise PromptstashError(f"{base} failed a request: {event['error']}")
            for choice in event.get("choices") or ():
                text = choice.get("delta", {}).get("content") if chat else choice.get("text")
                if ttft is None and (text or choice.get("finish_reason")):
                    ttft = time.perf_counter() - start
            usage = event.get("usage") or usage
    if usage is None:
        raise PromptstashError(f"{base} sent no usage (stream_options.include_usage)")
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    end = time.perf_counter() - start
    return {"ttft_s": end if ttft is None else ttft, "e2e_s": end, "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": cached, "completion_tokens": usage.get("completion_tokens", 0)}


def _pool_sampler(client, base: str, stop: threading.Event, out: dict[str, int]) -> None:
    while not stop.is_set():
        try:
            pool = client.get(f"{base}/v1/cache/stats").json().get("pool", {})
            out["peak"] = max(out["peak"], int(pool.get("used", 0)))
            out["block_size"] = int(pool.get("block_size", out["block_size"]))
        except Exception:  # noqa: BLE001 - a server without /v1/cache/stats: peak stays unknown (0)
            return
        stop.wait(0.05)


def server_model(base: str, api_key: str | None = None) -> str:
    """The first model id that the server lists in /v1/models."""
    import httpx

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(f"{_base(base)}/v1/models", headers=headers, timeout=30)
    if r.status_code != 200 or not r.json().get("data"):
        raise PromptstashError(f"{_base(base)}/v1/models answered {r.status_code}: {r.text[:300]}")
    return r.json()["data"][0]["id"]


def _base(url: str) -> str:
    """The server root of a URL given with or without a trailing /v1."""
    return url.rstrip("/").removesuffix("/v1")


def run_url(url: str, requests: Sequence[BenchRequest], *, mode: str, model: str, concurrency: int = 4,
            max_tokens: int = 16, api_key: str | None = None, timeout_s: float = 600.0,
            module_repair: str | None = None) -> RunData:
    """Replay `requests` against an OpenAI-compatible server, `concurrency` threads taking them in order.
    ON: one cache_salt for the whole run (cold at its start); OFF: a fresh cache_salt per request.
    Peak KV: max of /v1/cache/stats pool "used", sampled every 50 ms (0 if the server lacks it)."""
    import httpx

    base = _base(url)
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    run_salt = f"bench-on-{uuid.uuid4().hex}"
    salt: Callable[[], str] = (lambda: run_salt) if mode == "on" else (lambda: f"bench-off-{uuid.uuid4().hex}")
    todo = iter(enumerate(requests))
    lock = threading.Lock()
    records: list[RequestRecord] = []
    errors: list[BaseException] = []
    pool = {"peak": 0, "block_size": 16}
    bar = tqdm(total=len(requests), desc=f"caching {mode}", unit="req", file=sys.stderr, leave=False)
    with httpx.Client(headers=headers, timeout=timeout_s) as client:
        stop = threading.Event()
        sampler = threading.Thread(target=_pool_sampler, args=(client, base, stop, pool), daemon=True)
        t0 = time.perf_counter()
        sampler.start()

        def worker() -> None:
            while not errors:
                with lock:
                    item = next(todo, None)
                if item is None:
                    return
                i, req = item
                start = time.perf_counter() - t0
                try:
                    r = _url_request(client, base, model, req, max_tokens, salt(), module_repair)
                except BaseException as exc:  # noqa: BLE001 - reported after the threads stop
                    errors.append(exc)
                    return
                with lock:
                    records.append(RequestRecord(i, r["prompt_tokens"], r["cached_tokens"], r["completion_tokens"],
                                                 r["ttft_s"], r["e2e_s"], start, time.perf_counter() - t0))
                    bar.update()

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, concurrency))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        bar.close()
        stop.set()
        sampler.join(timeout=5)
    if errors:
        raise errors[0]
    return RunData(mode, records, wall, pool["peak"], pool["block_size"], None)


# -- the benchmark -----------------------------------------------------------------------------------------
def run(name: str, *, engine: Engine | None = None, url: str | None = None, model: str | None = None,
        num_requests: int = 20, concurrency: int = 4, max_tokens: int = 16, k: int = 3, scale: int = 32,
        text_chars: int | None = None, vocab_size: int | None = None, api_key: str | None = None,
        prices: PriceSheet | None = None, modules: bool = False, module_repair: str | None = None,
        log: Callable[[str], None] = print) -> Any:
    """Build workload `name` and measure it with caching ON then OFF, in-process (`engine`) or against `url`
    (exactly one). vocab_size: for trace token ids (default: the engine's, else Qwen's). Returns a BenchResult.
    modules (rag): each passage is a module part, repaired with module_repair (None = the engine's or the
    server's default); OFF ignores the marks (the twin engine has caching off; a fresh cache_salt per request)."""
    from promptstash.bench import report

    if (engine is None) == (url is None):
        raise PromptstashError("give exactly one of an engine (in-process) or a URL")
    prices = prices or PriceSheet()
    if vocab_size is None:
        vocab_size = engine.model.config.vocab_size if engine is not None else 151936
    workload = build(name, num_requests, k=k, scale=scale, vocab_size=vocab_size, text_chars=text_chars,
                     modules=modules)
    opts: dict[str, Any] = {"concurrency": concurrency, "max_tokens": max_tokens}
    if modules:
        opts["module_repair"] = module_repair
        if module_repair is None and engine is not None:  # report what the requests get: the engine's default
            opts["module_repair"] = engine.default_module_repair.label
    runs: dict[str, RunData] = {}
    if engine is not None:
        off_engine = caching_off_twin(engine)
        low, _ = trace_token_range(vocab_size)
        for e in (engine, off_engine):  # first-call costs
            e.generate([low] * 8, max_tokens=1, namespace=f"warmup-{uuid.uuid4().hex}")
        for mode, e in (("on", engine), ("off", off_engine)):
            runs[mode] = run_engine(e, workload.requests, mode=mode, **opts)
            log(f"[{name} {mode}] {len(runs[mode].records)} requests in {runs[mode].wall_s:.1f}s")
        target, model_id = "in-process", engine.model_id
    else:
        model_id = model or server_model(url, api_key)
        for mode in ("on", "off"):
            runs[mode] = run_url(url, workload.requests, mode=mode, model=model_id, api_key=api_key, **opts)
            log(f"[{name} {mode}] {len(runs[mode].records)} requests in {runs[mode].wall_s:.1f}s")
        target = url
    setup = {"workload": name, "target": target, "model": model_id, "num_requests": len(workload.requests),
             **opts, "k": k if name == "rag" else None, "modules": modules, "scale": scale if name == "trace" else None,
             "date": time.strftime("%Y-%m-%d"), "prices": dataclasses.asdict(prices)}
    info = {"description": workload.description, **workload.info}
    return report.build_result(setup, info, runs, prices)
