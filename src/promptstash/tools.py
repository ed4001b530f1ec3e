"""Tool calling: tool definitions, the calls a model makes, and the model's tool-call text format.

CONTRACT (shared by the chat template rendering, the grammar and both APIs):
- ToolDef: one function the model may call (name, description, JSON-schema parameters); ttl_class marks an
  Anthropic cache_control breakpoint right after this tool's definition in the prompt.
- ToolCall: one call, with arguments as JSON text (as OpenAI sends and returns them).
- The model writes calls in the Hermes / Qwen2.5 format the chat template teaches it:

      <tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>

  parse_tool_calls(text) splits finished output into (content, calls); ToolCallStream does it incrementally
  for streaming (text deltas, then per call: its name once known, then argument deltas).
- parse_tool_calls(text) is ToolCallStream fed the whole text, so both give the same content and the same
  calls (arguments: the arguments value exactly as the model wrote it; a JSON string value is decoded).
- Streaming never emits as text what turns out to be a call: a tail that could begin "<tool_call>" is held
  back. Content has no leading whitespace, and whitespace right before a call or at the end is dropped.
- A call is recognised once `{"name": "<string>", "arguments": ` and the first character of the arguments
  are written; from then on it is a call even if cut short (max_tokens): its arguments are what was written.
  A call written another way (keys in another order, extra keys) is recognised when its `</tool_call>`
  arrives and the body parses as a JSON object with a string "name"; one that never parses stays text.
- Bare calls: given the tool names (`names=`), an output that is, apart from surrounding whitespace, one JSON
  object `{"name": "<one of names>", "arguments": {...}}` (no tags), perhaps in a Markdown code fence
  ("```json\\n" or "```\\n" ... "\\n```"), is that one call (small models often answer so, and the tool_calls
  grammar of mode auto allows it). Streaming holds an output starting with "{" or "`" back while it can still be
  a bare call (so a JSON text or a code block is held only until it differs), and emits the call at the end.
  Cut short inside the arguments, it is still a call (as a tagged one).
- A call identical to an earlier call of the same output (same name, arguments equal as JSON values) is
  dropped: a small model may repeat a call (the grammar stops generation there). Streaming therefore holds
  every call after the first until it is complete.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

CALL_START = "<tool_call>"
CALL_END = "</tool_call>"


@dataclass(frozen=True, eq=False)
class ToolDef:
    name: str
    description: str | None = None
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    ttl_class: str | None = None  # a cache breakpoint right after this tool's definition (Anthropic cache_control)

    def template_json(self) -> dict[str, Any]:
        """The OpenAI-style function definition chat templates expect:
        {"type": "function", "function": {"name", "description", "parameters"}}."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int  # 0, 1, ... in the order calls appear in the output
    id: str
    name: str


@dataclass(frozen=True)
class ArgsDelta:
    index: int
    text: str


@dataclass(frozen=True)
class CallEnd:
    index: int


ToolEvent = TextDelta | CallStart | ArgsDelta | CallEnd

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*', re.DOTALL)
_DECODER = json.JSONDecoder()


def new_call_id() -> str:
    """An OpenAI-style tool call id: "call_" and 24 random hex digits."""
    return "call_" + uuid.uuid4().hex[:24]


