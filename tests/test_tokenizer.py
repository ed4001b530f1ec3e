"""Tokenizer tests on a tiny byte-level BPE tokenizer built in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from promptstash.errors import CorruptModelError, InvalidRequestError, ModelNotFoundError
from promptstash.models.tokenizer import Tokenizer

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML with Qwen2.5's tool support (tool definitions in the system turn, <tool_call> / <tool_response>),
# minus Qwen's default system prompt: without tools it renders exactly like plain ChatML.
CHATML = (
    "{% if tools %}{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '# Tools\n\n<tools>' }}{% for tool in tools %}{{ '\n' }}{{ tool | tojson }}{% endfor %}"
    "{{ '\n</tools>\n\nCall a function with <tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'system' and tools and loop.first %}"
    "{% elif message.role == 'assistant' and message.tool_calls %}"
    "{{ '<|im_start|>assistant' }}{% if message.content %}{{ '\n' + message.content }}{% endif %}"
    "{% for tool_call in message.tool_calls %}{% if tool_call.function is defined %}"
    "{% set tool_call = tool_call.function %}{% endif %}"
    "{{ '\n<tool_call>\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{{ tool_call.arguments | tojson }}{{ '}\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\n' }}"
    "{% elif message.role == 'tool' %}"
    "{% if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\n<tool_response>\n' + message.content + '\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "hello world, this is a tiny corpus",
    "the quick brown fox jumps over the lazy dog",
    "def add(a, b):\n    return a + b",
    "user assistant system hello hello world",
]


def build_tokenizer_dir(
    path: Path,
    chat_template: str | None = CHATML,
    tokenizer_config: dict | None = None,
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"} if tokenizer_config is None else tokenizer_config
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


def test_encode_decode_round_trip(tok: Tokenizer) -> None:
    for text in ["hello world", "def add(a, b):\n    return a + b", "unseen wörds ünïcode 東京 😀"]:
        ids = tok.encode(text)
        assert all(isinstance(i, int) for i in ids)
        assert tok.decode(ids) == text


def test_special_tokens_in_text(tok: Tokenizer) -> None:
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    ids = tok.encode("<|im_start|>user\nhello<|im_end|>")
    assert ids[0] == im_start and ids[-1] == im_end
    assert tok.decode(ids) == "user\nhello"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhello<|im_end|>"


def test_vocab_size(tok: Tokenizer, tok_dir: Path) -> None:
    vocab = HFTokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab(with_added_tokens=True)
    assert tok.vocab_size == len(vocab) == max(vocab.values()) + 1


def test_chat_template(tok: Tokenizer) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(messages, add_generation_prompt=False).endswith("hi<|im_end|>\n")


def test_chat_template_text_parts_are_flattened(tok: Tokenizer) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert "<|im_start|>user\na\nb<|im_end|>" in tok.apply_chat_template(parts)
    with pytest.raises(InvalidRequestError, match="image_url"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])


def test_empty_messages(tok: Tokenizer) -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        tok.apply_chat_template([])


def test_message_without_role(tok: Tokenizer) -> None:
    with pytest.raises(InvalidRequestError, match="role"):
        tok.apply_chat_template([{"content": "hi"}])


def test_template_features(tmp_path: Path) -> None:
    template = (
        "{{ bos_token }}{% for message in messages %}\n"
        "  {% if loop.index > 2 %}{% break %}{% endif %}\n"
        "  {% if message.role == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}\n"
        "{{ message.role }}={{ message.content }};\n"
        "{% endfor %}\n"
        "{% if tools %}{{ tools | tojson }}{% endif %}{{ eos_token }}{{ extra }}|{{ strftime_now('%Y')|length }}"
    )
    tok = Tokenizer.from_dir(build_tokenizer_dir(tmp_path, chat_template=template))
    messages = [
        {"role": "user", "content": "1"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "3"},
    ]
    tools = [{"name": "f", "description": "東京 <b>&"}]
    rendered = tok.apply_chat_template(messages, tools=tools, extra="X")
    assert rendered == '<|endoftext|>user=1;\nassistant=2;\n[{"name": "f", "description": "東京 <b>&"}]<|im_end|>X|4'
    assert tok.apply_chat_template(messages[:1], tools=None).startswith("<|endoftext|>user=1;\n<|im_end|>")
    with pytest.raises(InvalidRequestError, match="no bad roles"):
        tok.apply_chat_template([{"role": "bad", "content": "x"}])


def test_template_render_error_is_invalid_request(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(build_tokenizer_dir(tmp_path, chat_template="{{ messages[0]['content'] + 1 }}"))
    with pytest.raises(InvalidRequestError, match="could not render"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_template_syntax_error(tmp_path: Path) -> None:
    with pytest.raises(CorruptModelError, match="syntax error"):
        Tokenizer.from_dir(build_tokenizer_dir(tmp_path, chat_template="{% for x in %}"))


def test_chat_template_jinja_file_wins(tmp_path: Path) -> None:
    build_tokenizer_dir(tmp_path, chat_template="from config")
    (tmp_path / "chat_template.jinja").write_text("from file")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "from file"


def test_named_chat_templates(tmp_path: Path) -> None:
    templates = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    tok = Tokenizer.from_dir(build_tokenizer_dir(tmp_path, chat_template=templates))  # type: ignore[arg-type]
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "plain"


def test_fallback_without_chat_template(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(build_tokenizer_dir(tmp_path, chat_template=None))
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert tok.apply_chat_template(messages) == "system: s\nuser: u\nassistant: "
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == "system: s\nuser: u\n"


def test_eos_ids_union(tmp_path: Path) -> None:
    build_tokenizer_dir(tmp_path, tokenizer_config={"eos_token": {"content": "<|im_end|>", "special": True}})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 7]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 9}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_token_ids == frozenset({0, 7, 9, tok.token_to_id("<|im_end|>")})


def test_eos_ids_from_tokenizer_config_only(tok: Tokenizer) -> None:
    assert tok.eos_token_ids == frozenset({tok.token_to_id("<|im_end|>")})


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CorruptModelError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("text", ["hi 😀 there", "東京 hello", "a😀😀b", "👍🏽"])
def test_incremental_decoder_multibyte(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert len(ids) > len(text.split())
    decoder = tok.incremental_decoder()
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids) == text == decoder.text
    assert all("\ufffd" not in p for p in pieces)


def test_incremental_decoder_holds_partial_character(tok: Tokenizer) -> None:
    emoji_ids = tok.encode("😀")
    assert len(emoji_ids) == 4
    decoder = tok.incremental_decoder()
    assert decoder.push(tok.encode("hi")[0]) != ""
    assert [decoder.push(i) for i in emoji_ids] == ["", "", "", "😀"]


def test_incremental_decoder_skips_special_and_flushes(tok: Tokenizer) -> None:
    ids = tok.encode("hello<|im_end|>") + tok.encode("😀")[:2]
    decoder = tok.incremental_decoder()
    pushed = "".join(decoder.push(i) for i in ids)
    assert pushed == "hello"
    assert decoder.flush() == "\ufffd"
    assert decoder.text == "hello\ufffd"
    assert decoder.flush() == ""
