"""Constrained decoding (engine/grammar.py): walking a grammar by always picking an allowed token yields
output that matches it, with the tiny test tokenizer and with the real Qwen2.5 tokenizer."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import jsonschema
import pytest
import torch
from server_helpers import tiny_chat_engine
from test_tokenizer import build_tokenizer_dir

from promptstash.engine import grammar as grammar_module
from promptstash.engine.grammar import Constraint, GrammarSpec, GrammarViolation, compile_grammar
from promptstash.errors import InvalidRequestError
from promptstash.models.loader import default_cache_dir
from promptstash.models.tokenizer import Tokenizer
from promptstash.tools import CALL_END, ToolDef, parse_tool_calls

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                        "required": ["x", "y"], "additionalProperties": False}},
    "properties": {
        "kind": {"enum": ["line", "dot"]},
        "points": {"type": "array", "items": {"$ref": "#/$defs/point"}, "minItems": 1, "maxItems": 2},
        "label": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]},
    },
    "required": ["kind", "points", "label"],
    "additionalProperties": False,
}
TOOLS = [
    ToolDef("get_weather", "Weather of a city", {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}),
    ToolDef("get_time", "Time in a zone", {
        "type": "object", "properties": {"tz": {"type": "string", "pattern": "^[A-Z]{3}$"}},
        "required": ["tz"], "additionalProperties": False}),
]
CLOSERS = {'"', "}", "]", "0", "1", "2", ",", "true", "null"}


class Walker:
    """Drives a constraint like a sampler would: random allowed tokens, closing ones more often later."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.eos = set(tokenizer.eos_token_ids)
        texts = [tokenizer.decode([i], skip_special_tokens=False) for i in range(tokenizer.vocab_size)]
        self.closers = torch.zeros(vocab_size, dtype=torch.bool)
        self.closers[[i for i, t in enumerate(texts) if t in CLOSERS]] = True

    def walk(self, constraint: Constraint, seed: int, max_steps: int = 400) -> tuple[list[int], str]:
        rng = random.Random(seed)
        out: list[int] = []
        for step in range(max_steps):
            allowed = constraint.allowed()
            assert allowed is not None and allowed.dtype == torch.bool and allowed.shape == self.closers.shape
            ids = allowed.nonzero().flatten().tolist()
            assert ids, "the grammar allows no token"
            if self.eos & set(ids) and (step > 20 or rng.random() < 0.3):
                return out, "eos"
            ids = [i for i in ids if i not in self.eos]
            closing = (allowed & self.closers).nonzero().flatten().tolist()
            if closing and rng.random() < min(0.9, step / 40):
                ids = closing
            token = rng.choice(ids)
            constraint.accept(token)
            out.append(token)
            if constraint.finished:
                return out, "finished"
        raise AssertionError(f"no end after {max_steps} steps: {self.tokenizer.decode(out)!r}")

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Walker]:
    tokenizer = Tokenizer.from_dir(build_tokenizer_dir(tmp_path_factory.mktemp("tok")))
    return tokenizer, Walker(tokenizer, tokenizer.vocab_size + 7)  # the model may have more rows than ids


def _vocab(tiny: tuple[Tokenizer, Walker]) -> int:
    return tiny[1].closers.shape[0]


@pytest.mark.parametrize("schema", [PERSON, NESTED, None], ids=["flat", "nested", "any-object"])
def test_json_schema_walks_parse(tiny: tuple[Tokenizer, Walker], schema: dict | None) -> None:
    tokenizer, walker = tiny
    compiled = compile_grammar(GrammarSpec.json_schema(schema), tokenizer, _vocab(tiny))
    for seed in range(6):
        ids, _ = walker.walk(compiled.constraint(), seed)
        value = json.loads(walker.text(ids))
        jsonschema.validate(value, schema or {"type": "object"})
        if schema is not None:
            assert list(value) == list(schema["properties"])  # the declared property order


def test_mask_never_allows_ids_the_tokenizer_lacks(tiny: tuple[Tokenizer, Walker]) -> None:
    tokenizer, _ = tiny
    allowed = compile_grammar(GrammarSpec.regex("(.|\n)*"), tokenizer, tokenizer.vocab_size + 7).constraint().allowed()
    assert allowed is not None and allowed.shape == (tokenizer.vocab_size + 7,)
    assert allowed[: tokenizer.vocab_size].any() and not allowed[tokenizer.vocab_size:].any()


