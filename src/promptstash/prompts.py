"""Chat messages -> token ids, with the token position of each cache breakpoint.

A breakpoint sits at the end of a content block. To find its token position, the block's text is
followed by a marker that no request contains, the chat template renders the messages, the markers are
cut out (remembering their character offsets), and the clean text is tokenized:

    rendered:  "<|im_start|>system\\nLong document...\\x00bp0\\x00<|im_end|>\\n<|im_start|>user ..."
    clean:     "<|im_start|>system\\nLong document...<|im_end|>\\n<|im_start|>user ..."
                                                   ^ char offset c
    position = number of tokens that end at or before c (the prefix holds only whole tokens)

The token ids are those of the clean text, exactly what the engine would compute for the same messages.
Tool definitions and tool-call arguments are written by the template with `tojson`, which would escape a
marker inside them: they are given as MarkedJSON dicts, whose `tojson` is followed by the raw marker.

Modules (blocks marked `module`) are tokenized on their own: the block's text is replaced by a marker, the
rendered text is cut at the markers, and each piece and each module is tokenized separately:

    rendered:  "<|im_start|>user\\n" \x00m0\x00 "\\n" \x00m1\x00 "\\nQuestion?<|im_end|>..."
    tokens:    [ text piece      ][ module 0 ][ \\n ][ module 1 ][ text piece ...         ]

NOTE: so a module's tokens are the same wherever it appears (its K/V can be reused), while tokens at a
module's edges may differ from tokenizing the whole text at once. Without modules nothing changes.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from promptstash.cache.modules import ModuleSpan, RegisteredModule
from promptstash.errors import InvalidRequestError
from promptstash.models.tokenizer import MarkedJSON
from promptstash.tools import ToolCall, ToolDef


@dataclass(frozen=True)
class TextBlock:
    text: str
    ttl_class: str | None = None  # a cache breakpoint after this block, with its TTL class
    module: bool = False  # the block is a module: tokenized on its own, its K/V reusable at any position
    module_id: str | None = None  # a registered module used by id (text is then filled in by render)


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system | user | assistant | tool
    blocks: tuple[TextBlock, ...]
    tool_calls: tuple[ToolCall, ...] = ()  # assistant: the calls it made (rendered by the chat template)
    tool_call_id: str | None = None  # tool: the call this message answers
    name: str | None = None  # tool: the function's name
    tool_call_ttls: tuple[str | None, ...] = ()  # a breakpoint after tool_calls[i]'s arguments (missing: none)


@dataclass(frozen=True)
class RenderedPrompt:
    token_ids: list[int]
    breakpoints: tuple[tuple[int, str], ...]  # (prefix_len in tokens, ttl_class), in prompt order
    modules: tuple[ModuleSpan, ...] = ()  # in prompt order


ModuleResolver = Callable[[str], RegisteredModule]  # module id -> the registered module (raises if unknown)


def render(tokenizer: Any, messages: list[ChatMessage], resolve_module: ModuleResolver | None = None,
           tools: Sequence[ToolDef] = (), continue_final: bool = False) -> RenderedPrompt:
    """Chat messages (and tool definitions) -> token ids, breakpoint positions and module spans.

    tools: function definitions, given to the chat template as `tools=[tool.template_json(), ...]` (Qwen2.5 and
    Llama 3 templates write them ahead of the conversation, so they are part of the cached prefix). A ToolDef's
    ttl_class is a breakpoint right after the JSON of its definition; a message's tool_call_ttls[i] one right
    after the JSON arguments of its i-th tool call. Both are found through MarkedJSON (models/tokenizer.py); a
    template that writes tools some other way than `tool | tojson` drops those breakpoints.
    Assistant tool calls reach the template as `tool_calls=[{"type": "function", "id", "function": {"name",
    "arguments": dict}}]` (templates `tojson` the arguments); tool messages carry `tool_call_id` and `name`.
    continue_final: the last message is an assistant prefill: the prompt ends right after its text (no end of
    turn, no new assistant header) and generation continues it. Breakpoints come out in prompt order.
    Raises InvalidRequestError for what cannot be rendered (arguments that are not a JSON object, a prefill
    that is not an assistant text message, a template that rejects the messages).
    """
    if tokenizer is None:
        raise InvalidRequestError("this model has no tokenizer, so chat messages cannot be rendered")
    if continue_final and (not messages or messages[-1].role != "assistant" or messages[-1].tool_calls):
        raise InvalidRequestError("continue_final: the last message must be an assistant message without tool calls")
    if continue_final and messages[-1].blocks and (messages[-1].blocks[-1].module or messages[-1].blocks[-1].module_id):
        raise InvalidRequestError("continue_final: a prefill cannot end with a module (the last prompt token is "
                                  "computed to sample from it)")
    tag = secrets.token_hex(6)
    pattern = re.compile(f"\x00{tag}:([bm])(\\d+)\x00")
    classes: list[str] = []
    module_tokens: list[tuple[list[int], str | None, str | None]] = []  # (token ids, module id, ttl class)

    def breakpoint_marker(ttl_class: str) -> str:
        classes.append(ttl_class)
        return f"\x00{tag}:b{len(classes) - 1}\x00"

    tool_json = [tool.template_json() if tool.ttl_class is None
                 else MarkedJSON(tool.template_json(), breakpoint_marker(tool.ttl_class)) for tool in tools]
    plain = []
    for message in messages:
        parts = []
        for block in message.blocks:
            text = block.text
            if block.module or block.module_id is not None:
                if block.module_id is not None:
                    if resolve_module is None:
                        raise InvalidRequestError("module parts by id need a module registry")
                    registered = resolve_module(block.module_id)
                    ids, ttl = list(registered.token_ids), registered.ttl_class
                else:
                    ids, ttl = tokenizer.encode(text, add_special_tokens=False), block.ttl_class
                if not ids:
                    raise InvalidRequestError("a module must not be empty")
                text = f"\x00{tag}:m{len(module_tokens)}\x00"
                module_tokens.append((ids, block.module_id, ttl))
            if block.ttl_class is not None:
                text += breakpoint_marker(block.ttl_class)
            parts.append(text)
        entry: dict[str, Any] = {"role": message.role, "content": "\n".join(parts)}
        if message.tool_calls:
            entry["tool_calls"] = [_template_call(call, ttls, breakpoint_marker) for call, ttls in
                                   zip(message.tool_calls, _padded(message.tool_call_ttls, len(message.tool_calls)),
                                       strict=True)]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        if message.name is not None:
            entry["name"] = message.name
        plain.append(entry)
    end_marker = f"\x00{tag}:end\x00"
    if continue_final:
        plain[-1]["content"] += end_marker
    rendered = tokenizer.apply_chat_template(plain, add_generation_prompt=not continue_final,
                                             tools=tool_json or None)
    if continue_final:
        cut = rendered.rfind(end_marker)
        if cut < 0:
            raise InvalidRequestError("continue_final: the chat template does not write the final assistant "
                                      "message's text, so it cannot be continued")
        rendered = rendered[:cut]
    token_ids: list[int] = []
    positions: dict[int, int] = {}  # breakpoint -> token position
    modules: list[ModuleSpan] = []
    piece: list[str] = []
    marks: list[tuple[int, int]] = []  # (breakpoint, char offset in the current piece)
    piece_len = 0

    def flush() -> None:
        nonlocal piece_len
        ids, ends = tokenizer.token_ends("".join(piece)) if piece_len else ([], [])
        for i, offset in marks:
            positions[i] = len(token_ids) + next((k for k, end in enumerate(ends) if end > offset), len(ends))
        token_ids.extend(ids)
        piece.clear()
        marks.clear()
        piece_len = 0

    last = 0
    for match in pattern.finditer(rendered):
        text = rendered[last:match.start()]
        piece.append(text)
        piece_len += len(text)
        last = match.end()
        index = int(match.group(2))
        if match.group(1) == "b":
            marks.append((index, piece_len))
            continue
        flush()
        ids, module_id, ttl_class = module_tokens[index]
        modules.append(ModuleSpan(len(token_ids), len(token_ids) + len(ids), module_id, ttl_class))
        token_ids.extend(ids)
    piece.append(rendered[last:])
    piece_len += len(rendered) - last
    flush()
    breakpoints = sorted((positions[i], i, ttl_class) for i, ttl_class in enumerate(classes) if i in positions)
    return RenderedPrompt(token_ids, tuple((n, ttl_class) for n, _, ttl_class in breakpoints), tuple(modules))


def _padded(ttls: tuple[str | None, ...], n: int) -> tuple[str | None, ...]:
    return (ttls + (None,) * n)[:n]


def _template_call(call: ToolCall, ttl_class: str | None, marker: Callable[[str], str]) -> dict[str, Any]:
    """A tool call as chat templates take it; the arguments as a dict (templates `tojson` them)."""
    try:
        arguments = json.loads(call.arguments) if call.arguments.strip() else {}
    except ValueError:
        raise InvalidRequestError(f"tool call {call.id!r} ({call.name}): arguments are not valid JSON") from None
    if not isinstance(arguments, dict):
        raise InvalidRequestError(f"tool call {call.id!r} ({call.name}): arguments must be a JSON object")
    if ttl_class is not None:
        arguments = MarkedJSON(arguments, marker(ttl_class))
    return {"type": "function", "id": call.id, "function": {"name": call.name, "arguments": arguments}}


def chat_messages(messages: Sequence[Mapping[str, Any]]) -> list[ChatMessage]:
    """The Python API's messages (OpenAI format) as ChatMessages: content is a string or a list of parts,
    `{"type": "text", "text": ..., "module": true?}` or `{"type": "module", "id": ...}`; an assistant message may
    carry `tool_calls` ([{"id", "function": {"name", "arguments": JSON text or a dict}}]), a tool message
    `tool_call_id` and `name`."""
    result = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise InvalidRequestError(f"message {i} must be a dict with a 'role' string")
        content = message.get("content")
        if content is None:
            content = ""
        if isinstance(content, str):
            blocks: tuple[TextBlock, ...] = (TextBlock(content),)
        elif isinstance(content, list):
            blocks = tuple(content_part(part, f"message {i} part {j}") for j, part in enumerate(content))
        else:
            raise InvalidRequestError(f"message {i}: content must be a string or a list of parts")
        tool_call_id, name = message.get("tool_call_id"), message.get("name")
        if not isinstance(tool_call_id, str | None) or not isinstance(name, str | None):
            raise InvalidRequestError(f"message {i}: tool_call_id and name must be strings")
        result.append(ChatMessage(message["role"], blocks, _tool_calls(message.get("tool_calls"), i),
                                  tool_call_id, name))
    return result


def _tool_calls(calls: Any, index: int) -> tuple[ToolCall, ...]:
    if calls is None:
        return ()
    if not isinstance(calls, list):
        raise InvalidRequestError(f"message {index}: tool_calls must be a list")
    result = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise InvalidRequestError(f"message {index} tool call {j}: expected {{'id': ..., 'function': "
                                      "{'name': ..., 'arguments': ...}}")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, Mapping):
            arguments = json.dumps(arguments, ensure_ascii=False)
        if not isinstance(arguments, str):
            raise InvalidRequestError(f"message {index} tool call {j}: arguments must be JSON text or a dict")
        result.append(ToolCall(str(call.get("id") or f"call_{j}"), function["name"], arguments))
    return tuple(result)


def content_part(part: Any, where: str) -> TextBlock:
    """One OpenAI-style content part: a text part (optionally `"module": true`) or a module by id."""
    if not isinstance(part, Mapping):
        raise InvalidRequestError(f"{where}: expected an object")
    kind = part.get("type")
    module = part.get("module", False)
    if not isinstance(module, bool):
        raise InvalidRequestError(f"{where}: 'module' must be true or false, got {type(module).__name__}")
    if kind == "module":
        module_id = part.get("id")
        if not isinstance(module_id, str) or not module_id:
            raise InvalidRequestError(f"{where}: a module part needs an 'id' string")
        return TextBlock("", module_id=module_id)
    if kind != "text" or not isinstance(part.get("text"), str):
        if module:
            raise InvalidRequestError(f"{where}: only text parts can be modules, got type {kind!r}")
        raise InvalidRequestError(f"{where}: only {{'type': 'text', 'text': ...}} and {{'type': 'module', "
                                  f"'id': ...}} parts are supported, got type {kind!r}")
    return TextBlock(part["text"], module=module)
