"""`promptstash bench agent`: tool-calling agents against a live server, caching on vs off in one run.

The workload agents send, and the one where prompt caching pays most: N agents (default 4) run at once, each with
the same long tool list (16 tools with realistic JSON-schema parameters, about 2,700 tokens once rendered by the
chat template) and its own task. Each agent takes several steps (default 4); a step sends the whole history and
the tools to POST /v1/chat/completions with `tool_choice: "required"` (one call, greedy), then appends the call
and a fake tool result (deterministic, ~100 tokens) to the history. So every request resends a prefix that the
server has seen: the tool definitions (shared by all agents) and the agent's own history so far.

Both modes serve the same weights from an in-process server (real HTTP on a loopback port): caching ON (one
engine, cold at the start of its pass) and OFF (a second engine on the same weights with
`enable_prefix_caching=False`). Per request: prompt and cached tokens (the API's usage), the engine's time to
first token (GET /v1/cache/requests) and the client's end-to-end latency. Greedy decoding and exact reuse make
both passes take the same calls, which the report checks.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from promptstash.engine.engine import Engine

SYSTEM = ("You are an operations agent for ACME Corp. You work step by step: at every step you call exactly one "
          "tool, read its result, and decide the next call. Prefer read-only tools before changing anything. "
          "Use ISO 8601 dates and times, and the customer's currency.")


def _tool(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required, "additionalProperties": False}}}


def _s(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **extra}


def _i(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "integer", "description": description, **extra}


TOOLS: list[dict[str, Any]] = [
    _tool("search_orders", "Search customer orders by customer, status and date range; newest first.", {
        "customer_id": _s("the customer's id, e.g. CUS-10442"),
        "status": _s("order status", enum=["pending", "paid", "shipped", "delivered", "cancelled", "refunded"]),
        "from_date": _s("earliest order date, YYYY-MM-DD"), "to_date": _s("latest order date, YYYY-MM-DD"),
        "limit": _i("how many orders to return", minimum=1, maximum=50)}, ["customer_id"]),
    _tool("get_order", "Get one order with its lines, payments, shipments and notes.", {
        "order_id": _s("the order id, e.g. ORD-2024-88312"),
        "include_history": {"type": "boolean", "description": "also return every status change"}}, ["order_id"]),
    _tool("lookup_customer", "Find a customer by email, phone or id and return the profile and account flags.", {
        "query": _s("an email address, a phone number in E.164 format, or a customer id"),
        "fields": {"type": "array", "items": {"type": "string", "enum": ["profile", "addresses", "payment_methods",
                                                                          "loyalty", "flags"]},
                   "description": "which parts of the record to return"}}, ["query"]),
    _tool("issue_refund", "Refund all or part of a paid order to its original payment method.", {
        "order_id": _s("the order to refund"), "amount": {"type": "number", "description": "amount, > 0",
                                                          "exclusiveMinimum": 0},
        "currency": _s("ISO 4217 code", enum=["USD", "EUR", "GBP", "JPY", "CAD"]),
        "reason": _s("why", enum=["damaged", "late", "wrong_item", "not_received", "goodwill", "other"]),
        "note": _s("a note for the customer")}, ["order_id", "amount", "currency", "reason"]),
    _tool("create_shipment", "Create a shipment for order lines and book a carrier pickup.", {
        "order_id": _s("the order"), "carrier": _s("carrier", enum=["ups", "fedex", "dhl", "usps"]),
        "service": _s("service level", enum=["ground", "express", "overnight"]),
        "line_ids": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                     "description": "the order lines to ship"},
        "pickup_date": _s("pickup date, YYYY-MM-DD")}, ["order_id", "carrier", "service", "line_ids"]),
    _tool("check_inventory", "Stock on hand, reserved and incoming for a product in each warehouse.", {
        "sku": _s("product SKU, e.g. TSHIRT-BLK-M"),
        "warehouse": _s("a warehouse code", enum=["SEA1", "DAL2", "NYC3", "AMS1"]),
        "include_incoming": {"type": "boolean", "description": "add purchase orders not yet received"}}, ["sku"]),
    _tool("create_ticket", "Open a support ticket for a customer and assign it to a queue.", {
        "customer_id": _s("the customer"), "subject": _s("one-line summary"), "body": _s("the full description"),
        "priority": _s("priority", enum=["low", "normal", "high", "urgent"]),
        "queue": _s("team queue", enum=["billing", "shipping", "returns", "technical", "vip"]),
        "tags": {"type": "array", "items": {"type": "string"}, "description": "free-form tags"}},
        ["customer_id", "subject", "priority", "queue"]),
    _tool("update_ticket", "Change a ticket's status, assignee or priority, or add an internal note.", {
        "ticket_id": _s("e.g. TCK-55121"), "status": _s("new status", enum=["open", "pending", "solved", "closed"]),
        "assignee": _s("an agent's email"), "priority": _s("priority", enum=["low", "normal", "high", "urgent"]),
        "internal_note": _s("a note only staff can see")}, ["ticket_id"]),
    _tool("send_email", "Send an email to a customer from the support address, optionally from a template.", {
        "to": _s("recipient email address"), "subject": _s("subject line"), "body": _s("plain-text body"),
        "template_id": _s("a template to render instead of body"),
        "cc": {"type": "array", "items": {"type": "string"}, "maxItems": 5, "description": "copies"}},
        ["to", "subject"]),
    _tool("schedule_callback", "Book a phone callback with a support agent.", {
        "customer_id": _s("the customer"), "phone": _s("E.164 phone number"),
        "start_time": _s("ISO 8601 date-time with offset"),
        "duration_minutes": _i("length", minimum=10, maximum=60),
        "topic": _s("what the call is about")}, ["customer_id", "phone", "start_time"]),
    _tool("apply_coupon", "Apply a coupon or store credit to an open order and return the new total.", {
        "order_id": _s("the order"), "code": _s("coupon code, upper case"),
        "store_credit": {"type": "number", "minimum": 0, "description": "store credit to use, in order currency"}},
        ["order_id"]),
    _tool("get_invoice", "Fetch an invoice as structured data, or a link to its PDF.", {
        "invoice_id": _s("e.g. INV-2024-004411"), "format": _s("output", enum=["json", "pdf_link"])},
        ["invoice_id"]),
    _tool("list_returns", "List return requests (RMAs) filtered by customer, order or state.", {
        "customer_id": _s("the customer"), "order_id": _s("the order"),
        "state": _s("RMA state", enum=["requested", "approved", "received", "inspected", "refunded", "rejected"]),
        "limit": _i("maximum results", minimum=1, maximum=100)}, []),
    _tool("approve_return", "Approve a return request and email the customer a prepaid label.", {
        "rma_id": _s("e.g. RMA-77120"), "label_carrier": _s("carrier for the label", enum=["ups", "fedex", "usps"]),
        "restocking_fee_percent": _i("fee withheld from the refund", minimum=0, maximum=25)},
        ["rma_id", "label_carrier"]),
    _tool("search_knowledge_base", "Full-text search of internal help articles and policies.", {
        "query": _s("what to look for"),
        "section": _s("restrict to a section", enum=["policies", "shipping", "billing", "products", "howto"]),
        "top_k": _i("results", minimum=1, maximum=10)}, ["query"]),
    _tool("log_incident", "Record an operational incident (carrier outage, payment failure) for the on-call.", {
        "title": _s("short title"), "severity": _s("severity", enum=["sev1", "sev2", "sev3", "sev4"]),
        "system": _s("affected system", enum=["payments", "shipping", "inventory", "website", "email"]),
        "details": _s("what happened, with times"),
        "customer_impact": {"type": "boolean", "description": "are customers affected"}},
        ["title", "severity", "system"]),
]

TASKS = [
    "Customer CUS-10442 (jane.doe@example.com) says order ORD-2024-88312 arrived damaged. Look it up, check the "
    "shipment, and refund the damaged mug (24.50 USD).",
    "The SEA1 warehouse reports that TSHIRT-BLK-M is out of stock. Check inventory across warehouses, find open "
    "orders waiting for it and tell the affected customers.",
    "Customer +14155550123 wants a callback tomorrow morning about invoice INV-2024-004411, which they think "
    "charged them twice. Investigate and book the call.",
    "Return RMA-77120 for order ORD-2024-90017 was requested 3 days ago. Check the order and the return policy, "
    "approve it with a UPS label and update ticket TCK-55121.",
    "UPS pickups failed in DAL2 this morning. Log an incident, find today's affected shipments and reschedule "
    "them with FedEx.",
    "A VIP customer, CUS-20001, asks for a 15% goodwill discount on open order ORD-2024-91220 in EUR. Check their "
    "loyalty status and apply store credit.",
]


def fake_result(name: str, arguments: str, agent: int, step: int) -> str:
    """A deterministic tool result of ~100 tokens: what a real backend might answer."""
    try:
        args = json.loads(arguments)
    except json.JSONDecodeError:
        args = {}
    key = next((str(v) for v in args.values() if isinstance(v, str)), "n/a")
    return json.dumps({
        "ok": True, "tool": name, "request": args, "agent": agent, "step": step,
        "result": {"id": f"{name[:3].upper()}-{1000 + 37 * agent + step}", "matched": key,
                   "status": ["pending", "shipped", "delivered", "open"][(agent + step) % 4],
                   "updated_at": f"2024-06-{10 + step:02d}T09:{15 + agent:02d}:00Z",
                   "note": f"checked by the system at step {step}"},
    })


@dataclass(frozen=True)
class StepRecord:
    mode: str  # "on" | "off"
    agent: int
    step: int  # 1-based
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float  # the engine's, from arrival to the first token (queueing included)
    e2e_s: float  # the client's, request sent to response read
    tool: str | None  # the called tool (None: the model answered without a call)
    arguments: str | None


@contextmanager
def serve(engine: Engine) -> Iterator[str]:
    """An in-process server for `engine` on a free loopback port; yields its base URL."""
    import uvicorn

    from promptstash.config import ServerConfig
    from promptstash.server.app import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(engine, ServerConfig(max_queued_requests=1024)),
                                           host="127.0.0.1", port=0, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="bench-agent-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the benchmark server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def run_agent(url: str, model: str, mode: str, agent: int, steps: int, max_tokens: int) -> list[StepRecord]:
    """One agent's loop: each step resends the whole history with the tools, forcing one call."""
    import httpx

    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM},
                                      {"role": "user", "content": TASKS[agent % len(TASKS)]}]
    records = []
    with httpx.Client(base_url=url, timeout=1800) as client:
        for step in range(1, steps + 1):
            body = {"model": model, "messages": messages, "tools": TOOLS, "tool_choice": "required",
                    "parallel_tool_calls": False, "max_tokens": max_tokens, "temperature": 0}
            start = time.perf_counter()
            response = client.post("/v1/chat/completions", json=body)
            e2e = time.perf_counter() - start
            if response.status_code != 200:
                raise RuntimeError(f"agent {agent} step {step}: {response.status_code} {response.text[:500]}")
            data = response.json()
            rid = response.headers["x-request-id"]
            recent = client.get("/v1/cache/requests", params={"limit": 500}).json()["data"]
            ttft = next(r["ttft_s"] for r in recent if r["request_id"] == rid)
            message = data["choices"][0]["message"]
            calls = message.get("tool_calls") or []
            usage = data["usage"]
            call = calls[0]["function"] if calls else None
            records.append(StepRecord(mode, agent, step, usage["prompt_tokens"],
                                      usage["prompt_tokens_details"]["cached_tokens"], usage["completion_tokens"],
                                      ttft, e2e, call and call["name"], call and call["arguments"]))
            if calls and data["choices"][0]["finish_reason"] == "tool_calls":
                messages.append({"role": "assistant", "content": None, "tool_calls": calls[:1]})
                messages.append({"role": "tool", "tool_call_id": calls[0]["id"],
                                 "content": fake_result(call["name"], call["arguments"], agent, step)})
            else:  # no complete call (cut by max_tokens): the agent says "go on" and tries again
                messages.append({"role": "assistant", "content": message.get("content") or ""})
                messages.append({"role": "user", "content": "Call one of the tools."})
    return records