def test_eos_only_once_complete(tiny: tuple[Tokenizer, Walker]) -> None:
    tokenizer, _ = tiny
    (eos,) = tokenizer.eos_token_ids
    constraint = compile_grammar(GrammarSpec.regex(r"[0-9]{2}-[a-z]+"), tokenizer, _vocab(tiny)).constraint()
    for token in tokenizer.encode("12-"):
        assert not constraint.allowed()[eos]
        constraint.accept(token)
    constraint.accept(tokenizer.encode("ab")[0])
    assert constraint.allowed()[eos] and not constraint.finished  # more letters may follow


def test_regex_and_choice_walks(tiny: tuple[Tokenizer, Walker]) -> None:
    tokenizer, walker = tiny
    pattern = r"(yes|no)-[0-9]{1,3}(\.[a-z]{2})?"
    regex = compile_grammar(GrammarSpec.regex(pattern), tokenizer, _vocab(tiny))
    choices = ["red", "green", 'a "quoted" \\ one', "new\nline", "ü東京", ""]
    choice = compile_grammar(GrammarSpec.choice(choices), tokenizer, _vocab(tiny))
    for seed in range(8):
        assert re.fullmatch(pattern, walker.text(walker.walk(regex.constraint(), seed)[0]))
        ids, _ = walker.walk(choice.constraint(), seed)
        assert walker.text(ids) in choices
    constraint = choice.constraint()
    for token in tokenizer.encode("green"):
        constraint.accept(token)
    assert constraint.finished  # nothing else can follow: the engine stops


def test_tool_calls_required_and_named(tiny: tuple[Tokenizer, Walker]) -> None:
    tokenizer, walker = tiny
    by_name = {t.name: t for t in TOOLS}
    for mode, name, parallel in [("required", None, False), ("required", None, True), ("named", "get_time", True)]:
        compiled = compile_grammar(GrammarSpec.tool_calls(TOOLS, mode, name, parallel), tokenizer, _vocab(tiny))
        for seed in range(5):
            text = walker.text(walker.walk(compiled.constraint(), seed, max_steps=800)[0])
            content, calls = parse_tool_calls(text)
            assert content == "" and calls and text.startswith("<tool_call>\n{\"name\": ")
            assert len(calls) == 1 or parallel
            for call in calls:
                assert call.name == name or (name is None and call.name in by_name)
                jsonschema.validate(json.loads(call.arguments), by_name[call.name].parameters)


def test_tool_calls_auto_free_text_then_a_checked_call(tiny: tuple[Tokenizer, Walker]) -> None:
    tokenizer, walker = tiny
    (eos,) = tokenizer.eos_token_ids
    compiled = compile_grammar(GrammarSpec.tool_calls(TOOLS, "auto", parallel=False), tokenizer, _vocab(tiny))
    constraint = compiled.constraint()
    for token in tokenizer.encode("hello world, the quick brown fox <tool_call>"):
        allowed = constraint.allowed()
        assert allowed is None or (allowed[token] and allowed[eos])  # free text may end at any point
        constraint.accept(token)
    newline = tokenizer.encode("\n")[0]
    allowed = constraint.allowed()
    assert allowed.nonzero().flatten().tolist() == [newline]
    ids, _ = walker.walk(constraint, seed=3, max_steps=800)
    content, calls = parse_tool_calls("hello world, the quick brown fox <tool_call>" + walker.text(ids))
    assert content == "hello world, the quick brown fox" and len(calls) == 1
    assert constraint.finished  # not parallel: nothing after </tool_call>


def test_fork_is_independent(tiny: tuple[Tokenizer, Walker]) -> None:
    tokenizer, _ = tiny
    constraint = compile_grammar(GrammarSpec.choice(["abc", "abd", "xyz"]), tokenizer, _vocab(tiny)).constraint()
    a = tokenizer.encode("a")[0]
    constraint.accept(a)
    before = constraint.allowed().clone()
    fork = constraint.fork()
    for token in tokenizer.encode("bd"):
        fork.accept(token)
    assert fork.finished and not constraint.finished
    assert torch.equal(constraint.allowed(), before)
    with pytest.raises(GrammarViolation):
        constraint.accept(tokenizer.encode("x")[0])


