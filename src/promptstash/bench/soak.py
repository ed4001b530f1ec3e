"""`promptstash bench soak`: a real server under sustained, hostile load, with a Redis restart and a kill -9.

A real `redis-server` and a real `promptstash serve` subprocess on free loopback ports, then for `duration`
seconds:

- `clients` concurrent streaming chat clients (httpx, async), small max_tokens, prompts made of a few shared
  long system prompts plus varied questions (so the cache is exercised); `disconnect_fraction` of the streams
  are closed by the client mid-stream;
- hostile bodies mixed in: temperatures 1e-300 / 1e-45 / 5e-324 (must finish normally and greedily: their
  text must equal the golden text), a ~31 MB prompt (must be refused, 413 or 400, quickly), invalid UTF-8
  (400) and malformed JSON (400);
- a golden greedy request before, periodically during and after the run: its text must never change;
- `/health` polled every second by its own task and client: its latency must stay under 1 s;
- Redis killed and restarted on the same port at 40% of the run, the server killed with SIGKILL and
  restarted on the same cache directory at 2/3; connection errors while the server is down are counted
  apart, not as server failures;
- afterwards: in-flight requests must drain to 0, the pool must hold no leaked block, no 5xx, and the
  server's RSS must stay within 10% between a warm-up sample and the end (per server process).

Every loop is bounded in count and time, only loopback addresses are used, and every subprocess is killed
at the end. Results: soak.json and soak.md under `--out`; the command exits non-zero if a check fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
GOLDEN_PROMPT = [{"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
                 {"role": "user", "content": "Explain what a hash table is."}]
GOLDEN_MAX_TOKENS = 24
HUGE_PROMPT_BYTES = 31_000_000
HUGE_MIN_INTERVAL_S = 30.0  # at most one ~31 MB body in flight per this many seconds
HEALTH_LIMIT_S = 1.0
HUGE_REFUSAL_LIMIT_S = 10.0
RSS_TOLERANCE = 0.10
REQUEST_TIMEOUT_S = 120.0  # a request not finished by then is counted as stalled
RESTART_GRACE_S = 2.0  # connection errors this long after the restarted server answers still count as restart
HOSTILE_PAUSE_S = 1.0  # each hostile task sends one body, waits for its answer, pauses this long, sends the next
TINY_TEMPERATURE_KINDS = ("temperature=1e-300", "temperature=1e-45", "temperature=5e-324")  # slow: they generate
REFUSED_KINDS = ("huge_prompt", "invalid_utf8", "malformed_json")  # fast: refused before any work


# -- processes -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int | None:
    """VmRSS of a live process, in KiB (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class RedisProcess:
    """redis-server on a fixed loopback port, no persistence; kill() and start() keep the port."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server") or next(
            (p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if Path(p).exists()), None)
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (`make redis` or apt-get install redis-server)")
        self.binary, self.dir, self.port = binary, directory, free_port()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.url = f"redis://{HOST}:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 20.0) -> None:
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", HOST, "--save", "",
                                      "--appendonly", "no", "--dir", str(self.dir)],
                                     stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}: "
                           + (self.dir / "redis.log").read_text(errors="replace")[-1000:])

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


class ServerProcess:
    """`python -m promptstash.cli serve` on a fixed loopback port; kill9() and start() keep port and cache."""

    def __init__(self, work: Path, redis_url: str, model: str | None, extra: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = work / "server.log"
        self.cmd = [sys.executable, "-m", "promptstash.cli", "serve", "--host", HOST, "--port", str(self.port),
                    "--redis-url", redis_url, "--cache-dir", str(work / "kv"), "--log-level", "warning", *extra]
        if model is not None:
            self.cmd += ["--model", model]
        self.proc: subprocess.Popen | None = None
        self.generation = 0

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self, timeout_s: float) -> float:
        """Start and wait for /health; returns the seconds it took."""
        import httpx

        t0 = time.monotonic()
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        self.generation += 1
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            time.sleep(0.25)
        tail = self.log_path.read_text(errors="replace")[-3000:]
        self.kill9()
        raise RuntimeError(f"the server did not answer /health within {timeout_s:.0f} s:\n{tail}")

    def kill9(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)

    def stop(self) -> int | None:
        """SIGTERM (queued tier writes are flushed), SIGKILL after 60 s."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        return proc.returncode


def make_tiny_model(dest: Path, models_dir: str | None = None) -> Path:
    """A random-weight 2-layer Qwen2 with the default model's tokenizer and chat template (a few MB of compute,
    loads in a second): for a quick soak of the server machinery, not of the model."""
    import torch
    from safetensors.torch import save_file

    from promptstash.models.loader import resolve_model

    source = resolve_model(None, cache_dir=models_dir).path
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (source / name).exists():
            shutil.copy2(source / name, dest / name)
    cfg = json.loads((source / "config.json").read_text())
    cfg.pop("layer_types", None)
    cfg |= {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "tie_word_embeddings": True, "dtype": "float32"}
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator().manual_seed(0)
    hidden, inter, vocab, kv = 64, 128, int(cfg["vocab_size"]), 2 * 16

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.05

    weights = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": torch.ones(hidden)}
    for i in range(2):
        p = f"model.layers.{i}."
        weights |= {p + "input_layernorm.weight": torch.ones(hidden),
                    p + "post_attention_layernorm.weight": torch.ones(hidden),
                    p + "self_attn.q_proj.weight": rand(hidden, hidden), p + "self_attn.q_proj.bias": rand(hidden),
                    p + "self_attn.k_proj.weight": rand(kv, hidden), p + "self_attn.k_proj.bias": rand(kv),
                    p + "self_attn.v_proj.weight": rand(kv, hidden), p + "self_attn.v_proj.bias": rand(kv),
                    p + "self_attn.o_proj.weight": rand(hidden, hidden),
                    p + "mlp.gate_proj.weight": rand(inter, hidden), p + "mlp.up_proj.weight": rand(inter, hidden),
                    p + "mlp.down_proj.weight": rand(hidden, inter)}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(dest / "model.safetensors"))
    return dest


