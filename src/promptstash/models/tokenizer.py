"""Tokenizer and chat template of a Hugging Face layout model directory, without transformers.

Token ids come from ``tokenizer.json`` through the ``tokenizers`` library; the chat template is
rendered with jinja2 the way transformers renders it, so prompts match it string for string.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer

from promptstash.errors import CorruptModelError, InvalidRequestError, ModelNotFoundError

_REPLACEMENT = "\ufffd"


def _raise_exception(message: str) -> NoReturn:
    raise InvalidRequestError(f"chat template rejected the messages: {message}")


class MarkedJSON(dict):
    """A dict that the template's ``tojson`` filter writes followed by ``marker`` (raw, unescaped).

    Chat templates write tool definitions and tool-call arguments with ``value | tojson``, which would escape a
    marker put inside a string (``\x00`` -> ``\\u0000``). prompts.render gives such values as MarkedJSON to
    learn where their JSON ends in the rendered text (a cache breakpoint), then cuts the markers out. Elsewhere
    it is an ordinary dict: a template that dumps a list holding it (``tools | tojson``) writes no marker.
    """

    __slots__ = ("marker",)

    def __init__(self, value: Mapping[str, Any], marker: str) -> None:
        super().__init__(value)
        self.marker = marker


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """The ``tojson`` filter as transformers defines it (no HTML escaping, non-ASCII kept); a MarkedJSON value
    is followed by its marker."""
    text = json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    return text + value.marker if isinstance(value, MarkedJSON) else text


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character that spells each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _compile_template(source: str, origin: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise CorruptModelError(f"chat template in {origin} has a syntax error at line {exc.lineno}: {exc}") from exc


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptModelError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CorruptModelError(f"{path} holds a {type(data).__name__}; expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _int_ids(value: Any) -> set[int]:
    if isinstance(value, bool):
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


def _find_chat_template(path: Path, config: Mapping[str, Any]) -> tuple[str, str] | None:
    """Return ``(template, origin)``: chat_template.jinja, else tokenizer_config.json, else chat_template.json."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    for origin, holder in (
        (str(path / "tokenizer_config.json"), config),
        (str(path / "chat_template.json"), _read_json(path / "chat_template.json")),
    ):
        template = holder.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default", next(iter(named.values()), None))
        if isinstance(template, str) and template:
            return template, origin
    return None


