"""`promptstash bench grammar`: what constrained decoding costs, and how much JSON Schema it covers.

On the default model (float32), for the same prompts with and without a grammar (a flat object, a nested
object with arrays / enums / $ref, any JSON object, a required tool call):
- decode tok/s, free text vs constrained (greedy; the free runs ignore EOS and decode as many tokens as the
  constrained output has; best of two runs each, in both orders);
- per-token grammar time, replaying the constrained outputs: llguidance's mask alone, our whole
  Constraint.allowed() + accept() (mask -> bool tensor [vocab]), and xgrammar's mask for the same tokens;
- compile time: the tokenizer's trie (once per tokenizer), each grammar cold, and a cache hit;
- schema coverage over a fixed list of schemas: does each library compile it, accept a valid instance,
  and reject an instance that breaks exactly the keyword under test (a library that compiles a schema but
  ignores a keyword lets the model break it).
xgrammar is measured when importable. It is not a dependency (its wheel pulls triton); the results page
says how it was installed for the recorded run.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from promptstash.engine.grammar import GrammarSpec, GrammarViolation, compile_grammar
from promptstash.tools import ToolDef, parse_tool_calls

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "active"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "$defs": {"item": {"type": "object", "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
        "quantity": {"type": "integer", "minimum": 1},
        "size": {"enum": ["S", "M", "L"]}}, "required": ["sku", "quantity", "size"], "additionalProperties": False}},
    "properties": {
        "customer": {"type": "object", "properties": {"name": {"type": "string"}, "vip": {"type": "boolean"}},
                     "required": ["name", "vip"], "additionalProperties": False},
        "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 3},
        "status": {"enum": ["pending", "shipped", "delivered"]},
    },
    "required": ["customer", "items", "status"],
    "additionalProperties": False,
}
TOOLS = [
    ToolDef("get_weather", "Current weather of a city", {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}),
    ToolDef("search_flights", "Flights between two airports on a date", {
        "type": "object", "properties": {
            "origin": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
        "required": ["origin", "destination", "date"], "additionalProperties": False}),
]
SYSTEM = "You are a helpful assistant. When asked for JSON, answer with JSON only."
CASES: list[tuple[str, str, Any]] = [  # (name, user message, schema | "tools" | None for any object)
    ("flat object", "Make up a person: their name, age, email and whether the account is active. As JSON.", PERSON),
    ("nested, arrays, enums", "Make up an order: a customer (name, vip), one item (sku like ABC-123, quantity, "
     "size S/M/L) and a status. As JSON.", ORDER),
    ("any JSON object", "Describe the planet Mars in a JSON object with three fields, each one or two words.",
     None),
    ("tool call (required)", "What's the weather in Paris, in celsius?", "tools"),
]

# (name, schema, a valid instance, an instance that breaks only the keyword under test)
COVERAGE: list[tuple[str, Any, str, str]] = [
    ("object + types", {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
                        "required": ["a", "b"]}, '{"a": "x", "b": 1}', '{"a": "x", "b": "1"}'),
    ("enum", {"enum": ["x", "y"]}, '"x"', '"z"'),
    ("const", {"const": 5}, "5", "6"),
    ("array minItems/maxItems", {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
     "[1, 2]", "[1]"),
    ("string minLength/maxLength", {"type": "string", "minLength": 2, "maxLength": 3}, '"ab"', '"abcd"'),
    ("pattern", {"type": "string", "pattern": "^[a-z]+-[0-9]+$"}, '"ab-12"', '"ab12"'),
    ("integer minimum/maximum", {"type": "integer", "minimum": 1, "maximum": 10}, "5", "11"),
    ("number exclusiveMinimum", {"type": "number", "exclusiveMinimum": 0}, "0.5", "0"),
    ("$ref / $defs", {"$defs": {"p": {"type": "integer"}}, "type": "object", "properties": {"x": {"$ref": "#/$defs/p"}},
                      "required": ["x"]}, '{"x": 1}', '{"x": "a"}'),
    ("recursive $ref", {"$defs": {"n": {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {
        "type": "array", "items": {"$ref": "#/$defs/n"}}}, "required": ["v"]}}, "$ref": "#/$defs/n"},
     '{"v": 1, "kids": [{"v": 2}]}', '{"v": 1, "kids": [{"v": "a"}]}'),
    ("anyOf", {"anyOf": [{"type": "string"}, {"type": "integer"}]}, "3", "true"),
    ("oneOf", {"oneOf": [{"type": "string"}, {"type": "integer"}]}, '"s"', "null"),
    ("allOf", {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}]},
     '{"a": 1, "b": "x"}', '{"a": 1}'),
    ("type list", {"type": ["string", "null"]}, "null", "1"),
    ("additionalProperties: false", {"type": "object", "properties": {"a": {"type": "integer"}},
                                     "additionalProperties": False}, '{"a": 1}', '{"a": 1, "b": 2}'),
    ("additionalProperties schema", {"type": "object", "additionalProperties": {"type": "integer"}}, '{"k": 1}',
     '{"k": "v"}'),
    ("required without properties", {"type": "object", "required": ["a"]}, '{"a": 1}', "{}"),
    ("minProperties", {"type": "object", "minProperties": 1}, '{"a": 1}', "{}"),
    ("patternProperties", {"type": "object", "patternProperties": {"^x-": {"type": "integer"}},
                           "additionalProperties": False}, '{"x-a": 1}', '{"y": 1}'),
    ("prefixItems", {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
     '["a", 1]', '[1, "a"]'),
    ("format date-time", {"type": "string", "format": "date-time"}, '"2024-01-02T03:04:05Z"', '"yesterday"'),
    ("format email", {"type": "string", "format": "email"}, '"a@b.co"', '"not an email"'),
    ("multipleOf", {"type": "integer", "multipleOf": 5}, "10", "7"),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 2]", "[1, 1]"),
    ("contains", {"type": "array", "contains": {"const": 3}}, "[1, 3]", "[1, 2]"),
    ("not", {"not": {"type": "string"}}, "1", '"s"'),
    ("if / then", {"type": "object", "if": {"properties": {"a": {"const": 1}}, "required": ["a"]},
                   "then": {"required": ["b"]}}, '{"a": 2}', '{"a": 1}'),
    ("dependentRequired", {"type": "object", "dependentRequired": {"a": ["b"]}}, '{"b": 1}', '{"a": 1}'),
]
XGRAMMAR_INSTALL = "pip install --no-deps --target /tmp/xgr xgrammar apache-tvm-ffi; PYTHONPATH=/tmp/xgr"


def _median_us(values: list[float]) -> float:
    return statistics.median(values) * 1e6 if values else float("nan")


def _p95_us(values: list[float]) -> float:
    return sorted(values)[int(0.95 * (len(values) - 1))] * 1e6 if values else float("nan")


def _spec(schema: Any) -> GrammarSpec:
    return GrammarSpec.tool_calls(TOOLS, "required", parallel=False) if schema == "tools" else \
        GrammarSpec.json_schema(schema)


class _XGrammar:
    """xgrammar over the same tokenizer, when importable."""

    def __init__(self, model_dir: Path, vocab_size: int, eos: list[int]) -> None:
        import transformers
        import xgrammar

        self.xgr = xgrammar
        self.version = getattr(xgrammar, "__version__", None) or _dist_version("xgrammar")
        start = time.perf_counter()
        hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=eos)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        self.tokenizer_s = time.perf_counter() - start
        self.vocab_size = vocab_size
        self.eos = eos

    def compile(self, schema: Any) -> Any:
        text = json.dumps({"type": "object"} if schema is None else schema)
        return self.compiler.compile_json_schema(text, any_whitespace=True)

    def replay(self, compiled: Any, tokens: list[int]) -> list[float]:
        matcher = self.xgr.GrammarMatcher(compiled)
        bitmask = self.xgr.allocate_token_bitmask(1, self.vocab_size)
        times = []
        for token in tokens:
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            times.append(time.perf_counter() - start)
            if not matcher.accept_token(token):
                raise GrammarViolation(f"xgrammar rejected token {token}")
        return times

    def accepts(self, compiled: Any, tokens: list[int]) -> bool:
        matcher = self.xgr.GrammarMatcher(compiled)
        return all(matcher.accept_token(t) for t in tokens) and matcher.accept_token(self.eos[0])


def _decode_tok_s(done: Any) -> float:
    decode_s = done.timings.total_s - done.timings.ttft_s
    return (len(done.token_ids) - 1) / decode_s if decode_s > 0 else float("nan")


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _llg_accepts(compiled: Any, tokens: list[int], eos: int) -> bool:
    constraint = compiled.constraint()
    try:
        for token in tokens:
            constraint.accept(token)
    except GrammarViolation:
        return False
    return constraint.finished or bool(constraint.allowed()[eos])


def _replay_llg(compiled: Any, tokens: list[int]) -> tuple[list[float], list[float]]:
    """Per token: llguidance's mask alone, and our whole step (allowed() incl. the bool tensor, accept())."""
    import numpy as np

    constraint = compiled.constraint()
    matcher = compiled._matcher.deep_copy()  # a second copy, stepped in lockstep for the raw mask time
    words = np.zeros(compiled.vocab.words, dtype=np.int32)
    raw, whole = [], []
    for token in tokens:
        start = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        raw.append(time.perf_counter() - start)
        matcher.consume_token(token)
        start = time.perf_counter()
        allowed = constraint.allowed()
        constraint.accept(token)
        whole.append(time.perf_counter() - start)
        assert allowed is not None and bool(allowed[token])
    return raw, whole