# -- workload ------------------------------------------------------------------------------------
def system_prompts(count: int = 3) -> list[str]:
    """A few long, distinct system prompts (~1,000 tokens each) that many requests share."""
    topics = ["a code review bot for a Python monorepo", "a support agent for a cloud storage product",
              "a tutor for introductory statistics", "an assistant for a hospital's scheduling desk"]
    out = []
    for k in range(count):
        rules = [f"Rule {i + 1}: when the user asks about item {i * 7 + k}, answer briefly, cite section "
                 f"{(i * 13 + k) % 41}, and never reveal internal identifier {(i * 7919 + k * 104729) % 99991}."
                 for i in range(40)]
        out.append(f"You are {topics[k % len(topics)]}. Follow these rules exactly.\n" + "\n".join(rules))
    return out


QUESTIONS = ["What does rule {n} say?", "Summarise rule {n} in five words.", "Is item {n} covered?",
             "Which section does rule {n} cite?", "Give one example for rule {n}.", "Why might rule {n} exist?",
             "Translate rule {n} into French.", "List two risks related to item {n}.",
             "What is 17 times {n}?", "Write a haiku about item {n}."]


def hostile_bodies(model: str) -> dict[str, bytes]:
    """The raw bodies that must be refused: a ~31 MB prompt (413 or 400), invalid UTF-8 and malformed JSON."""
    head = json.dumps({"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": ""}]})
    filler = "lorem ipsum dolor sit amet " * (HUGE_PROMPT_BYTES // 27 + 1)
    huge = head.replace('"content": ""', json.dumps({"content": filler[:HUGE_PROMPT_BYTES]})[1:-1]).encode()
    bad_utf8 = (b'{"model": "' + model.encode() + b'", "max_tokens": 8, "messages": '
                b'[{"role": "user", "content": "caf\xc3 \xff\xfe broken \xed\xa0\x80 bytes"}]}')
    malformed = b'{"model": "' + model.encode() + b'", "max_tokens": 8, "messages": [{"role": "user", "content": '
    return {"huge_prompt": huge, "invalid_utf8": bad_utf8, "malformed_json": malformed}


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    disconnected: int = 0  # closed by the client mid-stream, on purpose
    status_5xx: int = 0
    stream_errors: int = 0  # an error event inside a 200 stream
    status_429: int = 0
    unexpected_status: dict[str, int] = field(default_factory=dict)
    stalled: int = 0  # no answer within REQUEST_TIMEOUT_S
    errors_in_restart: int = 0  # connection errors while the server was down (kill -9 + restart)
    errors_outside_restart: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    hostile: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> "status" -> count
    hostile_bad: list[str] = field(default_factory=list)  # descriptions of wrong answers to hostile bodies
    huge_latency_s: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)  # the first bodies of 5xx answers and error events

    def sample(self, text: str) -> None:
        if len(self.error_samples) < 20:
            self.error_samples.append(text[:500])

    def bump(self, table: dict, key: str) -> None:
        table[key] = table.get(key, 0) + 1