def _partial_start(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


def _whole_call(body: str) -> tuple[str, str] | None:
    """(name, arguments text) of a complete call body, or None when it is not one."""
    text = body.strip()
    try:
        value, end = _DECODER.raw_decode(text)
    except json.JSONDecodeError:
        return None
    if end != len(text) or not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    if "arguments" not in value:
        return value["name"], "{}"
    if isinstance(value["arguments"], str):
        return value["name"], value["arguments"]
    if not isinstance(value["arguments"], dict):
        return None
    return value["name"], _raw_member(text, "arguments")


def _raw_member(text: str, key: str) -> str:
    """The text of top-level member `key` of the JSON object `text` (known to parse), as written."""
    pos = text.index("{") + 1
    found = ""
    while True:
        pos = len(text) - len(text[pos:].lstrip())
        if text[pos] == "}":
            return found
        name, pos = _DECODER.raw_decode(text, pos)
        pos = text.index(":", pos) + 1
        pos = len(text) - len(text[pos:].lstrip())
        _, end = _DECODER.raw_decode(text, pos)
        if name == key:
            found = text[pos:end]  # the last duplicate wins, as in json.loads
        pos = len(text) - len(text[end:].lstrip())
        if text[pos] == ",":
            pos += 1


class ToolCallStream:
    """Splits a model's output, given as text deltas, into content text and tool calls (see the module doc)."""

    def __init__(self, names: Iterable[str] | None = None) -> None:
        self._names = None if names is None else frozenset(names)
        self._bare_open = self._names is not None  # the output may still be a bare call (nothing decided yet)
        self._held: list[ToolEvent] | None = None  # the events of a call after the first, until it is complete
        self._pending = ""  # text not yet emitted (TEXT) or the call's body so far (CALL)
        self._in_call = False
        self._held_space = ""  # whitespace after the content so far: emitted only if more content follows
        self._space_before_call = ""
        self._content_started = False
        self._index = 0  # of the next call
        # the call being streamed, once its head is recognised:
        self._call: tuple[int, str, str] | None = None  # (index, id, name)
        self._args: list[str] = []
        self._scan = _ValueScanner()
        self._tail = ""  # after the arguments value: up to </tool_call>
        self.calls: list[ToolCall] = []  # finished calls, in order
        self.content = ""  # content emitted so far

    def feed(self, delta: str) -> list[ToolEvent]:
        """Events for `delta`, the next piece of output text."""
        self._pending += delta
        events: list[ToolEvent] = []
        while self._step(events, final=False):
            pass
        return events

    def finish(self) -> list[ToolEvent]:
        """Events for everything still held back, at the end of the output."""
        events: list[ToolEvent] = []
        while self._step(events, final=True):
            pass
        if self._in_call:
            if self._call is not None:
                self._end_call(events)
            else:  # never became a call: it was text
                self._held_space = self._space_before_call
                self._text(events, CALL_START + self._pending)
            self._in_call = False
        elif self._pending:
            self._text(events, self._pending)
        self._pending = ""
        self._held_space = ""
        return events

    def _step(self, events: list[ToolEvent], final: bool) -> bool:
        """Consume what can be decided now; True when called again may make progress."""
        if self._bare_open:
            return self._bare(events, final)
        if not self._in_call:
            start = self._pending.find(CALL_START)
            if start < 0:
                keep = 0 if final else _partial_start(self._pending, CALL_START)
                self._text(events, self._pending[: len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep:]
                return False
            self._text(events, self._pending[:start])
            self._space_before_call, self._held_space = self._held_space, ""
            self._pending = self._pending[start + len(CALL_START):]
            self._in_call = True
            return True
        if self._call is None:
            return self._head(events)
        if not self._scan.done:
            used = self._scan.feed(self._pending, final)
            if used:
                if not self._scan.is_string:
                    self._args_delta(events, self._pending[:used])
                self._pending = self._pending[used:]
            if self._scan.done and self._scan.is_string:
                self._args_delta(events, self._scan.string_value or "")
            return self._scan.done and bool(self._pending)
        self._tail += self._pending
        self._pending = ""
        end = self._tail.find(CALL_END)
        if end < 0:
            return False
        self._pending = self._tail[end + len(CALL_END):]
        self._end_call(events)
        return True

    def _bare(self, events: list[ToolEvent], final: bool) -> bool:
        """At the start of the output, with tool names: hold what may be a bare call, emit it once complete."""
        assert self._names is not None
        if not self._pending.strip() and not final:
            return False
        if self._pending.lstrip()[:1] in ("{", "`"):
            found = _bare_call(self._pending, self._names, final)
            if found == "hold":
                return False
            if isinstance(found, tuple):
                self._bare_open = False
                self._pending = ""
                self._whole(events, *found)
                return False
        self._bare_open = False
        return True

    def _head(self, events: list[ToolEvent]) -> bool:
        match = _HEAD.match(self._pending)
        if match is not None and match.end() < len(self._pending):
            self._call = (self._index, new_call_id(), json.loads(match.group(1)))
            self._index += 1
            if self.calls:
                self._held = []
            self._call_event(events, CallStart(*self._call))
            self._pending = self._pending[match.end():]
            return True
        end = self._pending.find(CALL_END)
        while end >= 0:
            whole = _whole_call(self._pending[:end])
            if whole is not None:
                self._whole(events, *whole)
                self._pending = self._pending[end + len(CALL_END):]
                self._in_call = False
                return True
            end = self._pending.find(CALL_END, end + 1)
        return False

    def _whole(self, events: list[ToolEvent], name: str, arguments: str) -> None:
        """A call known whole at once (emitted unless it repeats an earlier one)."""
        call = ToolCall(new_call_id(), name, arguments)
        if self._repeats(call):
            return
        index = self._index
        self._index += 1
        events += [CallStart(index, call.id, name), *([ArgsDelta(index, arguments)] if arguments else []),
                   CallEnd(index)]
        self.calls.append(call)

    def _call_event(self, events: list[ToolEvent], event: ToolEvent) -> None:
        (self._held if self._held is not None else events).append(event)

    def _args_delta(self, events: list[ToolEvent], text: str) -> None:
        if text and self._call is not None:
            self._args.append(text)
            self._call_event(events, ArgsDelta(self._call[0], text))

    def _end_call(self, events: list[ToolEvent]) -> None:
        assert self._call is not None
        index, call_id, name = self._call
        call = ToolCall(call_id, name, "".join(self._args))
        if self._repeats(call):
            self._index -= 1  # its events were held: nothing was emitted for it
        else:
            events += [*(self._held or []), CallEnd(index)]
            self.calls.append(call)
        self._held = None
        self._call, self._args, self._scan, self._tail = None, [], _ValueScanner(), ""
        self._in_call = False

    def _repeats(self, call: ToolCall) -> bool:
        value = _json_value(call.arguments)
        return any(c.name == call.name and _json_value(c.arguments) == value for c in self.calls)

    def _text(self, events: list[ToolEvent], text: str) -> None:
        """Emit content text, holding back trailing whitespace and dropping leading whitespace."""
        if not text:
            return
        body = text.rstrip()
        if not body:
            if self._content_started:
                self._held_space += text
            return
        space = text[len(body):]
        if not self._content_started:
            body = body.lstrip()
            self._content_started = True
        out = self._held_space + body
        self._held_space = space
        self.content += out
        events.append(TextDelta(out))


class _ValueScanner:
    """Finds where one JSON value ends in text arriving piece by piece (only its extent, not its validity)."""

    def __init__(self) -> None:
        self.done = False
        self.string_value: str | None = None  # the decoded value when it is a JSON string (once done)
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._kind = ""  # "{", "[", '"' or "p" (number, true, false, null)
        self._raw = ""

    def feed(self, text: str, final: bool) -> int:
        """Scan `text` (what follows the part already scanned); return how many characters belong to the value."""
        for i, char in enumerate(text):
            if not self._kind:
                self._kind = char if char in '{["' else "p"
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif char == "\\":
                    self._escape = True
                elif char == '"':
                    self._in_string = False
                    if self._kind == '"':
                        return self._finish(text, i + 1)
            elif self._kind == "p":
                if char in ",}] \t\r\n":
                    return self._finish(text, i)
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return self._finish(text, i + 1)
        if final:
            return self._finish(text, len(text))
        self._raw += text
        return len(text)

    @property
    def is_string(self) -> bool:
        """The value is a JSON string (arguments given as JSON text): streamed whole, decoded, once done."""
        return self._kind == '"'

    def _finish(self, text: str, used: int) -> int:
        self._raw += text[:used]
        self.done = True
        if self.is_string:
            try:
                self.string_value = json.loads(self._raw)
            except json.JSONDecodeError:  # cut short
                self.string_value = self._raw[1:]
        return used


def _json_value(text: str) -> Any:
    """A JSON text's value (compared to spot a repeated call); text that does not parse stands for itself."""
    try:
        return ("json", json.loads(text))
    except ValueError:
        return ("text", text)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _expect(text: str, pos: int, literal: str) -> int | str:
    """Position after `literal` at `pos` (whitespace skipped first); "hold" if the text ends inside it, "no"."""
    pos = _skip_space(text, pos)
    piece = text[pos:pos + len(literal)]
    if not literal.startswith(piece):
        return "no"
    return pos + len(literal) if len(piece) == len(literal) else "hold"


_FENCES = ("```json\n", "```\n")


def _bare_call(text: str, names: frozenset[str], final: bool) -> tuple[str, str] | str:
    """Whether `text` (the output so far, starting with "{" or "`" after whitespace) is a bare call naming one of
    `names`: (name, arguments) once decided (only when final), "hold" while it may still be one, else "no"."""
    pos: int | str = _skip_space(text, 0)
    fenced = text.startswith("`", pos)
    if fenced:
        opener = next((f for f in _FENCES if text.startswith(f, pos)), None)
        if opener is None:
            return "hold" if not final and any(f.startswith(text[pos:]) for f in _FENCES) else "no"
        pos += len(opener)
    for literal in ("{", '"name"', ":"):
        pos = _expect(text, pos, literal) if isinstance(pos, int) else pos
    if not isinstance(pos, int):
        return "no" if final else pos
    start = _skip_space(text, pos)
    scan = _ValueScanner()
    if start == len(text) or text[start] != '"':
        return "no" if final or start < len(text) else "hold"
    used = scan.feed(text[start:], final=False)
    if not scan.done:
        return "no" if final else "hold"
    name = json.loads(text[start:start + used])
    if name not in names:
        return "no"
    pos = start + used
    for literal in (",", '"arguments"', ":"):
        pos = _expect(text, pos, literal) if isinstance(pos, int) else pos
    if not isinstance(pos, int):
        return "no" if final else pos
    start = _skip_space(text, pos)
    if start == len(text):
        return "no" if final else "hold"
    if text[start] not in '{"':
        return "no"
    scan = _ValueScanner()
    used = scan.feed(text[start:], final)
    arguments = (scan.string_value or "") if scan.is_string else text[start:start + used].rstrip()
    rest = text[start + used:].strip()
    if rest and (rest[0] != "}" or not (fenced and "```".startswith(rest[1:].strip()) or not rest[1:].strip())):
        return "no"
    return (name, arguments) if final else "hold"


def parse_tool_calls(text: str, names: Iterable[str] | None = None) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a finished output: the same as streaming it through ToolCallStream(names)."""
    stream = ToolCallStream(names)
    stream.feed(text)
    stream.finish()
    return stream.content, stream.calls