def _flatten_content(content: Any, index: int) -> Any:
    if not isinstance(content, list):
        return content
    texts: list[str] = []
    for part in content:
        if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise InvalidRequestError(
                f"message {index} has a content part of type {kind!r}; only {{'type': 'text', 'text': ...}} "
                "parts are supported"
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if not messages:
        raise InvalidRequestError("messages is empty; expected at least 1 message")
    result: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(f"message {index} is a {type(message).__name__}; expected a dict")
        if not isinstance(message.get("role"), str) or not message["role"]:
            raise InvalidRequestError(f"message {index} has no 'role' string")
        normalized = dict(message)
        normalized["content"] = _flatten_content(message.get("content"), index)
        result.append(normalized)
    return result


class Tokenizer:
    """Encoding, decoding and chat prompts of one model directory."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
        eos_token_ids: Iterable[int] = (),
        template_origin: str = "<chat template>",
    ) -> None:
        self._tokenizer = tokenizer
        self._special_tokens = dict(special_tokens or {})
        self._eos_ids = frozenset(eos_token_ids)
        self.chat_template = chat_template
        self._template = _compile_template(chat_template, template_origin) if chat_template else None

    @classmethod
    def from_dir(cls, path: Path) -> Tokenizer:
        """Load ``tokenizer.json`` (tokenizers library), tokenizer_config.json and the chat template.

        The chat template is taken from ``chat_template.jinja``, else ``tokenizer_config.json``
        ``"chat_template"``, else ``chat_template.json``. End-of-sequence ids are the union of
        generation_config.json and config.json ``eos_token_id`` (an int or a list) and the id of
        tokenizer_config.json ``eos_token``.

        Raises ModelNotFoundError without tokenizer.json, CorruptModelError when a file cannot be parsed.
        """
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelNotFoundError(f"{path} has no tokenizer.json (expected a Hugging Face tokenizer file)")
        try:
            tokenizer = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as exc:
            raise CorruptModelError(f"cannot load {tokenizer_file}: {exc}") from exc
        config = _read_json(path / "tokenizer_config.json")
        special = {
            name: text
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (text := _token_text(config.get(name))) is not None
        }
        eos_ids = _int_ids(_read_json(path / "generation_config.json").get("eos_token_id"))
        eos_ids |= _int_ids(_read_json(path / "config.json").get("eos_token_id"))
        if "eos_token" in special and (eos_id := tokenizer.token_to_id(special["eos_token"])) is not None:
            eos_ids.add(eos_id)
        found = _find_chat_template(path, config)
        template, origin = found if found else (None, "")
        return cls(tokenizer, template, special, eos_ids, origin)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text (e.g. ``<|im_end|>``) map to their ids;
        ``add_special_tokens`` adds the tokenizer's post-processor tokens (e.g. a BOS), as transformers does.
        """
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def token_ends(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of ``text`` (as ``encode``) and, for each token, the character offset where it ends."""
        enc = self._tokenizer.encode(text, add_special_tokens=False)
        return enc.ids, [end for _, end in enc.offsets]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``; bytes of an incomplete UTF-8 character decode to U+FFFD."""
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render ``messages`` into the prompt string the model was trained on.

        Content given as a list of ``{"type": "text", "text": ...}`` parts is joined with newlines first.
        ``bos_token``/``eos_token`` (and ``unk_token``/``pad_token`` where set) and ``kwargs`` (e.g.
        ``tools=None``) are visible to the template. Without a chat template in the model directory the
        fallback format is one ``"role: content\\n"`` line per message, followed by ``"assistant: "`` when
        ``add_generation_prompt``.

        Raises InvalidRequestError for an empty list, a malformed message, or a template that rejects the
        messages (``raise_exception``) or fails to render them.
        """
        normalized = _normalize_messages(messages)
        if self._template is None:
            lines = [f"{m['role']}: {'' if m['content'] is None else m['content']}\n" for m in normalized]
            return "".join(lines) + ("assistant: " if add_generation_prompt else "")
        context = {**self._special_tokens, **kwargs}
        context["messages"] = normalized
        context["add_generation_prompt"] = add_generation_prompt
        try:
            return self._template.render(**context)
        except InvalidRequestError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as exc:
            raise InvalidRequestError(f"chat template could not render the messages: {exc}") from exc

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation."""
        return self._eos_ids

    @cached_property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included (may be below the model's row count)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @cached_property
    def max_token_chars(self) -> int:
        """An upper bound on the characters of text one token covers: the longest token string.

        Byte-level and metaspace vocabularies spell each token with at most one character per byte of
        its text, so no token's text is longer than its spelling.
        """
        return max((len(t) for t in self._tokenizer.get_vocab(with_added_tokens=True)), default=1)

    def token_to_id(self, token: str) -> int | None:
        """Id of the exact token string ``token`` (e.g. ``"<|im_end|>"``), or None if it is not in the vocabulary."""
        return self._tokenizer.token_to_id(token)

    @property
    def hf_tokenizer(self) -> Any:
        """The underlying `tokenizers.Tokenizer` (for libraries that build on it, e.g. the grammar library)."""
        return self._tokenizer

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (OpenAI logprobs' `bytes`): exact even for a token that is part of a
        multi-byte character. Byte-level BPE spells bytes as the GPT-2 byte-to-character table; metaspace
        vocabularies spell a space as U+2581 and raw bytes as <0xNN>; added tokens are their text."""
        piece = self._tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._added_ids:
            return piece.encode()
        if self._byte_level:
            table = _byte_decoder()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    @cached_property
    def _added_ids(self) -> frozenset[int]:
        return frozenset(self._tokenizer.get_added_tokens_decoder())

    @cached_property
    def _byte_level(self) -> bool:
        return '"ByteLevel"' in self._tokenizer.to_str()

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        """A decoder that turns a stream of generated ids into text pieces; see IncrementalDecoder."""
        return IncrementalDecoder(self, skip_special_tokens)


class IncrementalDecoder:
    """Streams text for ids pushed one at a time.

    Each push returns only newly completed text. While the decoded tail ends with U+FFFD (an unfinished
    multi-byte UTF-8 character) nothing is returned and the bytes are held back. The concatenation of all
    pushes equals ``decode(all ids)`` whenever the ids end on a complete character; ``flush`` returns
    what is still held back (as U+FFFD) at the end of a stream. Each push decodes only a short window.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._pieces: list[str] = []

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        current = self._decode(self._ids[self._prefix_offset :])
        if current.endswith(_REPLACEMENT) or len(current) <= len(prefix):
            return ""
        if current.startswith(prefix):
            piece = current[len(prefix) :]
        else:
            full = self._decode(self._ids)
            emitted = "".join(self._pieces)
            piece = full[len(emitted) :] if full.startswith(emitted) else current[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._pieces.append(piece)
        return piece

    def flush(self) -> str:
        """Return text of ids not yet emitted (incomplete characters become U+FFFD) and mark it emitted."""
        if self._read_offset == len(self._ids):
            return ""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        current = self._decode(self._ids[self._prefix_offset :])
        piece = current[len(prefix) :] if current.startswith(prefix) else ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if piece:
            self._pieces.append(piece)
        return piece

    @property
    def text(self) -> str:
        """Everything returned by push and flush so far."""
        return "".join(self._pieces)

    @property
    def token_ids(self) -> list[int]:
        """A copy of the ids pushed so far."""
        return list(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""
