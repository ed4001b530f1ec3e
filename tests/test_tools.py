"""Tool-call output parsing: parse_tool_calls and the streaming ToolCallStream agree at every split."""

from __future__ import annotations

import json
import re

import pytest

from promptstash.tools import (
    ArgsDelta,
    CallEnd,
    CallStart,
    TextDelta,
    ToolCall,
    ToolCallStream,
    ToolEvent,
    parse_tool_calls,
)

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
SAMPLES = [
    "just text, no calls at all",
    WEATHER,
    "Let me check the weather.\n" + WEATHER,
    WEATHER + "\n" + WEATHER.replace("Paris", "Oslo"),
    # strings holding the end tag, braces, escaped quotes; nested values; unusual spacing
    '<tool_call>\n{"name":"f","arguments":{"s":"a </tool_call> {b} \\"c\\" \\\\","n":[1,{"x":null}],"t":true}}'
    "\n</tool_call>",
    '<tool_call>\n{ "name" : "f" , "arguments" :\n  {\n    "a": 1\n  }\n}\n</tool_call>',
    # arguments written as a JSON string, keys in another order, no arguments
    '<tool_call>\n{"name": "f", "arguments": "{\\"k\\": 1}"}\n</tool_call>',
    '<tool_call>\n{"arguments": {"q": "x"}, "name": "search"}\n</tool_call>',
    '<tool_call>\n{"name": "ping"}\n</tool_call>',
    # not calls: malformed body, a tag at the end, a lone "<"
    "text <tool_call>\n{not json}\n</tool_call> more",
    "a < b and c <tool_ca",
    "unicode ü 東京 😀 " + WEATHER,
    # cut short by max_tokens inside the arguments
    'I will call <tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
]
NAMES = ("get_weather", "f", "search")
BARE = '{"name": "get_weather", "arguments": {"city": "Lima", "unit": "c"}}'
BARE_SAMPLES = [
    BARE,
    "\n " + BARE + "\n",
    '{ "name" : "f", "arguments" : "{\\"k\\": 1}" }',
    BARE + " and more",  # not one bare call: text
    '{"name": "nope", "arguments": {}}',  # not a tool
    '{"answer": 42, "name": "get_weather"}',  # a JSON text (an output format), not a call
    '{"name": "get_weather"}',
    BARE[:-8],  # cut short
    BARE + "\n" + WEATHER,
    # in a Markdown code fence (Qwen2.5-Coder's habit), also pretty-printed; a code block stays text
    "```json\n" + BARE + "\n```",
    "```\n" + BARE + "\n```\n",
    '```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Lima"\n  }\n}\n```',
    "```python\nprint(1)\n```",
    "```json\n" + BARE + "\n``` and more",
    # repeated calls: the repeat is dropped, a different one kept
    WEATHER + "\n" + WEATHER + "\n" + WEATHER.replace("Paris", "Oslo"),
    WEATHER + "\n" + WEATHER.replace('"Paris", "unit": "c"', '"Paris",  "unit":"c"'),
]


def _collect(events: list[ToolEvent]) -> tuple[str, list[tuple[str, str]]]:
    """Content and (name, arguments) per call from events, checking their order."""
    text, names, args, open_calls, ended = "", {}, {}, set(), set()
    for event in events:
        if isinstance(event, TextDelta):
            assert event.text and not open_calls, event
            text += event.text
        elif isinstance(event, CallStart):
            assert event.index == len(names) and not open_calls
            assert re.fullmatch(r"call_[0-9a-f]{24}", event.id)
            names[event.index], args[event.index] = event.name, ""
            open_calls.add(event.index)
        elif isinstance(event, ArgsDelta):
            assert event.index in open_calls and event.text
            args[event.index] += event.text
        else:
            assert isinstance(event, CallEnd) and event.index in open_calls
            open_calls.remove(event.index)
            ended.add(event.index)
    assert not open_calls and ended == set(names)
    return text, [(names[i], args[i]) for i in sorted(names)]