class Soak:
    def __init__(self, server: ServerProcess, redis_proc: RedisProcess, *, duration: float, clients: int,
                 disconnect_fraction: float, seed: int, log) -> None:
        self.server, self.redis = server, redis_proc
        self.duration, self.clients, self.disconnect_fraction = duration, clients, disconnect_fraction
        self.rng = random.Random(seed)
        self.log = log
        self.tally = Tally()
        self.systems = system_prompts()
        self.model = "default"
        self.bodies: dict[str, bytes] = {}
        self.t0 = 0.0
        self.deadline = 0.0
        self.windows: list[list[float]] = []  # [start, end] of server restarts (monotonic); end inf while down
        self.events: list[dict[str, Any]] = []
        self.golden: list[dict[str, Any]] = []
        self.tiny_temperature: list[dict[str, Any]] = []
        self.health_latencies: list[float] = []
        self.health_failures: list[str] = []  # outside restart windows
        self.health_max_t = 0.0
        self.rss: list[dict[str, Any]] = []  # samples: t, generation, kib
        self.rss_marks: dict[str, dict[str, Any]] = {}
        self.last_huge = -1e9
        self.golden_text: str | None = None
        self.client = None
        self.warmup2_at: float | None = None
        self.in_flight_end: int | None = None
        self.pool_end: dict[str, Any] | None = None
        self.integrity = "no endpoint exposes it: skipped"

    # -- helpers -------------------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, what: str, **info: Any) -> None:
        self.events.append({"t_s": round(self.now(), 2), "event": what, **info})
        self.log(f"[{self.now():6.1f}s] {what} {json.dumps(info) if info else ''}")

    def in_restart(self, t: float) -> bool:
        return any(start <= t <= end + RESTART_GRACE_S for start, end in self.windows)

    def connection_error(self, exc: Exception) -> None:
        if self.in_restart(time.monotonic()):
            self.tally.errors_in_restart += 1
        else:
            self.tally.bump(self.tally.errors_outside_restart, type(exc).__name__)

    def sample_rss(self, mark: str | None = None) -> None:
        pid = self.server.pid
        kib = None if pid is None else rss_kib(pid)
        if kib is None:
            return
        row = {"t_s": round(self.now(), 1), "generation": self.server.generation, "rss_kib": kib}
        self.rss.append(row)
        if mark:
            self.rss_marks[mark] = row

    # -- requests ------------------------------------------------------------------------------
    def chat_body(self) -> dict[str, Any]:
        n = self.rng.randrange(1, 400)
        question = self.rng.choice(QUESTIONS).format(n=n)
        return {"model": self.model, "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": self.rng.randint(8, 24), "temperature": self.rng.choice([0, 0, 0.7]),
                "messages": [{"role": "system", "content": self.rng.choice(self.systems)},
                             {"role": "user", "content": question}]}

    async def stream_chat(self, client, disconnect_after: int | None) -> None:
        import httpx

        t = self.tally
        t.sent += 1
        lines = 0
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                async with client.stream("POST", "/v1/chat/completions", json=self.chat_body()) as r:
                    if r.status_code != 200:
                        await r.aread()
                        self.status(r.status_code, r.text)
                        return
                    done = finished = False
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[6:]
                        if data == "[DONE]":
                            done = True
                            break
                        lines += 1
                        chunk = json.loads(data)
                        if "error" in chunk:
                            t.stream_errors += 1
                            t.sample(f"{self.now():.1f}s stream error event: {data}")
                            return
                        if any(c.get("finish_reason") for c in chunk.get("choices") or []):
                            finished = True
                        if chunk.get("usage"):
                            t.prompt_tokens += chunk["usage"]["prompt_tokens"]
                            details = chunk["usage"].get("prompt_tokens_details") or {}
                            t.cached_tokens += details.get("cached_tokens") or 0
                        if disconnect_after is not None and lines >= disconnect_after and not finished:
                            t.disconnected += 1
                            return  # leaving the block closes the connection mid-stream
                    if done and finished:
                        t.completed += 1
                    else:
                        self.connection_error(ConnectionError("stream ended without [DONE]"))
        except (TimeoutError, httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout):
            t.stalled += 1
        except (httpx.HTTPError, OSError) as exc:
            self.connection_error(exc)

    def status(self, code: int, text: str = "") -> None:
        if code >= 500:
            self.tally.status_5xx += 1
            self.tally.sample(f"{self.now():.1f}s status {code}: {text}")
        elif code == 429:
            self.tally.status_429 += 1
        else:
            self.tally.bump(self.tally.unexpected_status, str(code))

    async def greedy(self, client, temperature: float) -> tuple[int, str | None, str | None, float]:
        """(status, text, finish_reason, seconds) of the golden prompt at this temperature, not streamed."""
        body = {"model": self.model, "messages": GOLDEN_PROMPT, "max_tokens": GOLDEN_MAX_TOKENS,
                "temperature": temperature}
        start = time.monotonic()
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            r = await client.post("/v1/chat/completions", json=body)
        took = time.monotonic() - start
        if r.status_code != 200:
            if r.status_code >= 500:
                self.tally.status_5xx += 1
                self.tally.sample(f"{self.now():.1f}s status {r.status_code} (temperature {temperature}): {r.text}")
            return r.status_code, None, None, took
        choice = r.json()["choices"][0]
        return 200, choice["message"]["content"], choice["finish_reason"], took

    async def golden_check(self, client, when: str) -> None:
        import httpx

        row: dict[str, Any] = {"t_s": round(self.now(), 1), "when": when, "generation": self.server.generation}
        try:
            status, text, reason, took = await self.greedy(client, 0)
            row |= {"status": status, "text": text, "finish_reason": reason, "seconds": round(took, 3)}
        except (TimeoutError, httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout):
            row["error"] = "stalled"
            self.tally.stalled += 1
        except (httpx.HTTPError, OSError) as exc:
            row["error"] = type(exc).__name__
            if self.in_restart(time.monotonic()):
                row["identical"] = None  # the server is down on purpose: no verdict
                self.golden.append(row)
                return
            self.connection_error(exc)
        if self.golden_text is None and row.get("status") == 200:
            self.golden_text = row["text"]
        row["identical"] = row.get("status") == 200 and row.get("text") == self.golden_text
        self.golden.append(row)
        if not row["identical"]:
            self.event("golden differs", **{k: v for k, v in row.items() if k != "t_s"})

    async def hostile(self, client, kind: str) -> None:
        import httpx

        t = self.tally
        t.sent += 1
        if kind == "huge_prompt":
            self.last_huge = time.monotonic()
        try:
            if kind.startswith("temperature="):
                temp = float(kind.partition("=")[2])
                status, text, reason, took = await self.greedy(client, temp)
                key = kind
                t.bump(t.hostile.setdefault(key, {}), str(status))
                ok = status == 200 and reason in ("stop", "length") and text == self.golden_text
                self.tiny_temperature.append({"temperature": temp, "status": status, "finish_reason": reason,
                                              "greedy": text == self.golden_text, "seconds": round(took, 3)})
                if not ok:
                    t.hostile_bad.append(f"{key}: status {status}, finish {reason}, "
                                         f"{'greedy' if text == self.golden_text else 'NOT greedy'} text {text!r}")
                else:
                    t.completed += 1
                return
            start = time.monotonic()
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                r = await client.post("/v1/chat/completions", content=self.bodies[kind],
                                      headers={"content-type": "application/json"})
            took = time.monotonic() - start
            t.bump(t.hostile.setdefault(kind, {}), str(r.status_code))
            if r.status_code >= 500:
                t.status_5xx += 1
                t.sample(f"{self.now():.1f}s status {r.status_code} ({kind}): {r.text}")
            allowed = {"huge_prompt": (400, 413)}.get(kind, (400,))
            if kind == "huge_prompt":
                t.huge_latency_s.append(round(took, 3))
                if took > HUGE_REFUSAL_LIMIT_S:
                    t.hostile_bad.append(f"huge_prompt: refused after {took:.1f} s (limit {HUGE_REFUSAL_LIMIT_S} s)")
            if r.status_code not in allowed:
                t.hostile_bad.append(f"{kind}: status {r.status_code} (expected {allowed}): {r.text[:200]!r}")
        except (TimeoutError, httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout):
            t.stalled += 1
            t.hostile_bad.append(f"{kind}: no answer within {REQUEST_TIMEOUT_S:.0f} s")
        except (httpx.HTTPError, OSError) as exc:
            self.connection_error(exc)

    # -- tasks ---------------------------------------------------------------------------------
    async def worker(self, client, index: int) -> None:
        max_requests = int(self.duration * 10) + 10
        for _ in range(max_requests):
            if time.monotonic() >= self.deadline:
                return
            disconnect = self.rng.randint(1, 4) if self.rng.random() < self.disconnect_fraction else None
            errors_before = self.tally.errors_in_restart + sum(self.tally.errors_outside_restart.values())
            await self.stream_chat(client, disconnect)
            if self.tally.errors_in_restart + sum(self.tally.errors_outside_restart.values()) > errors_before:
                await asyncio.sleep(0.5)  # the server is away: do not spin

    async def hostile_loop(self, client, kinds: tuple[str, ...]) -> None:
        """Hostile bodies in rotation, one at a time, among the clients' load; the ~31 MB one at most every
        HUGE_MIN_INTERVAL_S."""
        for i in range(int(self.duration / HOSTILE_PAUSE_S) + 1):
            if time.monotonic() >= self.deadline:
                return
            kind = kinds[i % len(kinds)]
            if kind == "huge_prompt" and time.monotonic() - self.last_huge < HUGE_MIN_INTERVAL_S:
                continue
            await self.hostile(client, kind)
            await asyncio.sleep(HOSTILE_PAUSE_S)

    async def health_poller(self, stop: asyncio.Event) -> None:
        import httpx

        async with httpx.AsyncClient(base_url=self.server.url, timeout=10) as client:
            for _ in range(int(self.duration * 2) + 600):
                if stop.is_set():
                    return
                tick = time.monotonic()
                try:
                    r = await client.get("/health")
                    took = time.monotonic() - tick
                    if r.status_code != 200:
                        raise httpx.HTTPStatusError(f"status {r.status_code}", request=r.request, response=r)
                    if not self.in_restart(tick) and not self.in_restart(time.monotonic()):
                        self.health_latencies.append(took)
                        if took >= max(self.health_latencies[:-1], default=0.0):
                            self.health_max_t = self.now()
                except (httpx.HTTPError, OSError) as exc:
                    if not self.in_restart(tick) and not self.in_restart(time.monotonic()):
                        self.health_failures.append(f"{self.now():.1f}s {type(exc).__name__}: {exc}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, 1.0 - (time.monotonic() - tick)))

    async def golden_loop(self, client) -> None:
        every = max(15.0, self.duration / 10)
        for _ in range(int(self.duration / every) + 1):
            await asyncio.sleep(every)
            if time.monotonic() >= self.deadline:
                return
            await self.golden_check(client, "during")

    async def rss_loop(self, warmup_s: float) -> None:
        """Samples every 10 s; marks: warm-up of each server process, just before the kill, the end."""
        every = min(10.0, max(0.5, warmup_s / 4))
        for _ in range(int(self.duration / every) + 2):
            if time.monotonic() >= self.deadline:
                return
            self.sample_rss()
            if "warmup_1" not in self.rss_marks and self.now() >= warmup_s and self.server.generation == 1:
                self.sample_rss("warmup_1")
            if self.warmup2_at is not None and "warmup_2" not in self.rss_marks and self.now() >= self.warmup2_at:
                self.sample_rss("warmup_2")
            await asyncio.sleep(every)

    async def chaos(self, warmup_s: float) -> None:
        """Redis killed and restarted at 40% of the run; the server kill -9'd and restarted at 2/3."""
        await asyncio.sleep(max(0.0, self.t0 + 0.4 * self.duration - time.monotonic()))
        down = min(5.0, max(1.0, 0.05 * self.duration))
        self.event("redis kill", down_s=down)
        self.redis.kill()
        await asyncio.sleep(down)
        await asyncio.to_thread(self.redis.start)
        self.event("redis started again")
        await asyncio.sleep(max(0.0, self.t0 + 2 * self.duration / 3 - time.monotonic()))
        if "warmup_1" not in self.rss_marks:
            self.sample_rss("warmup_1")
        self.sample_rss("before_kill_1")
        window = [time.monotonic(), float("inf")]
        self.windows.append(window)
        self.event("server kill -9", pid=self.server.pid)
        self.server.kill9()
        took = await asyncio.to_thread(self.server.start, 300.0)
        window[1] = time.monotonic()
        self.event("server ready again", seconds=round(took, 1), pid=self.server.pid)
        self.sample_rss("ready_2")
        # the restarted process warms up as long as the first did, or a third of what is left on a short run
        self.warmup2_at = self.now() + min(warmup_s, max(0.0, self.deadline - time.monotonic()) / 3)
        await self.golden_check(self.client, "after restart")

    async def run(self, warmup_s: float) -> None:
        import httpx

        limits = httpx.Limits(max_connections=self.clients + 8, max_keepalive_connections=self.clients + 8)
        async with httpx.AsyncClient(base_url=self.server.url, timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=5),
                                     limits=limits) as client:
            self.client = client
            self.t0 = time.monotonic()
            await self.golden_check(client, "before")
            if self.golden_text is None:
                raise RuntimeError(f"the golden request failed before the run: {self.golden[-1]}")
            self.deadline = time.monotonic() + self.duration
            self.t0 = time.monotonic()
            self.event("load starts", clients=self.clients, duration_s=self.duration)
            stop = asyncio.Event()
            health = asyncio.create_task(self.health_poller(stop))
            side = [asyncio.create_task(self.golden_loop(client)), asyncio.create_task(self.rss_loop(warmup_s)),
                    asyncio.create_task(self.chaos(warmup_s)),
                    asyncio.create_task(self.hostile_loop(client, TINY_TEMPERATURE_KINDS)),
                    asyncio.create_task(self.hostile_loop(client, REFUSED_KINDS))]
            workers = [asyncio.create_task(self.worker(client, i)) for i in range(self.clients)]
            try:
                await asyncio.wait(workers, timeout=self.duration + REQUEST_TIMEOUT_S + 30)
                self.event("load stops", still_running=sum(not w.done() for w in workers))
                # chaos may still be restarting the server on a short run: let it finish (bounded)
                await asyncio.wait(side, timeout=360)
                await self.golden_check(client, "after")
                await self.drain(client)
                self.sample_rss("end")
            finally:
                for task in [*workers, *side]:
                    task.cancel()
                stop.set()
                await asyncio.gather(health, *workers, *side, return_exceptions=True)

    async def drain(self, client) -> None:
        import httpx

        health: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                health = (await client.get("/health", timeout=5)).json()
                self.in_flight_end = health.get("requests_in_flight")
                if self.in_flight_end == 0:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            await asyncio.sleep(0.5)
        self.event("drained", requests_in_flight=self.in_flight_end)
        with contextlib.suppress(httpx.HTTPError, ValueError):
            stats = (await client.get("/v1/cache/stats", timeout=10)).json()
            self.pool_end = stats.get("pool")
            for key in ("integrity", "pool_integrity", "pool_ok"):
                for doc in (stats, health, stats.get("pool") or {}):
                    if key in doc:
                        self.integrity = f"{key}: {doc[key]}"