def run_mode(engine: Engine, mode: str, agents: int, steps: int, max_tokens: int,
             log: Callable[[str], None]) -> tuple[list[StepRecord], float]:
    """Every agent at once against a server for `engine`; the records and the wall time of the pass."""
    with serve(engine) as url:
        import httpx

        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        # warm-up (torch's first calls), on a prompt that shares nothing with the agents'
        httpx.post(url + "/v1/chat/completions", timeout=600, json={
            "model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2})
        results: dict[int, list[StepRecord]] = {}
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                results[i] = run_agent(url, model, mode, i, steps, max_tokens)
            except BaseException as exc:  # reported below, on the main thread
                errors.append(exc)

        start = time.perf_counter()
        threads = [threading.Thread(target=work, args=(i,), name=f"agent-{i}") for i in range(agents)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        if errors:
            raise errors[0]
    records = [r for i in range(agents) for r in results[i]]
    log(f"caching {mode}: {len(records)} requests in {wall:.1f} s, "
        f"{sum(r.cached_tokens for r in records):,} of {sum(r.prompt_tokens for r in records):,} prompt tokens cached")
    return records, wall


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def summarize(records: list[StepRecord], steps: int) -> dict[str, Any]:
    per_step = []
    for step in range(1, steps + 1):
        rs = [r for r in records if r.step == step]
        per_step.append({"step": step, "prompt_tokens": _mean([r.prompt_tokens for r in rs]),
                         "cached_tokens": _mean([r.cached_tokens for r in rs]),
                         "ttft_s": _mean([r.ttft_s for r in rs]), "e2e_s": _mean([r.e2e_s for r in rs])})
    prompt = sum(r.prompt_tokens for r in records)
    cached = sum(r.cached_tokens for r in records)
    return {"per_step": per_step, "prompt_tokens": prompt, "cached_tokens": cached,
            "hit_rate": cached / prompt if prompt else 0.0,
            "ttft_p50_s": statistics.median([r.ttft_s for r in records]),
            "ttft_mean_s": _mean([r.ttft_s for r in records]),
            "calls": sum(r.tool is not None for r in records)}


def tools_tokens(engine: Engine) -> int:
    """Tokens the tool definitions add to a prompt (rendered by the model's chat template)."""
    from promptstash.tools import ToolDef

    defs = [ToolDef(t["function"]["name"], t["function"]["description"], t["function"]["parameters"])
            for t in TOOLS]
    messages = [{"role": "user", "content": "x"}]
    return len(engine.render(messages, tools=defs).token_ids) - len(engine.render(messages).token_ids)


def run(agents: int = 4, steps: int = 4, max_tokens: int = 64, model: str | None = None, dtype: str = "float32",
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Caching on, then off, on the same weights; returns the report's data."""
    started = time.perf_counter()
    on = Engine.from_pretrained(model, dtype=dtype, progress=False)
    config = dataclasses.replace(on.config, enable_prefix_caching=False, kv_disk_dir=None, redis_url=None)
    off = Engine(on.model, on.tokenizer, config, on.model_id)
    log(f"bench agent: {agents} agents x {steps} steps, {len(TOOLS)} tools ({tools_tokens(on):,} tokens), "
        f"max_tokens {max_tokens}, {dtype}")
    records_on, wall_on = run_mode(on, "on", agents, steps, max_tokens, log)
    records_off, wall_off = run_mode(off, "off", agents, steps, max_tokens, log)
    key = lambda r: (r.agent, r.step)  # noqa: E731
    calls_on = {key(r): (r.tool, r.arguments) for r in records_on}
    same = sum(calls_on[key(r)] == (r.tool, r.arguments) for r in records_off)
    on_sum, off_sum = summarize(records_on, steps), summarize(records_off, steps)
    return {
        "setup": {"agents": agents, "steps": steps, "max_tokens": max_tokens, "num_tools": len(TOOLS),
                  "tools_tokens": tools_tokens(on), "model": on.model_id, "dtype": dtype,
                  "block_size": on.config.block_size, "machine": f"{platform.machine()}, "
                  f"{__import__('os').cpu_count()} CPUs", "python": platform.python_version()},
        "on": {**on_sum, "wall_s": wall_on}, "off": {**off_sum, "wall_s": wall_off},
        "speedup_wall": wall_off / wall_on if wall_on else None,
        "speedup_ttft_mean": off_sum["ttft_mean_s"] / on_sum["ttft_mean_s"] if on_sum["ttft_mean_s"] else None,
        "identical_calls": same, "num_requests": len(records_on),
        "records": [dataclasses.asdict(r) for r in records_on + records_off],
        "elapsed_s": time.perf_counter() - started,
    }


def to_markdown(res: dict[str, Any]) -> str:
    s, on, off = res["setup"], res["on"], res["off"]
    lines = [
        "# Agent workload: tool calling, caching on vs off", "",
        f"{s['agents']} agents run at once, each with the same {s['num_tools']} tools ({s['tools_tokens']:,} tokens "
        f"of definitions once rendered) and its own task, for {s['steps']} steps: every step sends the whole history "
        "and the tools to `POST /v1/chat/completions` with `tool_choice: \"required\"` (greedy, one call, "
        f"max_tokens {s['max_tokens']}) and appends the call and a fake tool result. Model {s['model']}, "
        f"{s['dtype']}, {s['machine']}; in-process server over loopback HTTP; caching off = the same weights with "
        "prefix caching disabled. Command: `promptstash bench agent --out benchmarks/results`.", "",
        "| step | prompt tokens | cached (on) | TTFT on | TTFT off | TTFT off / on | latency on | latency off |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a, b in zip(on["per_step"], off["per_step"], strict=True):
        ratio = b["ttft_s"] / a["ttft_s"] if a["ttft_s"] else float("nan")
        lines.append(f"| {a['step']} | {a['prompt_tokens']:,.0f} | {a['cached_tokens']:,.0f} | {a['ttft_s']:.2f} s | "
                     f"{b['ttft_s']:.2f} s | {ratio:.1f}× | {a['e2e_s']:.2f} s | {b['e2e_s']:.2f} s |")
    lines += [
        "", "Means over the agents of each step.", "",
        "| | caching on | caching off |", "|---|---:|---:|",
        f"| total time (all agents, all steps) | {on['wall_s']:.1f} s | {off['wall_s']:.1f} s |",
        f"| TTFT p50 | {on['ttft_p50_s']:.2f} s | {off['ttft_p50_s']:.2f} s |",
        f"| TTFT mean | {on['ttft_mean_s']:.2f} s | {off['ttft_mean_s']:.2f} s |",
        f"| prompt tokens | {on['prompt_tokens']:,} | {off['prompt_tokens']:,} |",
        f"| cached tokens | {on['cached_tokens']:,} ({on['hit_rate']:.0%}) | {off['cached_tokens']:,} |",
        f"| requests that made a tool call | {on['calls']} / {res['num_requests']} | "
        f"{off['calls']} / {res['num_requests']} |",
        "",
        f"**Speedup with caching: {res['speedup_wall']:.2f}× total time, {res['speedup_ttft_mean']:.2f}× mean TTFT.** "
        f"Identical calls (tool and arguments) in both passes: {res['identical_calls']} / {res['num_requests']}.",
        "",
        "The first step of the first agents computes the tool definitions; every later request reuses them (all "
        "agents share them) and its own history up to the last full block, so only the new tool result and the "
        "template's tail are computed. TTFT includes the time a request waits for the others (the agents run at "
        "once on the same CPU).",
        "",
    ]
    return "\n".join(lines)


def write(res: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "agent.json", out_dir / "agent.md"
    js.write_text(json.dumps(res, indent=1) + "\n")
    md.write_text(to_markdown(res))
    return js, md
