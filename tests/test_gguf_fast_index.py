"""models/gguf.py read_tensor_index: the header parser read_weights uses instead of gguf.GGUFReader.

It must give exactly GGUFReader's tensors (names, types, dtypes, shapes, bytes), on files written by
gguf.GGUFWriter and on the real default model, and turn every truncated or garbage file into
CorruptModelError naming the file."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from promptstash.errors import CorruptModelError, ModelNotFoundError
from promptstash.models.gguf import read_tensor_index, read_weights

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

ALIGNMENT = 64
# tokens of varying lengths: empty, ASCII, multi-byte UTF-8, long
TOKENS = [""] + [f"tok{i}" * (i % 7) + ("é€" if i % 5 == 0 else "") for i in range(1, 5000)] + ["x" * 3000]


def _raw(rng: np.random.Generator, qtype: object, shape: tuple[int, ...]) -> np.ndarray:
    """Random bytes in `qtype`'s byte shape (the writer cannot quantize K-quants; the index never decodes)."""
    return rng.integers(0, 256, size=gguf.quants.quant_shape_to_byte_shape(shape, qtype), dtype=np.uint8)


def write_file(path: Path, alignment: int | None = ALIGNMENT, endianess: object = None) -> Path:
    rng = np.random.default_rng(0)
    options = {} if endianess is None else {"endianess": endianess}
    writer = gguf.GGUFWriter(str(path), "qwen2", **options)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_name("tiny test model")
    writer.add_uint32("qwen2.block_count", 1)
    writer.add_float32("qwen2.rope.freq_base", 10000.0)
    writer.add_bool("tokenizer.ggml.add_bos_token", False)
    writer.add_token_list(TOKENS)
    writer.add_token_types([1] * len(TOKENS))
    writer.add_token_merges([f"a{i} b{i}" for i in range(2000)])
    writer.add_array("test.floats", [0.5, 1.5, 2.5])
    writer.add_array("test.nested", [[1, 2, 3], [4], [5, 6]])
    writer.add_string("test.after_arrays", "still read")
    f32 = rng.standard_normal((64, 96)).astype(np.float32)
    writer.add_tensor("token_embd.weight", f32)
    writer.add_tensor("output_norm.weight", rng.standard_normal(96).astype(np.float32))
    writer.add_tensor("blk.0.attn_q.weight", rng.standard_normal((96, 96)).astype(np.float16))
    writer.add_tensor("blk.0.attn_q.bias", rng.standard_normal(96).astype(np.float32))
    q8 = gguf.quants.quantize(rng.standard_normal((32, 96)).astype(np.float32), Q.Q8_0)
    writer.add_tensor("blk.0.attn_k.weight", q8, raw_dtype=Q.Q8_0)
    bf16 = gguf.quants.quantize(rng.standard_normal((32, 96)).astype(np.float32), Q.BF16)
    writer.add_tensor("blk.0.attn_v.weight", bf16, raw_dtype=Q.BF16)
    writer.add_tensor("blk.0.ffn_up.weight", _raw(rng, Q.Q4_K, (8, 512)), raw_dtype=Q.Q4_K)
    writer.add_tensor("blk.0.ffn_down.weight", _raw(rng, Q.Q6_K, (4, 256)), raw_dtype=Q.Q6_K)
    writer.add_tensor("test.three_d", rng.standard_normal((2, 3, 5)).astype(np.float32))
    writer.add_tensor("test.ints", np.arange(7, dtype=np.int32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_file(tmp_path_factory.mktemp("gguf") / "small.gguf")


def assert_same_as_reader(path: Path) -> None:
    index = read_tensor_index(path)
    reader = gguf.GGUFReader(str(path))
    assert index.data_offset == reader.data_offset
    assert index.alignment == reader.alignment
    assert [t.name for t in index.tensors] == [t.name for t in reader.tensors]
    for mine, theirs in zip(index.tensors, reader.tensors, strict=True):
        assert mine.tensor_type == theirs.tensor_type, mine.name
        assert isinstance(mine.tensor_type, Q)
        assert mine.data.dtype == theirs.data.dtype, mine.name
        assert mine.data.shape == theirs.data.shape, mine.name
        assert mine.data_offset == theirs.data_offset, mine.name
        assert mine.n_bytes == theirs.n_bytes == mine.data.nbytes, mine.name
        assert isinstance(mine.data, np.memmap)
        assert np.array_equal(mine.data, theirs.data), mine.name


def test_same_tensors_as_gguf_reader(small: Path) -> None:
    assert_same_as_reader(small)
    index = read_tensor_index(small)
    types = {t.name: t.tensor_type for t in index.tensors}
    assert {types["blk.0.attn_k.weight"], types["blk.0.ffn_up.weight"], types["blk.0.attn_v.weight"]} == {
        Q.Q8_0, Q.Q4_K, Q.BF16}
    assert index.alignment == ALIGNMENT and index.data_offset % ALIGNMENT == 0
    assert index.architecture == "qwen2"
    assert index.metadata["general.name"] == "tiny test model"
    assert index.metadata["qwen2.block_count"] == 1
    assert index.metadata["tokenizer.ggml.add_bos_token"] is False
    assert index.metadata["test.after_arrays"] == "still read"  # the arrays before it were skipped exactly
    assert "tokenizer.ggml.tokens" not in index.metadata  # arrays are not kept


def test_default_alignment(tmp_path: Path) -> None:
    path = write_file(tmp_path / "plain.gguf", alignment=None)
    assert read_tensor_index(path).alignment == 32
    assert_same_as_reader(path)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN scales in random bytes
def test_read_weights_matches_the_reader_tensors(small: Path) -> None:
    """read_weights (float32, no permutation for qwen2) gives the GGUFReader tensors dequantized."""
    from gguf.quants import dequantize

    weights = read_weights(small, "float32", num_heads=4, num_kv_heads=1)
    reader = {t.name: t for t in gguf.GGUFReader(str(small)).tensors}
    for gguf_name, hf in [("token_embd.weight", "model.embed_tokens.weight"),
                          ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
                          ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight"),
                          ("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight"),
                          ("output_norm.weight", "model.norm.weight")]:
        tensor = reader[gguf_name]
        expected = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        value = weights[hf]
        assert isinstance(value, torch.Tensor) and value.dtype == torch.float32
        # the random K-quant bytes hold some NaN scales
        assert np.array_equal(value.numpy(), expected, equal_nan=True), hf


@pytest.fixture(scope="module")
def cuts(small: Path) -> dict[str, int]:
    """Byte offsets inside each part of the file, found with GGUFReader."""
    path = small
    reader = gguf.GGUFReader(str(path))
    fields = list(reader.fields.values())
    tokens = next(i for i, f in enumerate(fields) if f.name == "tokenizer.ggml.tokens")
    nested = next(i for i, f in enumerate(fields) if f.name == "test.nested")
    last = reader.tensors[-1]
    return {
        "magic": 2, "version": 6, "counts": 20, "first key": 30,
        "string array start": fields[tokens].offset + 200,  # past the key and the array head
        "string array middle": (fields[tokens].offset + fields[tokens + 1].offset) // 2,
        "string array end": fields[tokens + 1].offset - 1,
        "nested array": (fields[nested].offset + fields[nested + 1].offset) // 2,
        "first tensor info": reader.tensors[0].field.offset + 3,
        "tensor info dims": reader.tensors[2].field.offset + 30,
        "last tensor info": last.field.offset + sum(int(p.nbytes) for p in last.field.parts) - 4,
        "padding before data": reader.data_offset - 1,
        "data start": reader.data_offset,
        "first tensor data": reader.data_offset + 100,
        "last tensor data": int(last.data_offset) + 5,
        "last tensor last byte": int(last.data_offset) + int(last.n_bytes) - 1,  # the writer pads after it
    }


@pytest.mark.parametrize("where", ["magic", "version", "counts", "first key", "string array start",
                                   "string array middle", "string array end", "nested array",
                                   "first tensor info", "tensor info dims", "last tensor info",
                                   "padding before data", "data start", "first tensor data",
                                   "last tensor data", "last tensor last byte"])
def test_truncated_file_is_corrupt(small: Path, cuts: dict[str, int], tmp_path: Path, where: str) -> None:
    cut = cuts[where]
    path = tmp_path / "cut.gguf"
    path.write_bytes(small.read_bytes()[:cut])
    with pytest.raises(CorruptModelError, match="cut.gguf"):
        read_tensor_index(path)


@pytest.mark.parametrize("content", [b"", b"GG", b"GGUF", b"GGUF\x03\0\0\0", b"PK\x03\x04" + b"\0" * 60,
                                     bytes(range(256)) * 8, b"GGUF\x07\0\0\0" + b"\0" * 40,
                                     b"GGUF\x03\0\0\0" + b"\xff" * 16 + b"\0" * 100])
def test_garbage_is_corrupt(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.gguf"
    path.write_bytes(content)
    with pytest.raises(CorruptModelError, match="garbage.gguf"):
        read_tensor_index(path)


def _patched(small: Path, tmp_path: Path, at: int, value: bytes) -> Path:
    data = bytearray(small.read_bytes())
    data[at:at + len(value)] = value
    path = tmp_path / "patched.gguf"
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def patches(small: Path) -> dict[str, tuple[int, bytes]]:
    """Byte patches that make a field of the file nonsense: (offset, new bytes)."""
    reader = gguf.GGUFReader(str(small))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    count_at = tokens.offset + 8 + len("tokenizer.ggml.tokens") + 4 + 4  # key, value type, item type
    first = reader.tensors[0].field.offset
    n_dims_at = first + 8 + len(reader.tensors[0].name)
    type_at = n_dims_at + 4 + 8 * 2
    return {
        "huge array count": (count_at, (2**62).to_bytes(8, "little")),
        "huge string length": (count_at + 8, (2**40).to_bytes(8, "little")),
        "unknown item type": (count_at - 4, (99).to_bytes(4, "little")),
        "huge n_dims": (n_dims_at, (2**31).to_bytes(4, "little")),
        "unknown ggml type": (type_at, (200).to_bytes(4, "little")),
        "data past the end": (type_at + 4, (2**40).to_bytes(8, "little")),
        "huge tensor count": (8, (2**60).to_bytes(8, "little")),
        "big-endian": (4, (3 << 24).to_bytes(4, "little")),
    }


@pytest.mark.parametrize("what", ["huge array count", "huge string length", "unknown item type", "huge n_dims",
                                  "unknown ggml type", "data past the end", "huge tensor count", "big-endian"])
def test_corrupt_fields_are_corrupt(small: Path, patches: dict[str, tuple[int, bytes]], tmp_path: Path,
                                    what: str) -> None:
    at, value = patches[what]
    with pytest.raises(CorruptModelError, match="patched.gguf"):
        read_tensor_index(_patched(small, tmp_path, at, value))


def test_bad_alignment_is_corrupt(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "align.gguf"), "qwen2")
    writer.add_uint32("general.alignment", 48)
    writer.add_tensor("a", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CorruptModelError, match="align.gguf.*power of two"):
        read_tensor_index(tmp_path / "align.gguf")


def test_random_byte_flips_never_escape_as_other_errors(small: Path, tmp_path: Path) -> None:
    """Corrupt a few bytes anywhere in the header: the index parses or raises CorruptModelError, nothing else."""
    data = small.read_bytes()
    header_end = read_tensor_index(small).data_offset
    rng = np.random.default_rng(1)
    path = tmp_path / "flipped.gguf"
    for _ in range(300):
        mutated = bytearray(data)
        for at in rng.integers(0, header_end, size=int(rng.integers(1, 4))):
            mutated[at] = int(rng.integers(0, 256))
        path.write_bytes(bytes(mutated))
        try:
            read_tensor_index(path)
        except CorruptModelError as exc:
            assert "flipped.gguf" in str(exc)


def test_big_endian_file_is_refused(tmp_path: Path) -> None:
    path = write_file(tmp_path / "big.gguf", endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(CorruptModelError, match="big.gguf.*big-endian"):
        read_tensor_index(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        read_tensor_index(tmp_path / "nope.gguf")


@pytest.mark.slow
@pytest.mark.real_model
def test_real_default_model_matches_gguf_reader() -> None:
    from real_model_helpers import default_model_dir

    from promptstash.models.loader import GGUF_WEIGHTS

    path = default_model_dir() / GGUF_WEIGHTS
    start = time.perf_counter()
    index = read_tensor_index(path)
    fast = time.perf_counter() - start
    start = time.perf_counter()
    reader = gguf.GGUFReader(str(path))
    slow = time.perf_counter() - start
    print(f"\nread_tensor_index {fast:.3f} s, gguf.GGUFReader {slow:.3f} s ({len(index.tensors)} tensors)")
    assert fast < slow
    assert index.architecture == "qwen2"
    assert len(index.tensors) == len(reader.tensors) == 291
    for mine, theirs in zip(index.tensors, reader.tensors, strict=True):
        assert (mine.name, mine.tensor_type, mine.data.dtype, mine.data.shape, mine.data_offset) == (
            theirs.name, theirs.tensor_type, theirs.data.dtype, theirs.data.shape, theirs.data_offset)
        assert np.array_equal(mine.data, theirs.data), mine.name
