"""Constrained decoding: what the model may output, as a grammar the sampler enforces token by token.

CONTRACT
- GrammarSpec says what is wanted (a JSON schema, any JSON object, a regex, one of fixed strings, tool calls);
  its `key` (a hash of the canonical spec) names its compiled grammar in the cache. Schemas keep their key
  order: JSON output follows the declared property order, so it is part of the spec.
- compile_grammar(spec, tokenizer, vocab_size) -> CompiledGrammar, cached by key (a bounded LRU per tokenizer
  object); raises InvalidRequestError naming what could not be compiled and why (an invalid schema, a schema
  no value satisfies, a feature the grammar library does not support, a bad regex, an unknown tool).
- CompiledGrammar.constraint() -> a fresh Constraint for one generated sequence.
- Constraint, used by the engine at each decode step of one sequence:
    allowed() -> bool tensor [vocab_size] (CPU, a new tensor each call) of tokens allowed next, or None when
                 any token is (free text); ids the tokenizer does not know are never allowed; EOS ids are
                 allowed exactly when the output so far is complete
    accept(token_id)  -- advance past the sampled token; GrammarViolation if the grammar does not allow it
    finished          -- True once nothing but EOS can follow: the engine ends generation ("stop")
    fork()            -- an independent copy in the same state (n > 1 samples share a prompt)

Implemented with llguidance (Earley parser + lazy lexer over the token trie; ~20-40 us per mask for the
JSON schemas of bench grammar).

Constrained JSON (json_schema, tool-call arguments, a tool_calls text_schema) has one layout: json.dumps'
default separators ", " and ": " and no other whitespace (`{"a": [1, 2], "b": {}}`); strings use only the
escapes json.dumps writes (no "\\/", no "\\u" for printable characters).
NOTE why: chat templates write a tool call in the history as `{"name": ..., "arguments": args | tojson}`, and
tojson is json.dumps with its default separators. A call generated in exactly that form renders back to the
same text, so the next agent step's prompt starts with the previous prompt plus the generated tokens and the
prefix cache runs through the call. Flexible whitespace would also let a small model pad every gap.

Tool calls use the Hermes / Qwen2.5 format (promptstash.tools):
    <tool_call>\\n{"name": "<name>", "arguments": <JSON for that tool's parameters>}\\n</tool_call>
mode required / named: one call (several, separated by "\\n", when parallel), then EOS. Parallel calls: a
call identical (name and arguments) to an earlier one in the same output makes the constraint `finished`
(the engine stops; promptstash.tools drops the repeat), so a model cannot loop on one call.
mode auto: the output is one of
  - a bare call: optional whitespace, `{"name": "<a tool>", "arguments": <its JSON>}` (no tags), perhaps in a
    Markdown code fence ("```json\\n" or "```\\n" before, "\\n```" after), then EOS; that is, an output starting
    (after whitespace) with "{", "```json\\n{" or "```\\n{" must be such a call (small models often answer so:
    Qwen2.5-Coder-0.5B writes the fenced form; promptstash.tools recognises both given the tool names);
  - free text (any other start), until the model starts a tagged call; from there the
    call must be well formed and only further calls (if parallel) or EOS may follow;
  - with `text_schema`: instead of free text, JSON matching text_schema (a JSON output format together with
    tools), or tagged calls only.
When `<tool_call>` is one token (Qwen2.5) and there is no text_schema, auto mode is constrained only until the
output's start tells free text from a bare call: free text is then unconstrained (allowed() None) until
`<tool_call>` is sampled.
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import llguidance
import numpy as np
import torch

from promptstash.errors import InvalidRequestError
from promptstash.tools import CALL_END, CALL_START

GRAMMAR_KINDS = ("json_schema", "regex", "choice", "tool_calls")
TOOL_MODES = ("auto", "required", "named")
CACHE_SIZE = 256  # compiled grammars kept per tokenizer


@dataclass(frozen=True)
class GrammarSpec:
    kind: str  # one of GRAMMAR_KINDS
    source: str  # JSON of the schema, key order kept ("" = any JSON object) / the regex / JSON list of choices /
    #              for tool_calls: JSON list of {"name", "parameters"}
    tool_mode: str = "auto"  # tool_calls: auto (text or calls) | required (at least one call) | named
    tool_name: str | None = None  # tool_calls, mode "named": the one function to call
    parallel: bool = True  # tool_calls: more than one call allowed
    text_schema: str | None = None  # tool_calls, mode auto: JSON of the schema text must match instead of free
    #                                 text (a JSON output format with tools); None: free text. Checked (a bad
    #                                 schema is an error) but not used in modes required / named: a call is forced.

    @property
    def key(self) -> str:
        text = json.dumps([self.kind, self.source, self.tool_mode, self.tool_name, self.parallel, self.text_schema])
        return hashlib.sha256(text.encode()).hexdigest()

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | None) -> GrammarSpec:
        """A JSON value matching `schema`; None: any JSON object (OpenAI json_object)."""
        return cls("json_schema", "" if schema is None else _canonical(schema))

    @classmethod
    def regex(cls, pattern: str) -> GrammarSpec:
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices: list[str]) -> GrammarSpec:
        return cls("choice", json.dumps(list(choices)))

    @classmethod
    def tool_calls(cls, tools: list[Any], mode: str = "auto", name: str | None = None, parallel: bool = True,
                   text_schema: dict[str, Any] | bool | None = None) -> GrammarSpec:
        """tools: ToolDefs (promptstash.tools); text_schema: see the field ({"type": "object"}: any object)."""
        source = _canonical([{"name": t.name, "parameters": t.parameters} for t in tools])
        text = None if text_schema is None else _canonical(text_schema)
        return cls("tool_calls", source, mode, name, parallel, text)


def _canonical(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class Constraint(Protocol):
    def allowed(self) -> torch.Tensor | None: ...
    def accept(self, token_id: int) -> None: ...
    @property
    def finished(self) -> bool: ...
    def fork(self) -> Constraint: ...


class CompiledGrammar(Protocol):
    spec: GrammarSpec

    def constraint(self) -> Constraint: ...


class GrammarViolation(RuntimeError):
    """A token the grammar does not allow was accepted (the sampler did not apply the mask)."""


_BARE_OPENERS = (b"{", b"```json\n{", b"```\n{")  # after whitespace: the output is a bare call (auto mode)
_BARE_START = r"[ \t\r\n]*(\{|```(json)?\n\{)"
_JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}  # see NOTE above
_WHITESPACE = b" \t\r\n"
_UNSUPPORTED = ("Unimplemented key", "Unknown format", "not supported", "nsupported")


@dataclass(frozen=True)
class _Vocab:
    """llguidance's view of one tokenizer."""

    lltok: llguidance.LLTokenizer
    known: int  # ids the tokenizer knows (added tokens included); llguidance pads above them: never allowed
    words: int  # int32 words of llguidance's bitmask
    call_start: int | None  # id of "<tool_call>" when it is one token
    call_end: int | None  # id of "</tool_call>" when it is one token