def _stream(pieces: list[str], names: tuple[str, ...] | None = None
            ) -> tuple[str, list[tuple[str, str]], ToolCallStream]:
    stream = ToolCallStream(names)
    events: list[ToolEvent] = []
    for piece in pieces:
        events += stream.feed(piece)
    events += stream.finish()
    content, calls = _collect(events)
    return content, calls, stream


def _plain(calls: list[ToolCall]) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in calls]


def test_plain_text() -> None:
    assert parse_tool_calls("  hello world \n") == ("hello world", [])


def test_one_call_with_content() -> None:
    content, calls = parse_tool_calls("Let me check.\n" + WEATHER)
    assert content == "Let me check."
    assert _plain(calls) == [("get_weather", '{"city": "Paris", "unit": "c"}')]
    assert json.loads(calls[0].arguments) == {"city": "Paris", "unit": "c"}


def test_parallel_calls_get_distinct_ids() -> None:
    content, calls = parse_tool_calls(WEATHER + "\n" + WEATHER.replace("Paris", "Oslo"))
    assert content == ""
    assert [json.loads(c.arguments)["city"] for c in calls] == ["Paris", "Oslo"]
    assert calls[0].id != calls[1].id and all(re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in calls)


def test_arguments_as_written() -> None:
    content, calls = parse_tool_calls(SAMPLES[4])
    assert content == ""
    assert json.loads(calls[0].arguments) == {"s": 'a </tool_call> {b} "c" \\', "n": [1, {"x": None}], "t": True}
    assert calls[0].arguments.startswith('{"s":"a </tool_call>')
    assert parse_tool_calls(SAMPLES[5])[1][0].arguments == '{\n    "a": 1\n  }'


def test_string_arguments_other_key_order_and_missing_arguments() -> None:
    assert _plain(parse_tool_calls(SAMPLES[6])[1]) == [("f", '{"k": 1}')]
    assert _plain(parse_tool_calls(SAMPLES[7])[1]) == [("search", '{"q": "x"}')]
    assert _plain(parse_tool_calls(SAMPLES[8])[1]) == [("ping", "{}")]


def test_malformed_calls_stay_text() -> None:
    assert parse_tool_calls(SAMPLES[9]) == ("text <tool_call>\n{not json}\n</tool_call> more", [])
    assert parse_tool_calls(SAMPLES[10]) == ("a < b and c <tool_ca", [])
    assert parse_tool_calls('hi <tool_call>\n{"nam') == ('hi <tool_call>\n{"nam', [])


def test_call_cut_short_keeps_what_was_written() -> None:
    content, calls = parse_tool_calls(SAMPLES[12])
    assert content == "I will call"
    assert _plain(calls) == [("get_weather", '{"city": "Par')]


@pytest.mark.parametrize("names", [None, NAMES], ids=["no-names", "names"])
@pytest.mark.parametrize("sample", SAMPLES + BARE_SAMPLES)
def test_stream_matches_parse_at_every_split(sample: str, names: tuple[str, ...] | None) -> None:
    content, calls = parse_tool_calls(sample, names)
    expected = (content, _plain(calls))
    for cut in range(len(sample) + 1):
        got_content, got_calls, stream = _stream([sample[:cut], sample[cut:]], names)
        assert (got_content, got_calls) == expected, cut
        assert (stream.content, _plain(stream.calls)) == expected
    for cut in range(1, len(sample)):  # three pieces, the middle one a single character
        assert _stream([sample[:cut], sample[cut], sample[cut + 1:]], names)[:2] == expected
    assert _stream(list(sample), names)[:2] == expected


def test_bare_call_needs_the_tool_names() -> None:
    assert parse_tool_calls(BARE) == (BARE, [])
    for sample in (BARE, "\n " + BARE + "\n"):
        assert _plain(parse_tool_calls(sample, NAMES)[1]) == [("get_weather", '{"city": "Lima", "unit": "c"}')]
        assert parse_tool_calls(sample, NAMES)[0] == ""
    assert _plain(parse_tool_calls(BARE_SAMPLES[2], NAMES)[1]) == [("f", '{"k": 1}')]
    assert _plain(parse_tool_calls(BARE_SAMPLES[6], NAMES)[1]) == []  # no arguments: not the bare form