# -- report --------------------------------------------------------------------------------------
def evaluate(soak: Soak) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    t = soak.tally
    rss = soak.rss_marks

    def growth(a: str, b: str) -> float | None:
        return (rss[b]["rss_kib"] - rss[a]["rss_kib"]) / rss[a]["rss_kib"] if a in rss and b in rss else None

    pool = soak.pool_end or {}
    figures = {
        "requests_sent": t.sent, "completed": t.completed, "disconnected_by_client": t.disconnected,
        "status_5xx": t.status_5xx, "stream_error_events": t.stream_errors, "status_429": t.status_429,
        "unexpected_status": t.unexpected_status, "stalled": t.stalled,
        "connection_errors_during_restart": t.errors_in_restart,
        "connection_errors_outside_restart": t.errors_outside_restart,
        "hostile_by_status": t.hostile, "huge_prompt_refusal_s": t.huge_latency_s,
        "tiny_temperature_requests": len(soak.tiny_temperature),
        "hit_rate": t.cached_tokens / t.prompt_tokens if t.prompt_tokens else None,
        "health_polls": len(soak.health_latencies), "health_max_latency_s": max(soak.health_latencies, default=None),
        "health_max_at_s": round(soak.health_max_t, 1), "health_failures": soak.health_failures[:20],
        "golden_requests": sum(g["identical"] is not None for g in soak.golden),
        "golden_identical": all(g["identical"] is not False for g in soak.golden),
        "golden_text": soak.golden_text,
        "rss_kib": {k: v["rss_kib"] for k, v in rss.items()},
        "rss_growth_process_1": growth("warmup_1", "before_kill_1"),
        "rss_growth_process_2": growth("warmup_2", "end"),
        "error_samples": t.error_samples,
        "requests_in_flight_end": soak.in_flight_end, "pool_end": pool, "pool_integrity": soak.integrity,
    }
    checks: dict[str, dict[str, Any]] = {}

    def check(name: str, ok: bool | None, value: Any, limit: str) -> None:
        checks[name] = {"ok": ok, "value": value, "limit": limit}

    check("no 5xx", t.status_5xx + t.stream_errors == 0, t.status_5xx + t.stream_errors, "0")
    check("no stalled request", t.stalled == 0, t.stalled, f"0 without an answer in {REQUEST_TIMEOUT_S:.0f} s")
    check("no connection error outside the restart", not t.errors_outside_restart, t.errors_outside_restart, "none")
    check("no unexpected status", not t.unexpected_status, t.unexpected_status, "only 200 (429 is reported)")
    lat = figures["health_max_latency_s"]
    check("/health latency", lat is not None and lat < HEALTH_LIMIT_S and not soak.health_failures,
          None if lat is None else round(lat, 3), f"< {HEALTH_LIMIT_S} s, no failed poll outside the restart")
    check("golden greedy text identical", figures["golden_identical"] and figures["golden_requests"] >= 3,
          f"{sum(g['identical'] is True for g in soak.golden)}/{figures['golden_requests']}",
          "all (at least before, during and after)")
    check("hostile bodies answered as expected", not t.hostile_bad, t.hostile_bad[:10],
          "tiny temperatures: 200 + greedy; 31 MB: 413/400 quickly; bad UTF-8, bad JSON: 400")
    check("requests in flight drain to 0", soak.in_flight_end == 0, soak.in_flight_end, "0 within 60 s")
    protected = pool.get("protected_blocks") or 0
    if isinstance(protected, dict):  # per TTL class
        protected = sum(v for v in protected.values() if isinstance(v, int))
    leaked = None if not pool else pool.get("used", 0) - protected
    sums = None if not pool else pool.get("used", 0) + pool.get("cached", 0) + pool.get("free", 0)
    check("no leaked pool block", leaked == 0 and sums == pool.get("num_blocks"),
          None if not pool else {"used": pool.get("used"), "protected": protected},
          "used == protected at idle, used + cached + free == total")
    for n in (1, 2):
        g = figures[f"rss_growth_process_{n}"]
        check(f"RSS growth, server process {n}", None if g is None else abs(g) <= RSS_TOLERANCE,
              None if g is None else f"{g:+.1%}", f"within ±{RSS_TOLERANCE:.0%} of the warm-up sample")
    restarted = any(e["event"] == "server ready again" for e in soak.events)
    check("server restarted after kill -9", restarted, restarted, "yes")
    return figures, checks