def run(model: str | None = None, max_tokens: int = 100, log: Callable[[str], None] = print) -> dict[str, Any]:
    import llguidance

    from promptstash.engine import grammar as grammar_module
    from promptstash.engine.engine import Engine
    from promptstash.models.loader import resolve_model

    started = time.perf_counter()
    engine = Engine.from_pretrained(model, dtype="float32", progress=False)
    tokenizer = engine.tokenizer
    assert tokenizer is not None
    vocab_size = engine.model.config.vocab_size
    eos = sorted(tokenizer.eos_token_ids)
    model_dir = resolve_model(model, progress=False).path

    # compile: the token trie once per tokenizer (at its first grammar), then each grammar
    start = time.perf_counter()
    grammar_module._grammars_of(tokenizer).vocab()
    trie_s = time.perf_counter() - start
    compile_rows = []
    for name, _, schema in CASES:
        spec = _spec(schema)
        start = time.perf_counter()
        compiled = engine.compile_grammar(spec)
        cold = time.perf_counter() - start
        hits = []
        for _ in range(20):
            start = time.perf_counter()
            assert engine.compile_grammar(spec) is compiled
            hits.append(time.perf_counter() - start)
        compile_rows.append({"case": name, "cold_ms": cold * 1e3, "cached_us": _median_us(hits)})
    log(f"llguidance: token trie {trie_s:.2f} s; grammars compiled")

    xgr = None
    try:
        xgr = _XGrammar(model_dir, vocab_size, eos)
        log(f"xgrammar {xgr.version}: tokenizer info {xgr.tokenizer_s:.2f} s")
    except ImportError:
        log("xgrammar is not importable: skipping its figures")

    # decode: free text vs the same prompt with a grammar, interleaved
    engine.generate("Hello", max_tokens=4)  # warm-up
    decode_rows = []
    for name, user, schema in CASES:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
        prompt = list(engine.render(messages, tools=TOOLS if schema == "tools" else ()).token_ids)
        runs: dict[str, list[Any]] = {"free": [], "constrained": []}
        constrained = engine.generate(prompt, max_tokens=max_tokens, temperature=0.0, grammar=_spec(schema))
        runs["constrained"].append(constrained)
        length = len(constrained.token_ids)  # the free runs decode as many tokens
        for label in ("free", "free", "constrained"):  # both orders: free after constrained, and before
            runs[label].append(engine.generate(prompt, max_tokens=length, temperature=0.0, ignore_eos=True)
                               if label == "free" else
                               engine.generate(prompt, max_tokens=max_tokens, temperature=0.0, grammar=_spec(schema)))
        row: dict[str, Any] = {"case": name, "finish_reason": constrained.finish_reason,
                               "output": constrained.text, "tokens": length}
        for label, done_runs in runs.items():
            row[f"{label}_tok_s"] = max(_decode_tok_s(done) for done in done_runs)  # best of 2
        if schema == "tools":
            content, calls = parse_tool_calls(constrained.text)
            row["valid"] = bool(calls) and all(json.loads(c.arguments) is not None for c in calls)
        else:
            try:
                json.loads(constrained.text)
                row["valid"] = True
            except json.JSONDecodeError:
                row["valid"] = False
        tokens = list(constrained.token_ids)
        if tokens and tokens[-1] in eos:
            tokens = tokens[:-1]
        raw, whole = _replay_llg(engine.compile_grammar(_spec(schema)), tokens)
        row.update(llg_mask_us=_median_us(raw), llg_mask_p95_us=_p95_us(raw), step_us=_median_us(whole),
                   step_p95_us=_p95_us(whole))
        if xgr is not None and schema != "tools":
            start = time.perf_counter()
            compiled = xgr.compile(schema)
            row["xgr_compile_ms"] = (time.perf_counter() - start) * 1e3
            times = xgr.replay(compiled, tokens)
            row.update(xgr_mask_us=_median_us(times), xgr_mask_p95_us=_p95_us(times))
        decode_rows.append(row)
        log(f"{name}: free {row['free_tok_s']:.1f} tok/s, constrained {row['constrained_tok_s']:.1f} tok/s, "
            f"step {row['step_us']:.0f} us; {constrained.text!r}")

    coverage = []
    for name, schema, good, bad in COVERAGE:
        good_ids, bad_ids = tokenizer.encode(good), tokenizer.encode(bad)
        row = {"case": name}
        try:
            compiled = compile_grammar(GrammarSpec.json_schema(schema), tokenizer, vocab_size)
            row["llg"] = {"compiles": True, "accepts_valid": _llg_accepts(compiled, good_ids, eos[0]),
                          "rejects_invalid": not _llg_accepts(compiled, bad_ids, eos[0])}
        except Exception as exc:
            row["llg"] = {"compiles": False, "error": str(exc)[:200]}
        if xgr is not None:
            try:
                compiled = xgr.compile(schema)
                row["xgr"] = {"compiles": True, "accepts_valid": xgr.accepts(compiled, good_ids),
                              "rejects_invalid": not xgr.accepts(compiled, bad_ids)}
            except Exception as exc:
                row["xgr"] = {"compiles": False, "error": str(exc).strip().splitlines()[-1][:200]}
        coverage.append(row)

    return {
        "date": time.strftime("%Y-%m-%d"),
        "model": engine.model_id,
        "dtype": "float32",
        "machine": f"{platform.machine()}, {_cpus()} CPUs (shared)",
        "max_tokens": max_tokens,
        "llguidance": llguidance.__version__ if hasattr(llguidance, "__version__") else _dist_version("llguidance"),
        "xgrammar": None if xgr is None else xgr.version,
        "xgrammar_install": XGRAMMAR_INSTALL,
        "trie_s": trie_s,
        "xgr_tokenizer_s": None if xgr is None else xgr.tokenizer_s,
        "compile": compile_rows,
        "decode": decode_rows,
        "coverage": coverage,
        "seconds": time.perf_counter() - started,
    }


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _score(coverage: list[dict[str, Any]], lib: str) -> tuple[int, int, int]:
    rows = [r[lib] for r in coverage if lib in r]
    return (sum(r["compiles"] for r in rows),
            sum(r["compiles"] and r["accepts_valid"] and r["rejects_invalid"] for r in rows),
            sum(r["compiles"] and not r["rejects_invalid"] for r in rows))


