"""`promptstash bench tenants`: is there a cross-tenant timing channel (CVE-2025-46570)?

The attack on a shared prefix cache: tenant B guesses a document tenant A sent, sends it, and reads the
answer's time to first token. A hit (fast) tells B that A sent that document. promptstash puts the tenant
namespace into every block hash, so B's request can never hit A's blocks; this benchmark measures that
over real HTTP with two API keys, on the default model:

    A: send doc_i (cold)     A: send doc_i again (hit: the signal a shared cache would give)
    B: send doc_i (probe)    B: send a fresh doc of the same length (B's cold baseline)

probe / B-cold near 1.0 means no signal; A-hit / A-cold shows the size of the signal within one tenant.
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

WORDS = ("invoice", "shipment", "contract", "clause", "payment", "delivery", "warranty", "supplier", "audit",
         "penalty", "schedule", "quantity", "region", "account", "renewal", "notice", "liability", "term")


def _document(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(num_words))


def _serve(engine: Any, api_keys: dict[str, str]) -> tuple[Any, str]:
    import uvicorn

    from promptstash.config import ServerConfig
    from promptstash.server.app import create_app

    app = create_app(engine, ServerConfig(api_keys=api_keys))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the benchmark server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


def run(model: str | None = None, trials: int = 5, doc_words: int = 700, seed: int = 0) -> dict[str, Any]:
    import httpx

    from promptstash.engine.engine import Engine

    engine = Engine.from_pretrained(model, progress=False)
    server, url = _serve(engine, {"key-a": "alice", "key-b": "bob"})
    rng = random.Random(seed)
    rows = []
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            model_name = client.get("/v1/models", headers={"authorization": "Bearer key-a"}).json()["data"][0]["id"]

            def ask(key: str, doc: str) -> dict[str, Any]:
                body = {"model": model_name, "max_tokens": 1, "temperature": 0,
                        "messages": [{"role": "system", "content": doc}, {"role": "user", "content": "Summarise."}]}
                start = time.perf_counter()
                r = client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})
                elapsed = time.perf_counter() - start
                r.raise_for_status()
                usage = r.json()["usage"]
                return {"s": elapsed, "prompt_tokens": usage["prompt_tokens"],
                        "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]}

            ask("key-a", _document(rng, 50))  # warm-up
            for i in range(trials):
                doc, fresh = _document(rng, doc_words), _document(rng, doc_words)
                row = {"a_cold": ask("key-a", doc), "a_hit": ask("key-a", doc)}
                if i % 2:  # alternate the order of B's two requests
                    row["b_cold"], row["b_probe"] = ask("key-b", fresh), ask("key-b", doc)
                else:
                    row["b_probe"], row["b_cold"] = ask("key-b", doc), ask("key-b", fresh)
                rows.append(row)
                print(json.dumps({k: round(v["s"], 3) for k, v in row.items()}))
    finally:
        server.should_exit = True
        engine.close()

    def med(key: str) -> float:
        return statistics.median(r[key]["s"] for r in rows)

    return {
        "model": engine.model_id, "trials": trials, "date": time.strftime("%Y-%m-%d"), "rows": rows,
        "prompt_tokens": rows[0]["a_cold"]["prompt_tokens"],
        "median_s": {k: med(k) for k in ("a_cold", "a_hit", "b_probe", "b_cold")},
        "probe_over_b_cold": med("b_probe") / med("b_cold"),
        "a_hit_over_a_cold": med("a_hit") / med("a_cold"),
        "probe_cached_tokens": [r["b_probe"]["cached_tokens"] for r in rows],
    }


def to_markdown(res: dict[str, Any]) -> str:
    m = res["median_s"]
    lines = [
        "# Cross-tenant timing channel (CVE-2025-46570)",
        "",
        f"`promptstash bench tenants` on {res['date']}: {res['model']}, two API keys (tenants alice and bob), "
        f"real HTTP, {res['trials']} documents of {res['prompt_tokens']:,} prompt tokens, max_tokens=1, "
        "time of the whole response (= time to first token).",
        "",
        "| request | median time | cached tokens |",
        "|---|---:|---:|",
        f"| alice sends a document (cold) | {m['a_cold']:.3f} s | 0 |",
        f"| alice sends it again (hit) | {m['a_hit']:.3f} s | "
        f"{statistics.median(r['a_hit']['cached_tokens'] for r in res['rows']):,.0f} |",
        f"| bob sends alice's document (the probe) | {m['b_probe']:.3f} s | "
        f"{max(res['probe_cached_tokens'])} |",
        f"| bob sends a fresh document of the same length | {m['b_cold']:.3f} s | 0 |",
        "",
        f"probe / bob's cold = **{res['probe_over_b_cold']:.2f}** (1.0 = no signal); within one tenant a hit "
        f"takes {res['a_hit_over_a_cold']:.2f}× a cold request — the signal a shared cache would leak.",
        "",
    ]
    return "\n".join(lines)


def write(res: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "tenants.json", out_dir / "tenants.md"
    js.write_text(json.dumps(res, indent=2) + "\n")
    md.write_text(to_markdown(res))
    return js, md