class _Compiled:
    """A grammar compiled for one tokenizer and model vocabulary size."""

    def __init__(self, spec: GrammarSpec, vocab: _Vocab, vocab_size: int, matcher: llguidance.LLMatcher,
                 rest: llguidance.LLMatcher | None = None, text: llguidance.LLMatcher | None = None) -> None:
        self.spec = spec
        self.vocab = vocab
        self.vocab_size = vocab_size
        self._matcher = matcher  # never advanced: each constraint starts from a copy
        self._rest = rest  # auto tool mode with a one-token <tool_call>: the calls after that token
        self._text = text  # auto tool mode with a text_schema: the JSON text, the alternative to `matcher`
        self.trigger = vocab.call_start if rest is not None else None

    def constraint(self) -> Constraint:
        if self.spec.kind != "tool_calls":
            return self.matcher_constraint()
        log = _CallLog(self.vocab) if self.spec.parallel else None
        inner: _MatcherConstraint | _UnionConstraint = self.matcher_constraint()
        if self._text is not None:
            inner = _UnionConstraint([inner, _MatcherConstraint(self, self._text.deep_copy())])
        return _ToolConstraint(self, inner, self.trigger is not None, log)

    def matcher_constraint(self) -> _MatcherConstraint:
        return _MatcherConstraint(self, self._matcher.deep_copy())

    def rest_constraint(self) -> _MatcherConstraint:
        assert self._rest is not None
        return _MatcherConstraint(self, self._rest.deep_copy())