def _mark(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "–"
    if not cell["compiles"]:
        return "rejected (400)"
    if cell["accepts_valid"] and cell["rejects_invalid"]:
        return "enforced"
    if not cell["rejects_invalid"]:
        return "**ignored** (compiles, invalid output allowed)"
    return "too strict (valid instance refused)"


def to_markdown(res: dict[str, Any]) -> str:
    xgr = res["xgrammar"] is not None
    lines = [
        "# Constrained decoding: overhead and schema coverage",
        "",
        f"`promptstash bench grammar` on {res['date']}: {res['model']} ({res['dtype']}), {res['machine']}, "
        f"greedy, max_tokens={res['max_tokens']}; llguidance {res['llguidance']}"
        + (f", xgrammar {res['xgrammar']} (installed for the run with `{res['xgrammar_install']}`: "
           "its wheel requires triton, so it is not a dependency)" if xgr else ", xgrammar not installed")
        + f". Whole run {res['seconds']:.0f} s.",
        "",
        "## Decode speed, free text vs the same prompt with a grammar",
        "",
        "| grammar | free tok/s | constrained tok/s | measured overhead | grammar share of a step | tokens | "
        "output parses | llguidance mask (p50 / p95) | our step: mask + bool tensor + accept (p50 / p95) |"
        + (" xgrammar mask (p50 / p95) |" if xgr else ""),
        "|---|---:|---:|---:|---:|---:|---|---:|---:|" + ("---:|" if xgr else ""),
    ]
    for r in res["decode"]:
        overhead = (r["free_tok_s"] / r["constrained_tok_s"] - 1) * 100
        share = r["step_us"] * 1e-6 * r["constrained_tok_s"] * 100
        line = (f"| {r['case']} | {r['free_tok_s']:.1f} | {r['constrained_tok_s']:.1f} | {overhead:+.1f}% | "
                f"{share:.3f}% | "
                f"{r['tokens']} | {'yes' if r['valid'] else 'NO'} ({r['finish_reason']}) | "
                f"{r['llg_mask_us']:.0f} / {r['llg_mask_p95_us']:.0f} µs | {r['step_us']:.0f} / "
                f"{r['step_p95_us']:.0f} µs |")
        if xgr:
            line += (f" {r['xgr_mask_us']:.0f} / {r['xgr_mask_p95_us']:.0f} µs |" if "xgr_mask_us" in r else " – |")
        lines.append(line)
    lines += [
        "",
        "Free and constrained runs decode the same number of tokens (best of two runs each, in both orders). "
        "Measured overhead is free tok/s over constrained tok/s, minus 1: on a shared machine it is mostly noise "
        "(a negative figure means the difference is below it). The grammar's share of a step is our per-token "
        "step time times constrained tok/s: the part of each decode step spent in the grammar. The per-token "
        "times replay the constrained output's tokens through each matcher after the run. Outputs:",
        "",
    ]
    lines += [f"- {r['case']}: `{r['output']!r}`" for r in res["decode"]]
    lines += [
        "",
        "## Compile time",
        "",
        f"Token trie of the tokenizer (once per tokenizer, at the first grammar): llguidance {res['trie_s']:.2f} s"
        + (f", xgrammar TokenizerInfo {res['xgr_tokenizer_s']:.2f} s" if xgr else "") + ".",
        "",
        "| grammar | cold | cached (LRU hit) |" + (" xgrammar cold |" if xgr else ""),
        "|---|---:|---:|" + ("---:|" if xgr else ""),
    ]
    xgr_compile = {r["case"]: r.get("xgr_compile_ms") for r in res["decode"]}
    for r in res["compile"]:
        line = f"| {r['case']} | {r['cold_ms']:.1f} ms | {r['cached_us']:.1f} µs |"
        if xgr:
            ms = xgr_compile.get(r["case"])
            line += f" {ms:.1f} ms |" if ms is not None else " – |"
        lines.append(line)
    llg = _score(res["coverage"], "llg")
    total = len(res["coverage"])
    lines += [
        "",
        f"## Schema coverage ({total} schemas, one keyword each)",
        "",
        "Each schema is compiled, then fed a valid instance and an instance that breaks only the keyword under "
        "test. *enforced*: valid accepted, invalid refused. *ignored*: the schema compiles but the broken "
        "instance is accepted, so a model could output it. *rejected*: compiling fails (a 400 here, naming "
        "the keyword).",
        "",
        f"- llguidance: {llg[1]}/{total} enforced, {total - llg[0]} rejected, {llg[2]} ignored",
    ]
    if xgr:
        x = _score(res["coverage"], "xgr")
        lines.append(f"- xgrammar: {x[1]}/{total} enforced, {total - x[0]} rejected, {x[2]} ignored")
    lines += ["", "| keyword | llguidance |" + (" xgrammar |" if xgr else ""),
              "|---|---|" + ("---|" if xgr else "")]
    for r in res["coverage"]:
        lines.append(f"| {r['case']} | {_mark(r.get('llg'))} |" + (f" {_mark(r.get('xgr'))} |" if xgr else ""))
    if xgr:
        x = _score(res["coverage"], "xgr")
        worst = max(r["step_us"] * 1e-6 * r["constrained_tok_s"] * 100 for r in res["decode"])
        lines += [
            "",
            "## Choice",
            "",
            f"Both libraries' masks cost well under 0.1 ms per token; our whole grammar step is at most "
            f"{worst:.3f}% of a decode step here, so speed does not separate them. Coverage does: llguidance "
            f"rejects what it cannot enforce ({total - llg[0]} schemas, each a clear 400) and ignores "
            f"{llg[2] or 'none'}, while xgrammar compiles {x[2]} schemas whose keyword it then ignores, letting "
            "the model output JSON that breaks the schema. promptstash uses llguidance.",
        ]
    lines.append("")
    return "\n".join(lines)


def write(res: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "grammar.json", out_dir / "grammar.md"
    js.write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    md.write_text(to_markdown(res))
    return js, md