def to_markdown(res: dict[str, Any]) -> str:
    s, f, checks = res["setup"], res["figures"], res["checks"]

    def kib(key: str) -> str:
        v = f["rss_kib"].get(key)
        return "—" if v is None else f"{v / 1024:,.0f} MiB"

    hostile = "; ".join(f"{k}: " + ", ".join(f"{n}×{st}" for st, n in sorted(v.items()))
                        for k, v in sorted(f["hostile_by_status"].items())) or "—"
    lat = f["health_max_latency_s"]
    rows = [
        ("requests sent", f"{f['requests_sent']:,}"), ("completed", f"{f['completed']:,}"),
        ("disconnected by the client mid-stream", f"{f['disconnected_by_client']:,}"),
        ("hostile bodies (status × count)", hostile),
        ("31 MB prompt refused in", ", ".join(f"{x:.2f} s" for x in f["huge_prompt_refusal_s"]) or "—"),
        ("5xx (and error events in streams)", f"{f['status_5xx']} ({f['stream_error_events']})"),
        ("stalled (no answer in 120 s)", f["stalled"]), ("429 (queue full)", f["status_429"]),
        ("other unexpected statuses", f["unexpected_status"] or "none"),
        ("connection errors during the server restart", f["connection_errors_during_restart"]),
        ("connection errors outside it", f["connection_errors_outside_restart"] or "none"),
        ("max /health latency (1 s polls)",
         "—" if lat is None else f"{lat * 1000:,.0f} ms at {f['health_max_at_s']} s"),
        ("failed /health polls outside the restart", len(f["health_failures"])),
        ("golden greedy text identical",
         f"{'yes' if f['golden_identical'] else 'NO'} ({f['golden_requests']} requests)"),
        ("prompt cache hit rate (completed streams)", "—" if f["hit_rate"] is None else f"{f['hit_rate']:.1%}"),
        ("RSS process 1: warm-up → before kill -9", f"{kib('warmup_1')} → {kib('before_kill_1')}"),
        ("RSS process 2: warm-up → end", f"{kib('warmup_2')} → {kib('end')}"),
        ("requests in flight at the end", f["requests_in_flight_end"]),
        ("pool at the end", f["pool_end"] or "—"), ("pool integrity", f["pool_integrity"]),
    ]
    lines = [
        "# Soak: sustained hostile load, a Redis restart and a kill -9",
        "",
        f"`promptstash bench soak` on {s['date']}: {s['model']}, {s['duration_s']:.0f} s, {s['clients']} streaming "
        f"clients, {s['disconnect_fraction']:.0%} closed mid-stream, {s['machine']}. Redis killed at 40% of the "
        "run and restarted on the same port; the server killed with SIGKILL at 2/3 and restarted on the same "
        "cache directory.",
        "",
        "| figure | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "| check | result | value | limit |",
        "|---|---|---|---|",
        *[f"| {name} | {'pass' if c['ok'] else ('skipped' if c['ok'] is None else '**FAIL**')} | {c['value']} | "
          f"{c['limit']} |" for name, c in checks.items()],
        "",
        f"Overall: **{'PASS' if res['passed'] else 'FAIL'}**.",
        "",
    ]
    if f["error_samples"]:
        lines += ["First server errors seen by the clients:", "", *[f"- `{e}`" for e in f["error_samples"]], ""]
    return "\n".join(lines)


