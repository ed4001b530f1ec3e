"""The default model's converted files and our tokenizer against transformers' (needs the part packages)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from real_model_helpers import default_model_dir

from promptstash.models.loader import (
    DEFAULT_GGUF_SHA256,
    GGUF_WEIGHTS,
    MARKER_NAME,
    SUPPORTED_ARCHITECTURES,
    resolve_model,
)
from promptstash.models.tokenizer import Tokenizer

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "请用中文解释什么是缓存。東京タワー",
    "emoji 😀👍🏽🇫🇷 and <|im_end|> inline",
    "  leading spaces\t\ttabs\r\n",
]
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Sort a list 😀"},
        {"role": "assistant", "content": "sorted(xs)"},
        {"role": "user", "content": [{"type": "text", "text": "In place?"}]},
    ],
]


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


def test_default_model_dir(model_dir: Path) -> None:
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", MARKER_NAME):
        assert (model_dir / name).is_file(), name
    assert (model_dir / GGUF_WEIGHTS).is_file()  # the file's own weights, read at every start
    assert not list(model_dir.glob("*.safetensors"))  # no float32 copy on disk
    assert json.loads((model_dir / "config.json").read_text())["architectures"][0] in SUPPORTED_ARCHITECTURES
    assert json.loads((model_dir / MARKER_NAME).read_text())["source_sha256"] == DEFAULT_GGUF_SHA256
    again = resolve_model(None)
    assert again.path == model_dir
    assert again.model_id == f"qwen2.5-coder-0.5b-instruct-q4_k_m@{DEFAULT_GGUF_SHA256[:12]}"
    assert resolve_model(model_dir).model_id == again.model_id


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_transformers(ours: Tokenizer, reference, messages: list[dict]) -> None:
    flat = [{**m, "content": m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]}
            for m in messages]
    expected = reference.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)
    prompt = ours.apply_chat_template(messages)
    assert prompt == expected
    assert ours.encode(prompt) == reference(expected, add_special_tokens=False)["input_ids"]


def test_chat_template_with_tools_matches_transformers(ours: Tokenizer, reference) -> None:
    tools = [{"type": "function", "function": {"name": "weather", "description": "Wetter in 東京",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages = [{"role": "user", "content": "weather?"}]
    expected = reference.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages, tools=tools) == expected


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(ours: Tokenizer, reference, text: str) -> None:
    ids = ours.encode(text)
    assert ids == reference(text, add_special_tokens=False)["input_ids"]
    assert ours.encode(text, add_special_tokens=True) == reference(text)["input_ids"]
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    decoder = ours.incremental_decoder()
    assert "".join(decoder.push(i) for i in ids) == ours.decode(ids)


def test_eos_and_vocab(ours: Tokenizer, reference) -> None:
    im_end = ours.token_to_id("<|im_end|>")
    assert im_end == reference.convert_tokens_to_ids("<|im_end|>") == 151645
    assert im_end in ours.eos_token_ids
    assert ours.vocab_size == 151936
