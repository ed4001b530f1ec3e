"""End to end from a Hugging Face directory: config.json + safetensors + tokenizer, for both families."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY
from test_tokenizer import build_tokenizer_dir

from promptstash.engine.engine import Engine


def _save_tiny_checkpoint(family: str, path: Path) -> object:
    import transformers

    torch.manual_seed(5)
    cfg = {**TINY, "vocab_size": 512, "eos_token_id": 2}
    if family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    model.eval().save_pretrained(path)
    build_tokenizer_dir(path)
    return model


@pytest.fixture(params=["qwen2", "llama"])
def checkpoint(request, tmp_path: Path) -> tuple[Path, object]:
    return tmp_path, _save_tiny_checkpoint(request.param, tmp_path)


def test_engine_loads_a_hf_directory_and_matches_transformers(checkpoint) -> None:
    path, hf = checkpoint
    engine = Engine.from_pretrained(str(path), dtype="float32", kv_cache_tokens=2048, progress=False)
    messages = [{"role": "user", "content": "hello world, the quick brown fox"}]
    ids = engine.tokenize(messages)
    assert engine.tokenizer.decode(ids, skip_special_tokens=False).startswith("<|im_start|>user\nhello world")
    out = engine.generate(messages, max_tokens=12, ignore_eos=True)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, len(ids):]
    assert list(out.token_ids) == ref.tolist()
    assert out.text == engine.tokenizer.decode(list(out.token_ids))
    assert engine.model_id.startswith(path.name)


def test_stop_string_cuts_generated_text(checkpoint) -> None:
    path, _ = checkpoint
    engine = Engine.from_pretrained(str(path), dtype="float32", kv_cache_tokens=2048, progress=False)
    free = engine.generate("hello world", max_tokens=16, ignore_eos=True)
    assert len(free.text) > 4
    stop = free.text[2:4]
    cut = engine.generate("hello world", max_tokens=16, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.index(stop)]
    streamed = "".join(u.new_text for u in engine.stream("hello world", max_tokens=16, ignore_eos=True, stop=[stop]))
    assert streamed == cut.text
