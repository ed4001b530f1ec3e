"""prompts.render with tools, tool calls, tool results, tool breakpoints and assistant prefill (continue_final).

Fast tests use the tiny ChatML tokenizer (its template has Qwen2.5's tool support); the real-template tests
compare with transformers' apply_chat_template on the default model's directory, token for token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from real_model_helpers import default_model_dir
from test_tokenizer import build_tokenizer_dir

from promptstash.errors import InvalidRequestError
from promptstash.models.tokenizer import MarkedJSON, Tokenizer
from promptstash.prompts import ChatMessage, TextBlock, render
from promptstash.tools import ToolCall, ToolDef

WEATHER = ToolDef("get_weather", "Current weather in a city",
                  {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]})
ADD = ToolDef("add", None, {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}})


def msg(role: str, text: str = "", **kw) -> ChatMessage:
    return ChatMessage(role, (TextBlock(text),), **kw)


CONVERSATION = [
    msg("system", "Be brief."),
    msg("user", "Weather in Paris, and 2+3? Ünïcode 東京"),
    msg("assistant", "", tool_calls=(ToolCall("c1", "get_weather", '{"city": "Paris", "unit": "C"}'),
                                     ToolCall("c2", "add", '{"a": 2, "b": 3}'))),
    msg("tool", "sunny, 21 °C", tool_call_id="c1", name="get_weather"),
    msg("tool", "5", tool_call_id="c2", name="add"),
    msg("assistant", "Sunny, 21 °C; 5."),
    msg("user", "And Rome?"),
    msg("assistant", "Let me check.", tool_calls=(ToolCall("c3", "get_weather", '{"city": "Rome"}'),)),
    msg("tool", '{"sky": "clear"}', tool_call_id="c3", name="get_weather"),
]


def as_dicts(messages: list[ChatMessage]) -> list[dict]:
    """The same conversation in the shape transformers' apply_chat_template takes."""
    out = []
    for m in messages:
        d: dict = {"role": m.role, "content": "\n".join(b.text for b in m.blocks)}
        if m.tool_calls:
            d["tool_calls"] = [{"type": "function", "id": c.id,
                                "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                               for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            d["name"] = m.name
        out.append(d)
    return out


def tokens_ending_by(tok: Tokenizer, text: str, offset: int) -> int:
    """How many tokens of `text` (tokenized whole) end at or before character `offset`."""
    _, ends = tok.token_ends(text)
    return sum(1 for end in ends if end <= offset)


def clean_text(tok: Tokenizer, token_ids: list[int]) -> str:
    return tok.decode(token_ids, skip_special_tokens=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_dir(build_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def test_tools_and_tool_messages_render(tiny: Tokenizer) -> None:
    prompt = render(tiny, CONVERSATION, tools=[WEATHER, ADD])
    text = clean_text(tiny, prompt.token_ids)
    assert prompt.token_ids == tiny.encode(text)
    assert text == tiny.apply_chat_template(as_dicts(CONVERSATION), tools=[WEATHER.template_json(),
                                                                           ADD.template_json()])
    tools_at = text.index(json.dumps(WEATHER.template_json()))
    assert text.index("Be brief.") < tools_at < text.index(json.dumps(ADD.template_json())) < text.index("Paris")
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 °C\n</tool_response>\n<tool_response>\n5\n" in text
    assert text.endswith('<tool_response>\n{"sky": "clear"}\n</tool_response><|im_end|>\n<|im_start|>assistant\n')
    assert prompt.breakpoints == ()


def test_tool_breakpoint_after_its_definition(tiny: Tokenizer) -> None:
    tools = [ToolDef(WEATHER.name, WEATHER.description, WEATHER.parameters, ttl_class="1h"), ADD]
    messages = [ChatMessage("system", (TextBlock("Be brief.", ttl_class="1h"),)), msg("user", "hi")]
    prompt = render(tiny, messages, tools=tools)
    text = clean_text(tiny, prompt.token_ids)
    assert "\x00" not in text and prompt.token_ids == tiny.encode(text)
    tool_end = text.index(json.dumps(WEATHER.template_json())) + len(json.dumps(WEATHER.template_json()))
    system_end = text.index("Be brief.") + len("Be brief.")
    # prompt order: the system text comes before the tool list in this template
    assert prompt.breakpoints == ((tokens_ending_by(tiny, text, system_end), "1h"),
                                  (tokens_ending_by(tiny, text, tool_end), "1h"))
    assert render(tiny, messages, tools=[WEATHER, ADD]).token_ids == prompt.token_ids


def test_tool_call_breakpoint_after_its_arguments(tiny: Tokenizer) -> None:
    call = ToolCall("c1", "get_weather", '{"city": "Oslo"}')
    messages = [msg("user", "weather?"), msg("assistant", tool_calls=(call, call), tool_call_ttls=(None, "5m")),
                ChatMessage("tool", (TextBlock("rain", ttl_class="5m"),), tool_call_id="c1")]
    prompt = render(tiny, messages, tools=[WEATHER])
    text = clean_text(tiny, prompt.token_ids)
    second = text.rindex('{"city": "Oslo"}') + len('{"city": "Oslo"}')
    result = text.index("rain") + len("rain")
    assert prompt.breakpoints == ((tokens_ending_by(tiny, text, second), "5m"),
                                  (tokens_ending_by(tiny, text, result), "5m"))


def test_marker_never_leaks_when_a_template_dumps_the_tool_list(tmp_path: Path) -> None:
    template = "{{ tools | tojson }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    tok = Tokenizer.from_dir(build_tokenizer_dir(tmp_path, chat_template=template))
    tool = ToolDef("f", None, {"type": "object"}, ttl_class="5m")
    prompt = render(tok, [msg("user", "hi")], tools=[tool])
    assert "\x00" not in clean_text(tok, prompt.token_ids)
    assert prompt.breakpoints == ()  # the template wrote no per-tool JSON: no place to put it
    assert json.dumps(MarkedJSON({"a": 1}, "\x00m\x00")) == '{"a": 1}'


def test_continue_final_continues_the_prefill(tiny: Tokenizer) -> None:
    messages = [msg("user", "Write JSON"), ChatMessage("assistant", (TextBlock('{"a": ', ttl_class="5m"),))]
    prompt = render(tiny, messages, continue_final=True)
    text = clean_text(tiny, prompt.token_ids)
    assert text == '<|im_start|>user\nWrite JSON<|im_end|>\n<|im_start|>assistant\n{"a": '
    assert prompt.token_ids == tiny.encode(text)
    assert prompt.breakpoints == ((len(prompt.token_ids), "5m"),)
    plain = clean_text(tiny, render(tiny, messages).token_ids)
    assert plain.endswith('{"a": <|im_end|>\n<|im_start|>assistant\n')


@pytest.mark.parametrize("messages", [
    [msg("user", "hi")],
    [msg("user", "hi"), msg("assistant", "x", tool_calls=(ToolCall("c", "add", "{}"),))],
])
def test_continue_final_needs_a_final_assistant_text(tiny: Tokenizer, messages: list[ChatMessage]) -> None:
    with pytest.raises(InvalidRequestError, match="continue_final"):
        render(tiny, messages, continue_final=True)


def test_a_prefill_cannot_end_with_a_module(tiny: Tokenizer) -> None:
    messages = [msg("user", "hi"), ChatMessage("assistant", (TextBlock("x"), TextBlock("hello world", module=True)))]
    with pytest.raises(InvalidRequestError, match="prefill cannot end with a module"):
        render(tiny, messages, continue_final=True)


def test_continue_final_needs_a_template_that_writes_the_text(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(build_tokenizer_dir(tmp_path, chat_template="{% for m in messages %}{{ m.role }}"
                                                                          "{% endfor %}"))
    with pytest.raises(InvalidRequestError, match="cannot be continued"):
        render(tok, [msg("user", "hi"), msg("assistant", "pre")], continue_final=True)


@pytest.mark.parametrize("arguments", ["[1, 2]", "{not json", '"text"'])
def test_tool_call_arguments_must_be_a_json_object(tiny: Tokenizer, arguments: str) -> None:
    messages = [msg("user", "hi"), msg("assistant", tool_calls=(ToolCall("c9", "add", arguments),))]
    with pytest.raises(InvalidRequestError, match="c9"):
        render(tiny, messages, tools=[ADD])


def test_empty_arguments_are_an_empty_object(tiny: Tokenizer) -> None:
    messages = [msg("user", "hi"), msg("assistant", tool_calls=(ToolCall("c", "add", ""),))]
    text = clean_text(tiny, render(tiny, messages, tools=[ADD]).token_ids)
    assert '{"name": "add", "arguments": {}}' in text


def test_python_api_messages_carry_tool_calls_and_results(tiny: Tokenizer) -> None:
    from promptstash.prompts import chat_messages

    dicts = as_dicts(CONVERSATION)
    dicts[2]["tool_calls"][1]["function"]["arguments"] = json.dumps({"a": 2, "b": 3})  # JSON text works too
    assert chat_messages(dicts) == [
        ChatMessage(m.role, m.blocks, tuple(ToolCall(c.id, c.name, json.dumps(json.loads(c.arguments)))
                                            for c in m.tool_calls), m.tool_call_id, m.name) for m in CONVERSATION]
    assert render(tiny, chat_messages(dicts), tools=[WEATHER]).token_ids == \
        render(tiny, CONVERSATION, tools=[WEATHER]).token_ids
    with pytest.raises(InvalidRequestError, match="tool call 0"):
        chat_messages([{"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]}])


# --- the real model's template against transformers ---------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir() -> Path:
    return default_model_dir()


@pytest.fixture(scope="module")
def reference(model_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


@pytest.fixture(scope="module")
def ours(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


def reference_ids(reference, messages: list[dict], **kw) -> list[int]:
    out = reference.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


REAL_CASES = [
    CONVERSATION,
    CONVERSATION[1:],  # no system message: the template's default system text, then the tools
    [msg("user", "2+3?"), msg("assistant", "", tool_calls=(ToolCall("c", "add", '{"a": 2, "b": 3}'),))],
]


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(REAL_CASES)))
def test_real_template_matches_transformers(ours: Tokenizer, reference, case: int) -> None:
    messages = REAL_CASES[case]
    tools = [WEATHER, ADD]
    prompt = render(ours, messages, tools=tools)
    expected = reference_ids(reference, as_dicts(messages), tools=[t.template_json() for t in tools],
                             add_generation_prompt=True)
    assert prompt.token_ids == expected
    text = reference.apply_chat_template(as_dicts(messages), tools=[t.template_json() for t in tools],
                                         tokenize=False, add_generation_prompt=True)
    assert clean_text(ours, prompt.token_ids) == text
    assert "<tools>\n" + json.dumps(WEATHER.template_json()) in text


@pytest.mark.real_model
@pytest.mark.slow
def test_real_tool_breakpoint_position(ours: Tokenizer) -> None:
    tools = [ToolDef(WEATHER.name, WEATHER.description, WEATHER.parameters, ttl_class="1h"),
             ToolDef(ADD.name, ADD.description, ADD.parameters, ttl_class="5m")]
    prompt = render(ours, CONVERSATION, tools=tools)
    text = clean_text(ours, prompt.token_ids)
    assert prompt.token_ids == ours.encode(text)
    expected = []
    for tool, ttl in zip(tools, ("1h", "5m"), strict=True):
        line = json.dumps(tool.template_json())
        end = text.index("\n" + line + "\n") + 1 + len(line)  # the end of the tool's JSON line
        expected.append((tokens_ending_by(ours, text, end), ttl))
        assert expected[-1][0] >= len(ours.encode(text[:end])) - 1  # at most the one token that spans the "}\n"
    assert prompt.breakpoints == tuple(expected)
    assert render(ours, CONVERSATION, tools=[WEATHER, ADD]).token_ids == prompt.token_ids


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("prefill", ['{"a": ', "Sure, here", "東京"])
def test_real_prefill_matches_transformers(ours: Tokenizer, reference, prefill: str) -> None:
    messages = [msg("system", "Answer in JSON."), msg("user", "Give me a."), msg("assistant", prefill)]
    prompt = render(ours, messages, continue_final=True)
    expected = reference_ids(reference, as_dicts(messages), continue_final_message=True,
                             add_generation_prompt=False)
    assert prompt.token_ids == expected
    assert clean_text(ours, prompt.token_ids).endswith("<|im_start|>assistant\n" + prefill)