class _MatcherConstraint:
    """One sequence's llguidance matcher and its mask buffer."""

    __slots__ = ("_grammar", "_matcher", "_words")

    def __init__(self, grammar: _Compiled, matcher: llguidance.LLMatcher) -> None:
        self._grammar = grammar
        self._matcher = matcher
        self._words = np.zeros(grammar.vocab.words, dtype=np.int32)

    def allowed(self) -> torch.Tensor:
        words = self._words
        self._matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        if self._matcher.is_error():
            raise GrammarViolation(f"grammar matcher failed: {_reason(self._matcher.get_error())}")
        size, known = self._grammar.vocab_size, self._grammar.vocab.known
        bits = np.unpackbits(words.view(np.uint8), count=size, bitorder="little")
        if known < size:
            bits[known:] = 0
        return torch.from_numpy(bits.view(np.bool_))

    def accept(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            raise GrammarViolation(f"token {token_id} is not allowed by the grammar: "
                                   f"{_reason(self._matcher.get_error())}")

    @property
    def finished(self) -> bool:
        return self._matcher.is_stopped()

    def fork(self) -> _MatcherConstraint:
        return _MatcherConstraint(self._grammar, self._matcher.deep_copy())


class _UnionConstraint:
    """Output allowed by any of several matchers (llguidance cannot choose between a literal and a nested JSON
    grammar at one position: the calls and a JSON text both start with "{"). Each token advances the matchers
    that allow it; the others are dropped."""

    __slots__ = ("_alive",)

    def __init__(self, alive: list[_MatcherConstraint]) -> None:
        self._alive = alive

    def allowed(self) -> torch.Tensor:
        masks = [m.allowed() for m in self._alive]
        mask = masks[0]
        for other in masks[1:]:
            mask |= other
        return mask

    def accept(self, token_id: int) -> None:
        alive, error = [], None
        for matcher in self._alive:
            try:
                matcher.accept(token_id)
            except GrammarViolation as exc:
                error = exc
            else:
                alive.append(matcher)
        if not alive:
            assert error is not None
            raise error
        self._alive = alive

    @property
    def finished(self) -> bool:
        return all(m.finished for m in self._alive)

    def fork(self) -> _UnionConstraint:
        return _UnionConstraint([m.fork() for m in self._alive])


class _ToolConstraint:
    """A tool_calls grammar for one sequence. `_inner` is the matcher, or None in unconstrained free text (auto
    mode with a one-token <tool_call>: the matcher of the calls starts when that token is sampled); `_open`:
    auto mode with that token, nothing but whitespace written yet (the matcher decides between a bare call,
    free text and a tagged call); `_log`: the calls so far (parallel calls), to stop at a repeated one."""

    __slots__ = ("_grammar", "_inner", "_open", "_log", "_start")

    def __init__(self, grammar: _Compiled, inner: _MatcherConstraint | _UnionConstraint | None, open_: bool,
                 log: _CallLog | None) -> None:
        self._grammar = grammar
        self._inner = inner
        self._open = open_
        self._log = log
        self._start = b""  # while open: the output so far, leading whitespace dropped

    def allowed(self) -> torch.Tensor | None:
        return None if self._inner is None else self._inner.allowed()

    def accept(self, token_id: int) -> None:
        grammar = self._grammar
        if self._log is not None:
            self._log.push(token_id)
        if self._inner is None:
            if token_id == grammar.trigger:
                self._inner = grammar.rest_constraint()
            return
        self._inner.accept(token_id)
        if self._open:
            if token_id == grammar.trigger:
                self._open = False
                return
            self._start = (self._start + grammar.vocab.lltok.decode_bytes([token_id])).lstrip(_WHITESPACE)
            if any(self._start.startswith(opener) for opener in _BARE_OPENERS):
                self._open = False  # a bare call: the matcher holds it to the grammar
            elif self._start and not any(opener.startswith(self._start) for opener in _BARE_OPENERS):
                self._open = False
                self._inner = None  # free text: unconstrained until <tool_call>

    @property
    def finished(self) -> bool:
        return (self._inner is not None and self._inner.finished) or (self._log is not None and self._log.repeated)

    def fork(self) -> _ToolConstraint:
        fork = _ToolConstraint(self._grammar, None if self._inner is None else self._inner.fork(), self._open,
                               None if self._log is None else self._log.fork())
        fork._start = self._start
        return fork


_CALL_START_BYTES = CALL_START.encode()
_CALL_END_BYTES = CALL_END.encode()


class _CallLog:
    """The tool calls of one output so far; `repeated` once a call is identical (name and arguments, as JSON
    values) to an earlier one. Text outside calls is only looked at when the markers are not single tokens."""

    __slots__ = ("_vocab", "_text", "_in_call", "_seen", "repeated")

    def __init__(self, vocab: _Vocab) -> None:
        self._vocab = vocab
        self._text = bytearray()
        self._in_call = False
        self._seen: list[Any] = []
        self.repeated = False

    def push(self, token_id: int) -> None:
        vocab = self._vocab
        if vocab.call_start is not None and vocab.call_end is not None:
            if token_id == vocab.call_start:
                self._in_call, self._text = True, bytearray()
            elif token_id == vocab.call_end:
                self._in_call = False
                self._ended(bytes(self._text))
            elif self._in_call:
                self._text += vocab.lltok.decode_bytes([token_id])
            return
        self._text += vocab.lltok.decode_bytes([token_id])
        while True:
            start = self._text.find(_CALL_START_BYTES)
            if start < 0:
                del self._text[: max(0, len(self._text) - len(_CALL_START_BYTES) + 1)]
                return
            end = self._text.find(_CALL_END_BYTES, start + len(_CALL_START_BYTES))
            if end < 0:
                del self._text[:start]
                return
            self._ended(bytes(self._text[start + len(_CALL_START_BYTES):end]))
            del self._text[: end + len(_CALL_END_BYTES)]

    def _ended(self, body: bytes) -> None:
        try:
            value = json.loads(body)
            key: Any = (value.get("name"), json.dumps(value.get("arguments"), sort_keys=True)) \
                if isinstance(value, dict) else body.strip()
        except ValueError:
            key = body.strip()
        if key in self._seen:
            self.repeated = True
        else:
            self._seen.append(key)

    def fork(self) -> _CallLog:
        copy = _CallLog(self._vocab)
        copy._text, copy._in_call, copy._seen, copy.repeated = bytearray(self._text), self._in_call, \
            list(self._seen), self.repeated
        return copy


class _TokenizerGrammars:
    """The llguidance tokenizer of one tokenizer object and its compiled grammars (LRU by spec key)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = weakref.ref(tokenizer)
        self.lock = threading.Lock()
        self.compiled: OrderedDict[tuple[str, int], _Compiled] = OrderedDict()
        self._vocab: _Vocab | None = None
        self._vocab_lock = threading.Lock()

    def vocab(self) -> _Vocab:
        with self._vocab_lock:
            if self._vocab is None:
                tokenizer = self._tokenizer()
                assert tokenizer is not None  # the caller holds it
                self._vocab = _build_vocab(tokenizer)
            return self._vocab


_REGISTRY: weakref.WeakKeyDictionary[Any, _TokenizerGrammars] = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()


def _grammars_of(tokenizer: Any) -> _TokenizerGrammars:
    with _REGISTRY_LOCK:
        holder = _REGISTRY.get(tokenizer)
        if holder is None:
            holder = _REGISTRY[tokenizer] = _TokenizerGrammars(tokenizer)
        return holder


def compile_grammar(spec: GrammarSpec, tokenizer: Any, vocab_size: int) -> CompiledGrammar:
    """The grammar of `spec` for `tokenizer` (a promptstash Tokenizer) and a model with `vocab_size` output
    rows; cached (CACHE_SIZE per tokenizer, least recently used dropped). The first call for a tokenizer
    builds llguidance's token trie (about 1 s for a 150k vocabulary). InvalidRequestError when the spec
    cannot be compiled."""
    holder = _grammars_of(tokenizer)
    key = (spec.key, vocab_size)
    with holder.lock:
        hit = holder.compiled.get(key)
        if hit is not None:
            holder.compiled.move_to_end(key)
            return hit
    compiled = _compile(spec, holder.vocab(), vocab_size)
    with holder.lock:
        holder.compiled[key] = compiled
        while len(holder.compiled) > CACHE_SIZE:
            holder.compiled.popitem(last=False)
    return compiled


def _tokenizer_json(tokenizer: Any) -> str:
    """tokenizer.json text of a promptstash Tokenizer (wrapping a `tokenizers.Tokenizer`)."""
    hf = getattr(tokenizer, "hf_tokenizer", None) or getattr(tokenizer, "_tokenizer", None) or tokenizer
    return hf.to_str()


def _single_token(tokenizer: Any, text: str) -> int | None:
    token_id = tokenizer.token_to_id(text)
    return token_id if token_id is not None and tokenizer.encode(text) == [token_id] else None


def _build_vocab(tokenizer: Any) -> _Vocab:
    eos = sorted(tokenizer.eos_token_ids)
    try:
        lltok = llguidance.LLTokenizer(_tokenizer_json(tokenizer), eos_token=eos or None)
    except Exception as exc:  # the library raises plain ValueError / RuntimeError
        raise InvalidRequestError(f"constrained decoding is not available for this tokenizer: {exc}") from exc
    return _Vocab(lltok, min(tokenizer.vocab_size, lltok.vocab_size), (lltok.vocab_size + 31) // 32,
                  _single_token(tokenizer, CALL_START), _single_token(tokenizer, CALL_END))


def _reason(error: str) -> str:
    """The library's error without its state dump, on one line."""
    lines = [line.strip() for line in error.split("\n<state>")[0].splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    detail = next((line for line in lines[1:] if line.startswith("error:")), None)
    text = lines[0] if detail is None else f"{lines[0]} {detail}"
    return text if len(text) <= 500 else text[:497] + "..."


def _schema_problem(what: str, error: str) -> InvalidRequestError:
    reason = _reason(error)
    if any(marker in reason for marker in _UNSUPPORTED):
        kind = "it uses a JSON schema feature the grammar library (llguidance) does not support"
    elif reason.startswith("Unsatisfiable"):
        kind = "no JSON value satisfies it"
    else:
        kind = "invalid JSON schema"
    return InvalidRequestError(f"{what} could not be compiled: {kind}: {reason}")


def _with_options(schema: Any, what: str, top_type: str | None = None) -> dict[str, Any]:
    """`schema` (a JSON schema object or boolean) with our JSON options; `top_type` added when it has none."""
    if schema is True:
        schema = {}
    if schema is False:
        raise InvalidRequestError(f"{what} could not be compiled: no JSON value satisfies it: the schema is false")
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"{what} could not be compiled: invalid JSON schema: expected a JSON object, "
                                  f"got {type(schema).__name__}")
    schema = dict(schema)
    if top_type is not None and "type" not in schema:
        schema["type"] = top_type
    schema["x-guidance"] = _JSON_OPTIONS
    return schema


def _from_schema(schema: dict[str, Any], what: str) -> str:
    """llguidance's grammar for a JSON schema; a value it cannot even serialize (an integer beyond 64 bits, say)
    is a schema problem, not a server error."""
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema)
    except (ValueError, TypeError, OverflowError, RuntimeError) as exc:
        raise InvalidRequestError(f"{what} could not be compiled: invalid JSON schema: {exc}") from None