def test_bare_lookalikes_stay_text() -> None:
    for sample in [*BARE_SAMPLES[3:6], *BARE_SAMPLES[12:14]]:
        assert parse_tool_calls(sample, NAMES) == (sample.strip(), [])


def test_bare_call_in_a_code_fence() -> None:
    for sample in BARE_SAMPLES[9:12]:
        content, calls = parse_tool_calls(sample, NAMES)
        assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == \
            [("get_weather", json.loads(BARE)["arguments"] if "unit" in sample else {"city": "Lima"})]
    stream = ToolCallStream(NAMES)
    assert stream.feed("``") == [] and stream.feed("`py") == [TextDelta("```py")]


def test_bare_call_cut_short_is_a_call() -> None:
    content, calls = parse_tool_calls(BARE[:-8], NAMES)
    assert (content, _plain(calls)) == ("", [("get_weather", '{"city": "Lima", "unit')])


def test_stream_holds_a_bare_call_only_while_it_may_be_one() -> None:
    stream = ToolCallStream(NAMES)
    assert stream.feed(BARE[:-1]) == []
    assert stream.feed("}") == []  # more text may follow: then it is text
    events = stream.finish()
    assert [type(e) for e in events] == [CallStart, ArgsDelta, CallEnd]
    assert events[1].text == '{"city": "Lima", "unit": "c"}'
    stream = ToolCallStream(NAMES)
    assert stream.feed(' {"na') == []
    assert stream.feed('me": "sea') == []
    assert stream.feed('rch_all", "arguments"') == [TextDelta('{"name": "search_all", "arguments"')]
    stream = ToolCallStream(NAMES)
    assert stream.feed('{"answer": 4') == [TextDelta('{"answer": 4')]  # a JSON text streams on
    stream = ToolCallStream(NAMES)
    assert stream.feed("Sure: ") == [TextDelta("Sure:")]
    assert stream.feed(BARE) == [TextDelta(" " + BARE)]  # a bare call only as the whole output


def test_repeated_calls_are_dropped_and_held_until_complete() -> None:
    content, calls = parse_tool_calls(BARE_SAMPLES[14])
    assert content == "" and [json.loads(c.arguments)["city"] for c in calls] == ["Paris", "Oslo"]
    assert len(parse_tool_calls(BARE_SAMPLES[15])[1]) == 1  # equal as JSON values, written differently
    stream = ToolCallStream()
    events = stream.feed(WEATHER[:-12])
    assert [type(e) for e in events] == [CallStart, ArgsDelta]  # the first call streams
    stream.feed(WEATHER[-12:] + "\n")
    assert stream.feed(WEATHER[:-12]) == []  # a second call is held until complete
    assert stream.feed(WEATHER[-12:]) == []  # ... and dropped: it repeats the first
    other = WEATHER.replace("Paris", "Oslo")
    assert stream.feed("\n" + other[:-12]) == []
    events = stream.feed(other[-12:])
    assert [type(e) for e in events] == [CallStart, ArgsDelta, CallEnd] and events[0].index == 1
    assert stream.finish() == [] and len(stream.calls) == 2


def test_stream_emits_early_and_holds_back_only_a_possible_tag() -> None:
    stream = ToolCallStream()
    assert stream.feed("Hello world") == [TextDelta("Hello world")]
    assert stream.feed(" and <tool") == [TextDelta(" and")]  # " <tool" could begin a call
    events = stream.feed('_call>\n{"name": "get_weather", "arguments": {"ci')
    assert [type(e) for e in events] == [CallStart, ArgsDelta]
    assert events[0].name == "get_weather" and events[1] == ArgsDelta(0, '{"ci')
    assert stream.feed('ty": "Paris"}}\n</tool_call>') == [ArgsDelta(0, 'ty": "Paris"}'), CallEnd(0)]
    assert stream.finish() == []
    assert stream.content == "Hello world and"
    assert _plain(stream.calls) == [("get_weather", '{"city": "Paris"}')]


def test_stream_text_after_a_false_start() -> None:
    stream = ToolCallStream()
    assert stream.feed("a <tool") == [TextDelta("a")]
    assert stream.feed("box> b") == [TextDelta(" <toolbox> b")]