def test_compiled_grammars_are_cached(tiny: tuple[Tokenizer, Walker], monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer, _ = tiny
    vocab = _vocab(tiny)
    first = compile_grammar(GrammarSpec.json_schema(PERSON), tokenizer, vocab)
    assert compile_grammar(GrammarSpec.json_schema(json.loads(json.dumps(PERSON))), tokenizer, vocab) is first
    assert compile_grammar(GrammarSpec.json_schema(PERSON), tokenizer, vocab + 1) is not first
    monkeypatch.setattr(grammar_module, "CACHE_SIZE", 2)
    compile_grammar(GrammarSpec.regex("a"), tokenizer, vocab)
    compile_grammar(GrammarSpec.regex("b"), tokenizer, vocab)
    assert compile_grammar(GrammarSpec.json_schema(PERSON), tokenizer, vocab) is not first  # evicted


@pytest.mark.parametrize("spec, message", [
    (GrammarSpec.json_schema({"type": "strng"}), "json_schema could not be compiled: invalid JSON schema: "),
    (GrammarSpec.json_schema({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}),
     "invalid JSON schema"),
    (GrammarSpec.json_schema({"not": {"type": "string"}}), "does not support: Unimplemented keys: [\"not\"]"),
    (GrammarSpec.json_schema({"type": "string", "minLength": 3, "maxLength": 1}), "no JSON value satisfies it"),
    (GrammarSpec("json_schema", "[1, 2]"), "invalid JSON schema: expected a JSON object, got list"),
    (GrammarSpec("json_schema", "{nope"), "json_schema is not valid JSON"),
    (GrammarSpec.regex("a(b"), "regex could not be compiled: "),
    (GrammarSpec.choice([]), "choice must be a non-empty list of strings"),
    (GrammarSpec.tool_calls(TOOLS, "named", "nope"), "tool_choice names the function 'nope'"),
    (GrammarSpec.tool_calls([ToolDef("f", None, {"type": "object", "properties": {"a": {"type": "nope"}}})],
                            "required"), "parameters of tool 'f' could not be compiled: invalid JSON schema"),
    (GrammarSpec.tool_calls([], "required"), "at least one tool"),
    (GrammarSpec("tool_calls", json.dumps([{"name": "f"}]), "sometimes"), "unknown tool mode 'sometimes'"),
    (GrammarSpec.regex("a\ud800"), "regex holds text that is not valid Unicode"),
    (GrammarSpec.tool_calls([ToolDef("f\ud800")], "required"), "tools holds text that is not valid Unicode"),
    (GrammarSpec.choice(["a\ud800"]), "choice could not be compiled"),
])
def test_errors_name_the_problem(tiny: tuple[Tokenizer, Walker], spec: GrammarSpec, message: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        compile_grammar(spec, tiny[0], _vocab(tiny))
    assert message in str(info.value)
    assert "<state>" not in str(info.value) and len(str(info.value)) < 700


def _json_layout_ok(text: str) -> bool:
    """JSON text laid out as json.dumps does by default: ", " and ": " and no other whitespace."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    return (re.search(r"\s", bare.replace(", ", ",").replace(": ", ":")) is None
            and re.search(r"[,:](?! )", bare) is None)


def _accepts(tokenizer: Tokenizer, spec: GrammarSpec, text: str, complete: bool = True) -> bool:
    """The grammar lets `text` (encoded in one go) through, and then EOS (when `complete`)."""
    (eos,) = tokenizer.eos_token_ids
    constraint = compile_grammar(spec, tokenizer, tokenizer.vocab_size + 7).constraint()
    for token in tokenizer.encode(text):
        allowed = constraint.allowed()
        if allowed is not None and not allowed[token]:
            return False
        constraint.accept(token)
    allowed = constraint.allowed()
    return not complete or constraint.finished or allowed is None or bool(allowed[eos])


def test_json_has_the_layout_of_json_dumps(tiny: tuple[Tokenizer, Walker]) -> None:
    """NOTE in engine/grammar.py: a call generated so renders back (tojson) to the same text."""
    tokenizer, walker = tiny
    for schema in (PERSON, NESTED, None):
        compiled = compile_grammar(GrammarSpec.json_schema(schema), tokenizer, _vocab(tiny))
        for seed in range(4):
            text = walker.text(walker.walk(compiled.constraint(), seed)[0])
            assert _json_layout_ok(text), text
    compiled = compile_grammar(GrammarSpec.tool_calls(TOOLS, "required"), tokenizer, _vocab(tiny))
    for seed in range(4):
        for call in parse_tool_calls(walker.text(walker.walk(compiled.constraint(), seed, max_steps=800)[0]))[1]:
            assert _json_layout_ok(call.arguments), call
    spec = GrammarSpec.json_schema(PERSON)
    assert _accepts(tokenizer, spec, '{"name": "ab", "age": 3, "tags": ["a", "b"], "ok": true}')
    for other in ('{"name":"ab", "age": 3, "tags": ["a", "b"], "ok": true}',
                  '{ "name": "ab", "age": 3, "tags": ["a", "b"], "ok": true}',
                  '{"name": "ab", "age": 3, "tags": ["a","b"], "ok": true}',
                  '{"name": "a\\/", "age": 3, "tags": [], "ok": true}',
                  '{"name": "ab", "age": 3, "tags": [], "ok": true}\n'):
        assert not _accepts(tokenizer, spec, other), other


def test_generated_tool_call_renders_back_to_the_same_tokens(tmp_path: Path) -> None:
    """The next agent step's prompt starts with this step's prompt and the generated call: the prefix cache
    runs through the call."""
    engine = tiny_chat_engine(tmp_path)
    tools = [ToolDef(t.name, t.description, t.parameters) for t in TOOLS]
    messages: list[dict] = [{"role": "system", "content": "hello world"}, {"role": "user", "content": "weather?"}]
    first = engine.render(messages, tools=tools).token_ids
    spec = GrammarSpec.tool_calls(tools, "required", parallel=False)
    for seed in range(3):
        done = engine.generate(first, grammar=spec, temperature=1.0, seed=seed, max_tokens=300)
        assert done.finish_reason == "stop", done
        _, calls = parse_tool_calls(done.text)
        history = [*messages, {"role": "assistant", "content": None, "tool_calls": [
            {"id": calls[0].id, "type": "function",
             "function": {"name": calls[0].name, "arguments": calls[0].arguments}}]},
            {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"}]
        second = engine.render(history, tools=tools).token_ids
        call_text = done.text[: done.text.index(CALL_END) + len(CALL_END)]
        prefix = engine.tokenizer.decode(second, skip_special_tokens=False)
        assert prefix.startswith(engine.tokenizer.decode(first, skip_special_tokens=False) + call_text)
        canonical = engine.tokenizer.encode(call_text)  # what a model writing canonical tokens generates
        assert second[: len(first) + len(canonical)] == [*first, *canonical], seed
        if list(done.token_ids[: len(canonical)]) == canonical:
            assert second[: len(first) + len(canonical)] == [*first, *done.token_ids[: len(canonical)]]


def test_auto_bare_call_free_text_or_tagged_calls(tiny: tuple[Tokenizer, Walker]) -> None:
    tokenizer, walker = tiny
    names = [t.name for t in TOOLS]
    spec = GrammarSpec.tool_calls(TOOLS, "auto", parallel=True)
    bare = '{"name": "get_time", "arguments": {"tz": "UTC"}}'
    call = "<tool_call>\n" + bare + "\n</tool_call>"
    for text in (bare, "\n " + bare, "hello {world}", "hello " + call, call, "", "  hi", "```json\n" + bare + "\n```",
                 "```\n" + bare + "\n```", "```python\nx = {}\n```", "`{`"):
        assert _accepts(tokenizer, spec, text), text
    for text in ('{"answer": 1}', '{"name": "nope", "arguments": {}}', " {x", bare + " more", bare + "\n" + call,
                 '{"name": "get_time", "arguments": {"tz": "utc"}}', '{"name":"get_time", "arguments": {}}',
                 "```json\n{\n", "```json\n" + bare, "```json\n" + bare + "\n``` more"):
        assert not _accepts(tokenizer, spec, text), text
    constraint = compile_grammar(spec, tokenizer, _vocab(tiny)).constraint()
    for token in tokenizer.encode('{"'):
        constraint.accept(token)
    for seed in range(4):
        fork = constraint.fork()
        ids, _ = walker.walk(fork, seed, max_steps=800)
        content, calls = parse_tool_calls('{"' + walker.text(ids), names)
        assert content == "" and len(calls) == 1 and fork.finished


def test_auto_with_a_text_schema(tiny: tuple[Tokenizer, Walker]) -> None:
    tokenizer, walker = tiny
    answer = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 6}},
              "required": ["answer"], "additionalProperties": False}
    spec = GrammarSpec.tool_calls(TOOLS, "auto", parallel=False, text_schema=answer)
    bare = '{"name": "get_time", "arguments": {"tz": "UTC"}}'
    for text in ('{"answer": "hi"}', bare, "<tool_call>\n" + bare + "\n</tool_call>"):
        assert _accepts(tokenizer, spec, text), text
    for text in ("hello", '{"answer": 1}', '{"answer":"hi"}', 'hi <tool_call>\n' + bare + "\n</tool_call>"):
        assert not _accepts(tokenizer, spec, text), text
    names = [t.name for t in TOOLS]
    compiled = compile_grammar(spec, tokenizer, _vocab(tiny))
    for seed in range(6):
        text = walker.text(walker.walk(compiled.constraint(), seed, max_steps=800)[0])
        content, calls = parse_tool_calls(text, names)
        assert calls or (jsonschema.validate(json.loads(content), answer) is None and _json_layout_ok(content))
    any_object = GrammarSpec.tool_calls(TOOLS, "auto", text_schema={"type": "object"})
    assert _accepts(tokenizer, any_object, '{"x": [1, 2]}') and not _accepts(tokenizer, any_object, "[1]")
    required = GrammarSpec.tool_calls(TOOLS, "required", text_schema=answer)  # a call is forced: no text
    assert _accepts(tokenizer, required, "<tool_call>\n" + bare + "\n</tool_call>")
    assert not _accepts(tokenizer, required, '{"answer": "hi"}', complete=False)
    with pytest.raises(InvalidRequestError, match="the output format's schema could not be compiled"):
        compile_grammar(GrammarSpec.tool_calls(TOOLS, "required", text_schema={"type": "strng"}), tokenizer,
                        _vocab(tiny))


def test_a_repeated_call_finishes(tiny: tuple[Tokenizer, Walker]) -> None:
    tokenizer, _ = tiny
    one = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
    two = one.replace("UTC", "CET")
    for mode in ("required", "auto"):
        spec = GrammarSpec.tool_calls(TOOLS, mode, parallel=True)
        constraint = compile_grammar(spec, tokenizer, _vocab(tiny)).constraint()
        for token in tokenizer.encode(one + "\n" + two + "\n"):
            constraint.accept(token)
        assert not constraint.finished  # two different calls; more may follow
        fork = constraint.fork()
        for token in tokenizer.encode(one):
            assert not constraint.finished
            constraint.accept(token)
        assert constraint.finished and not fork.finished


def test_engine_generates_schema_valid_json(tmp_path: Path) -> None:
    """Random weights: every sample is whatever the mask lets through, and still parses."""
    engine = tiny_chat_engine(tmp_path)
    spec = GrammarSpec.json_schema(PERSON)
    for seed in range(2):
        done = engine.generate("hello", grammar=spec, temperature=1.0, seed=seed, max_tokens=600)
        assert done.finish_reason == "stop", done
        jsonschema.validate(json.loads(done.text), PERSON)


# --- the real Qwen2.5 tokenizer ---------------------------------------------------------------------------

QWEN_DIR = default_cache_dir() / "models" / "qwen2.5-coder-0.5b-instruct-q4_k_m"
QWEN_VOCAB = 151936  # the model's embedding rows; the tokenizer knows 151665 ids


@pytest.fixture(scope="module")
def qwen() -> tuple[Tokenizer, Walker]:
    if not (QWEN_DIR / "tokenizer.json").is_file():
        pytest.skip("the default model is not converted yet (any real-model test or `make serve` does it)")
    tokenizer = Tokenizer.from_dir(QWEN_DIR)
    return tokenizer, Walker(tokenizer, QWEN_VOCAB)


@pytest.mark.slow
@pytest.mark.real_model
def test_qwen_json_schema(qwen: tuple[Tokenizer, Walker]) -> None:
    tokenizer, walker = qwen
    for schema in (PERSON, NESTED):
        compiled = compile_grammar(GrammarSpec.json_schema(schema), tokenizer, QWEN_VOCAB)
        allowed = compiled.constraint().allowed()
        assert allowed.shape == (QWEN_VOCAB,) and not allowed[tokenizer.vocab_size:].any()
        assert not allowed[151645]  # <|im_end|>: not before the JSON is complete
        for seed in range(4):
            ids, _ = walker.walk(compiled.constraint(), seed)
            jsonschema.validate(json.loads(walker.text(ids)), schema)


@pytest.mark.slow
@pytest.mark.real_model
def test_qwen_tool_calls(qwen: tuple[Tokenizer, Walker]) -> None:
    tokenizer, walker = qwen
    call_start, call_end = tokenizer.token_to_id("<tool_call>"), tokenizer.token_to_id("</tool_call>")
    assert (call_start, call_end) == (151657, 151658)
    required = compile_grammar(GrammarSpec.tool_calls(TOOLS, "required"), tokenizer, QWEN_VOCAB).constraint()
    assert required.allowed().nonzero().flatten().tolist() == [call_start]  # the added token, not its text
    ids, _ = walker.walk(required, seed=0, max_steps=800)
    assert ids[0] == call_start and call_end in ids
    content, calls = parse_tool_calls(walker.text(ids))
    assert content == "" and calls

    auto = compile_grammar(GrammarSpec.tool_calls(TOOLS, "auto", parallel=False), tokenizer, QWEN_VOCAB).constraint()
    first = auto.allowed()  # the output's form: a bare call, free text or a tagged call
    assert first[tokenizer.encode("Let")[0]] and first[call_start] and first[151645]
    assert first[tokenizer.encode(' {"')[0]] and not first[tokenizer.encode("{}")[0]]
    for i, token in enumerate(tokenizer.encode("Let me look that up.")):
        assert i == 0 or auto.allowed() is None  # free text costs nothing
        auto.accept(token)
    fenced = compile_grammar(GrammarSpec.tool_calls(TOOLS, "auto"), tokenizer, QWEN_VOCAB).constraint()
    for token in tokenizer.encode("```json\n"):
        assert fenced.allowed() is not None  # may still be a fenced bare call
        fenced.accept(token)
    allowed = fenced.allowed()
    assert allowed[tokenizer.encode('{"')[0]] and not allowed[tokenizer.encode("{\n")[0]]
    code = compile_grammar(GrammarSpec.tool_calls(TOOLS, "auto"), tokenizer, QWEN_VOCAB).constraint()
    for token in tokenizer.encode("```python\n"):
        code.accept(token)
    assert code.allowed() is None  # a code block: free text
    fork = auto.fork()
    auto.accept(call_start)
    assert fork.allowed() is None  # the fork is still in free text
    ids, _ = walker.walk(auto, seed=1, max_steps=800)
    content, calls = parse_tool_calls("Let me look that up.<tool_call>" + walker.text(ids))
    assert content == "Let me look that up." and len(calls) == 1 and auto.finished
    jsonschema.validate(json.loads(calls[0].arguments), {t.name: t for t in TOOLS}[calls[0].name].parameters)


def test_no_schema_keyword_is_silently_ignored(tiny: tuple[Tokenizer, Walker]) -> None:
    """bench grammar's coverage list: each schema is rejected with a 400-style error naming the keyword, or
    it accepts a valid instance and refuses one that breaks only that keyword. Never compiled and ignored."""
    from promptstash.bench.grammar import COVERAGE, _llg_accepts

    tokenizer = tiny[0]
    (eos,) = tokenizer.eos_token_ids
    enforced = 0
    for name, schema, good, bad in COVERAGE:
        try:
            compiled = compile_grammar(GrammarSpec.json_schema(schema), tokenizer, _vocab(tiny))
        except InvalidRequestError as exc:
            assert "does not support" in str(exc), (name, str(exc))
            continue
        assert _llg_accepts(compiled, tokenizer.encode(good), eos), name
        assert not _llg_accepts(compiled, tokenizer.encode(bad), eos), name
        enforced += 1
    assert enforced >= 20