def _matcher(vocab: _Vocab, grammar: str) -> tuple[llguidance.LLMatcher, str]:
    try:
        matcher = llguidance.LLMatcher(vocab.lltok, grammar, log_level=0)
    except (ValueError, TypeError, OverflowError, RuntimeError) as exc:
        raise InvalidRequestError(f"grammar could not be compiled: {exc}") from None
    return matcher, matcher.get_error() if matcher.is_error() else ""


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _compile(spec: GrammarSpec, vocab: _Vocab, vocab_size: int) -> _Compiled:
    try:
        spec.source.encode("utf-8")
    except UnicodeEncodeError as exc:
        what = spec.kind if spec.kind != "tool_calls" else "tools"
        raise InvalidRequestError(f"{what} holds text that is not valid Unicode (a lone surrogate such as "
                                  f"\\ud800 at character {exc.start})") from None
    if spec.kind == "json_schema":
        schema = {"type": "object"} if spec.source == "" else _load(spec.source, "json_schema")
        grammar = _from_schema(_with_options(schema, "json_schema"), "json_schema")
        matcher, error = _matcher(vocab, grammar)
        if error:
            raise _schema_problem("json_schema", error)
        return _Compiled(spec, vocab, vocab_size, matcher)
    if spec.kind == "regex":
        matcher, error = _matcher(vocab, llguidance.LLMatcher.grammar_from_regex(spec.source))
        if error:
            raise InvalidRequestError(f"regex could not be compiled: {_reason(error)}")
        return _Compiled(spec, vocab, vocab_size, matcher)
    if spec.kind == "choice":
        choices = _load(spec.source, "choice")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise InvalidRequestError("choice must be a non-empty list of strings")
        matcher, error = _matcher(vocab, "start: " + " | ".join(_literal(c) for c in choices))
        if error:
            raise InvalidRequestError(f"choice could not be compiled: {_reason(error)}")
        return _Compiled(spec, vocab, vocab_size, matcher)
    if spec.kind == "tool_calls":
        return _compile_tools(spec, vocab, vocab_size)
    raise InvalidRequestError(f"unknown grammar kind {spec.kind!r}; expected one of {', '.join(GRAMMAR_KINDS)}")


