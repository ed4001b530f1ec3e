"""Chat messages -> token ids, with the token position of each cache breakpoint.

A breakpoint sits at the end of a content block. To find its token position, the block's text is
followed by a marker that no request contains, the chat template renders the messages, the markers are
cut out (remembering their character offsets), and the clean text is tokenized:

    rendered:  "<|im_start|>system\\nLong document...\\x00bp0\\x00<|im_end|>\\n<|im_start|>user ..."
    clean:     "<|im_start|>system\\nLong document...<|im_end|>\\n<|im_start|>user ..."
                                                   ^ char offset c
    position = number of tokens that end at or before c (the prefix holds only whole tokens)

The token ids are those of the clean text, exactly what the engine would compute for the same messages.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

from promptstash.errors import InvalidRequestError


@dataclass(frozen=True)
class TextBlock:
    text: str
    ttl_class: str | None = None  # a cache breakpoint after this block, with its TTL class


@dataclass(frozen=True)
class ChatMessage:
    role: str
    blocks: tuple[TextBlock, ...]


@dataclass(frozen=True)
class RenderedPrompt:
    token_ids: list[int]
    breakpoints: tuple[tuple[int, str], ...]  # (prefix_len in tokens, ttl_class), in prompt order


def render(tokenizer: Any, messages: list[ChatMessage]) -> RenderedPrompt:
    if tokenizer is None:
        raise InvalidRequestError("this model has no tokenizer, so chat messages cannot be rendered")
    tag = secrets.token_hex(6)
    pattern = re.compile(f"\x00{tag}:(\\d+)\x00")
    classes: list[str] = []
    plain = []
    for message in messages:
        parts = []
        for block in message.blocks:
            text = block.text
            if block.ttl_class is not None:
                text += f"\x00{tag}:{len(classes)}\x00"
                classes.append(block.ttl_class)
            parts.append(text)
        plain.append({"role": message.role, "content": "\n".join(parts)})
    rendered = tokenizer.apply_chat_template(plain, add_generation_prompt=True)
    clean, offsets, last = [], {}, 0
    length = 0
    for match in pattern.finditer(rendered):
        piece = rendered[last:match.start()]
        clean.append(piece)
        length += len(piece)
        offsets[int(match.group(1))] = length
        last = match.end()
    clean.append(rendered[last:])
    token_ids, ends = tokenizer.token_ends("".join(clean))
    breakpoints = []
    for i, ttl_class in enumerate(classes):
        if i in offsets:  # a template may drop a message (then its breakpoint writes nothing)
            position = next((k for k, end in enumerate(ends) if end > offsets[i]), len(ends))
            breakpoints.append((position, ttl_class))
    return RenderedPrompt(token_ids, tuple(breakpoints))