def write(res: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "soak.json", out_dir / "soak.md"
    js.write_text(json.dumps(res, indent=2, default=str) + "\n")
    md.write_text(to_markdown(res))
    return js, md


def run(duration: float = 600.0, clients: int = 48, disconnect_fraction: float = 0.2, model: str | None = None,
        tiny: bool = False, seed: int = 0, dtype: str = "float32", log=print) -> dict[str, Any]:
    """Run the soak; returns {"setup", "figures", "checks", "passed", "events", "golden", "rss"}.

    dtype: the server's. float32 by default: only float32 keeps greedy output independent of how requests
    are batched together, which the golden check relies on (in bfloat16 a near-tie can flip)."""
    if duration <= 0 or clients <= 0 or not 0 <= disconnect_fraction <= 1:
        raise ValueError("need duration > 0, clients > 0 and 0 <= disconnect fraction <= 1")
    work = Path(tempfile.mkdtemp(prefix="promptstash-soak-"))
    redis_proc = RedisProcess(work / "redis")
    server: ServerProcess | None = None
    try:
        extra: list[str] = ["--dtype", dtype]
        if tiny:
            log("building a tiny random-weight model with the default tokenizer ...")
            model = str(make_tiny_model(work / "tiny-model"))
        redis_proc.start()
        server = ServerProcess(work, redis_proc.url, model, extra)
        log(f"starting the server on {server.url} (Redis {redis_proc.url}, cache {work / 'kv'}) ...")
        took = server.start(timeout_s=900.0)  # the first use of the default model converts it (about a minute)
        log(f"server ready in {took:.1f} s (pid {server.pid})")
        soak = Soak(server, redis_proc, duration=duration, clients=clients, disconnect_fraction=disconnect_fraction,
                    seed=seed, log=log)
        soak.bodies = hostile_bodies(soak.model)
        warmup_s = min(60.0, duration / 4)
        asyncio.run(soak.run(warmup_s))
        figures, checks = evaluate(soak)
        passed = all(c["ok"] is not False for c in checks.values())
        setup = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": model or "default (Qwen2.5-Coder-0.5B-Instruct)",
                 "tiny": tiny, "dtype": dtype, "duration_s": duration, "clients": clients,
                 "disconnect_fraction": disconnect_fraction, "seed": seed, "warmup_s": warmup_s,
                 "machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}"}
        text = server.log_path.read_text(errors="replace") if server.log_path.exists() else ""
        log_tail = "\n".join(line for line in text.splitlines() if "%|" not in line)[-8000:]  # no progress bars
        return {"setup": setup, "figures": figures, "checks": checks, "passed": passed, "events": soak.events,
                "golden": soak.golden, "tiny_temperature": soak.tiny_temperature, "rss": soak.rss,
                "server_log_tail": log_tail}
    finally:
        if server is not None:
            code = server.stop()
            if code not in (None, 0, -signal.SIGTERM):
                log(f"note: the server exited with {code}; its log: {server.log_path}")
        redis_proc.kill()
        if os.environ.get("PROMPTSTASH_SOAK_KEEP"):
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