def _load(source: str, what: str) -> Any:
    try:
        return json.loads(source)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"{what} is not valid JSON: {exc}") from exc


def _compile_tools(spec: GrammarSpec, vocab: _Vocab, vocab_size: int) -> _Compiled:
    tools = _load(spec.source, "tools")
    if not isinstance(tools, list) or not tools:
        raise InvalidRequestError("tool calls need at least one tool")
    if spec.tool_mode not in TOOL_MODES:
        raise InvalidRequestError(f"unknown tool mode {spec.tool_mode!r}; expected one of {', '.join(TOOL_MODES)}")
    if spec.tool_mode == "named":
        names = [t.get("name") for t in tools if isinstance(t, dict)]
        if spec.tool_name not in names:
            raise InvalidRequestError(f"tool_choice names the function {spec.tool_name!r}, which is not among the "
                                      f"tools ({', '.join(repr(n) for n in names)})")
        tools = [t for t in tools if t.get("name") == spec.tool_name][:1]
    rules = []
    for index, tool in enumerate(tools):
        name = tool.get("name") if isinstance(tool, dict) else None
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(f"tool {index} has no name")
        what = f"parameters of tool {name!r}"
        params = _with_options(tool.get("parameters", {"type": "object"}), what, top_type="object")
        _, error = _matcher(vocab, _from_schema(params, what))
        if error:
            raise _schema_problem(what, error)
        head = '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '
        rules.append(f"call_{index}: {_literal(head)} args_{index} \"}}\"\nargs_{index}: %json {json.dumps(params)}")
    text = None
    if spec.text_schema is not None:
        what = "the output format's schema"
        text, error = _matcher(vocab, _from_schema(_with_options(_load(spec.text_schema, what), what), what))
        if error:
            raise _schema_problem(what, error)
    start = f"<[{vocab.call_start}]>" if vocab.call_start is not None else _literal(CALL_START)
    end = f"<[{vocab.call_end}]>" if vocab.call_end is not None else _literal(CALL_END)
    more = ' ("\\n" block)*' if spec.parallel else ""
    lines = [
        "call: " + " | ".join(f"call_{i}" for i in range(len(rules))),
        f'block: {start} "\\n" call "\\n" {end}',
        f'rest: "\\n" call "\\n" {end}{more}',
        'bare: LEAD? call | LEAD? "```json\\n" call "\\n```" | LEAD? "```\\n" call "\\n```"',
        r"LEAD: /[ \t\r\n]+/",
        *rules,
    ]
    rest = None
    if spec.tool_mode != "auto":
        top = f"start: block{more}"
    elif text is not None:
        top = f"start: bare | LEAD? block{more}"  # or the JSON text: a second matcher (_UnionConstraint)
    elif vocab.call_start is not None:
        # the matcher decides only the output's form (its first non-whitespace token): free text is then
        # unconstrained, and the calls after a sampled <tool_call> token get the matcher of `rest`
        top = f"start: bare | TEXT | LEAD? {start} rest"
        lines.append(rf"TEXT: /(?s:.*)/ & ~/{_BARE_START}(?s:.*)/")
        rest = _tool_matcher(vocab, ["start: rest", *lines])
    else:
        top = "start: bare | TEXT | head rest"
        lines += [
            rf"TEXT: /(?s:.*)/ & ~/(?s:.*){_regex_escape(CALL_START)}(?s:.*)/ & ~/{_BARE_START}(?s:.*)/",
            rf"head[lazy]: /(?s:.*){_regex_escape(CALL_START)}/ & ~/{_BARE_START}(?s:.*)/",
        ]
    return _Compiled(spec, vocab, vocab_size, _tool_matcher(vocab, [top, *lines]), rest,
                     text if spec.tool_mode == "auto" else None)


def _tool_matcher(vocab: _Vocab, lines: list[str]) -> llguidance.LLMatcher:
    matcher, error = _matcher(vocab, llguidance.LLMatcher.grammar_from_lark("\n".join(lines)))
    if error:
        raise InvalidRequestError(f"tool call grammar could not be compiled: {_reason(error)}")
    return matcher


def _regex_escape(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_<>" else "\\" + c for c in text)
