"""Read a GGUF file's weights straight into a weight format (no float32 copy of the model on disk).

    GGUF tensor                      Hugging Face name
    token_embd.weight                model.embed_tokens.weight
    output.weight / output_norm      lm_head.weight / model.norm.weight
    blk.N.attn_{q,k,v}.{weight,bias} model.layers.N.self_attn.{q,k,v}_proj.*
    blk.N.attn_output.weight         model.layers.N.self_attn.o_proj.weight
    blk.N.ffn_{gate,up,down}.weight  model.layers.N.mlp.{gate,up,down}_proj.weight
    blk.N.attn_norm / ffn_norm       model.layers.N.input_layernorm / post_attention_layernorm

How each stored type becomes each format:
- Q4_K into int4: exact re-layout. A Q4_K sub-block of 32 values is w = d * sc * q - dmin * m with q in 0..15,
  which is int4's (q - 8) * scale + zero with scale = d * sc and zero = 8 * scale - dmin * m. (The
  quantized kernels hold scales in bfloat16, so scale and zero are rounded to bfloat16 there.)
- every other type (Q5_0, Q6_K, Q8_0, F16, ...): dequantized a few thousand rows at a time by the gguf
  package and quantized into the target format (or cast, for float formats), except that int4 never takes
  away bits the file kept: tensors stored with more than 4 bits become int8 (the default file's Q5_0, Q6_K
  and Q8_0 tensors), so its numerics stay the file's; except the output head, which int4 holds in 4 bits
  (it is the largest product of a decode step).
- 1-D tensors (norms, biases) stay float.
Llama/Mistral GGUF files store q/k rows permuted for interleaved RoPE; they are put back in HF order.

The tensor index (read_tensor_index): read_weights does not use gguf.GGUFReader, which parses every metadata
value element by element (the default file's 151,936 tokens and 151,387 merges: seconds per load). It parses
the header itself, skipping array values by walking their lengths, and memory-maps each tensor's data with
the dtype and shape GGUFReader gives. All integers little-endian:

    magic "GGUF" | version u32 (2, 3) | n_tensors u64 | n_kv u64
    n_kv x      key: string | value type u32 | value
                    string = length u64 | utf-8 bytes
                    array  = element type u32 | count u64 | count values (strings, scalars or arrays)
                    scalar = u8 i8 u16 i16 u32 i32 f32 bool u64 i64 f64 (gguf.GGUFValueType)
    n_tensors x name: string | n_dims u32 | n_dims x dim u64 (innermost first: numpy shape reversed)
                | ggml type u32 (gguf.GGMLQuantizationType) | offset u64 (from the data start)
    padding to general.alignment (u32, a power of two; 32 when absent)
    data start: each tensor's bytes at data start + offset

Scalar values are kept (general.architecture, general.alignment, ...); arrays are skipped. A file cut
short, garbage, or a tensor whose data runs past the end of the file raises CorruptModelError naming it.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from promptstash.errors import CorruptModelError, ModelLoadError, ModelNotFoundError
from promptstash.models.quant import INT4_GROUP, QuantWeight, concat_rows, permute_rows, quantize

_ROWS = 4096
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output": "lm_head", "output_norm": "model.norm"}


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face parameter name of a GGUF tensor, or None for tensors we do not use (rope_freqs)."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{kind}"
    return None


def read_weights(path: Path, weight_format: str, num_heads: int, num_kv_heads: int,
                 quantize_embedding: bool = True) -> dict[str, torch.Tensor | QuantWeight]:
    """Every weight of the GGUF file `path`, under HF names, in `weight_format`.

    Float formats give float32 tensors (the caller casts). Quantized formats give QuantWeight for 2-D
    weights; the token embedding is int8 (looked up row by row) when `quantize_embedding`.
    Raises CorruptModelError for an unreadable file or a tensor whose data cannot be decoded.
    """
    import gguf

    index = read_tensor_index(path)
    permute_qk = index.architecture in ("llama", "mistral")
    quantized = weight_format in ("int8", "int4")
    out: dict[str, torch.Tensor | QuantWeight] = {}
    for tensor in index.tensors:
        name = hf_name(tensor.name)
        if name is None:
            continue
        qtype = tensor.tensor_type
        data = np.asarray(tensor.data)
        try:
            if data.ndim == 1 or not quantized:
                value: torch.Tensor | QuantWeight = _dequantized(gguf, data, qtype)
                if value.dim() == 2 and permute_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
                    value = value[_qk_order(value.shape[0], num_heads if "q_proj" in name else num_kv_heads)]
            else:
                target = weight_format
                if name == "model.embed_tokens.weight" or (
                        weight_format == "int4" and qtype not in _FOUR_BIT_TYPES(gguf) and name != "lm_head.weight"):
                    # NOTE: int4 keeps the file's precision: a tensor stored with more than 4 bits (Q5_0, Q6_K,
                    # Q8_0, F16) becomes int8, not int4; `bench perplexity` measured re-quantizing the default
                    # file's Q5_0 tensors to 4 bits at +10% perplexity against llama.cpp on the same file.
                    # The output head is the exception: the largest product of a decode step (vocabulary x
                    # hidden), 2.4x faster in int4 than in int8, at +0.27% perplexity (measured the same way)
                    target = "int8"
                if name == "model.embed_tokens.weight" and not quantize_embedding:
                    value = _dequantized(gguf, data, qtype)
                elif target == "int4" and qtype == gguf.GGMLQuantizationType.Q4_K:
                    value = q4k_to_int4(data)
                else:
                    value = _quantized(gguf, data, qtype, target)
                if permute_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
                    assert isinstance(value, QuantWeight)
                    value = permute_rows(value, _qk_order(value.shape[0],
                                                          num_heads if "q_proj" in name else num_kv_heads))
        except (ValueError, NotImplementedError) as exc:
            raise CorruptModelError(f"{path}: cannot decode tensor {tensor.name} ({qtype.name}): {exc}") from exc
        out[name] = value
    del index
    release_free_memory()
    return out


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps the load's float scratch otherwise)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def open_reader(path: Path, detail: str = "") -> Any:
    """A gguf.GGUFReader over `path` (memory-mapped). Raises ModelLoadError without the gguf package and
    CorruptModelError (naming the file, and `detail` about it) when the file cannot be parsed."""
    gguf = _import_gguf()
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:
        raise CorruptModelError(f"{path} is truncated or corrupt{detail}: the GGUF reader failed with: {exc}") from exc


def architecture_of(reader: Any) -> str | None:
    """The file's general.architecture, or None when it has none."""
    field = reader.fields.get("general.architecture")
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise ModelLoadError("reading GGUF files needs the gguf package: pip install 'promptstash[gguf]'") from exc
    return gguf


# -- tensor index -------------------------------------------------------------------------------------
#   the header layout is in the module docstring

@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: what read_weights uses of gguf.GGUFReader's ReaderTensor, and where it lies."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # the values' numpy shape (GGUF dims reversed), before any byte re-shaping
    data_offset: int  # absolute, in bytes
    n_bytes: int
    data: np.ndarray  # memmap view, dtype and shape as GGUFReader's (quantized types: uint8 [..., bytes per row])


@dataclass(frozen=True)
class GGUFIndex:
    """The tensors of a GGUF file and its scalar metadata (array values such as the vocabulary are skipped)."""

    path: Path
    version: int
    alignment: int
    data_offset: int
    metadata: dict[str, str | int | float | bool]
    tensors: list[GGUFTensor]

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None


class _Corrupt(Exception):
    """Internal: what is wrong with the file, at which byte (read_tensor_index adds the path)."""


_GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_MAX_ARRAY_NESTING = 16
_HEAD = struct.Struct("<4sIQQ")  # magic, version, n_tensors, n_kv
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_ARRAY_HEAD = struct.Struct("<IQ")  # element type, count
_TENSOR_TAIL = struct.Struct("<IQ")  # ggml type, offset
_SCALARS: dict[int, struct.Struct] = {}  # GGUFValueType -> little-endian struct, from the gguf package's table
# ggml types GGUFReader maps to a numpy element dtype; every other type (quantized, BF16) is raw uint8 bytes
_FLOAT_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                 "I32": np.int32, "I64": np.int64}


def read_tensor_index(path: Path) -> GGUFIndex:
    """Index the tensors of the GGUF file `path` without parsing its array metadata (see the module docstring).

    Each tensor's `.data` is a view of one read-only memory map of the file, with the dtype and shape
    gguf.GGUFReader gives. Raises ModelLoadError without the gguf package, ModelNotFoundError for a missing
    file and CorruptModelError naming the file when it is truncated, garbage or not a little-endian GGUF v2/v3.
    """
    gguf = _import_gguf()
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError as exc:
        raise ModelNotFoundError(f"GGUF file {path} does not exist") from exc
    if size < _HEAD.size:
        head = path.read_bytes()
        what = "truncated" if head and _GGUF_MAGIC.startswith(head[:4]) else "not a GGUF file"
        raise CorruptModelError(f"{path} is {what}: {size} bytes, a GGUF header needs {_HEAD.size}")
    mm = np.memmap(path, mode="r")
    buf = memoryview(mm)
    try:
        index = _parse_index(gguf, mm, buf)
    except _Corrupt as exc:
        raise CorruptModelError(f"{path} is truncated or corrupt ({size:,} bytes): {exc}") from None
    except (struct.error, ValueError, IndexError, OverflowError, KeyError) as exc:  # a check this parser lacks
        raise CorruptModelError(f"{path} is truncated or corrupt ({size:,} bytes): {exc!r}") from exc
    finally:
        buf.release()
    return GGUFIndex(path=path, **index)


def _parse_index(gguf: Any, mm: np.ndarray, buf: memoryview) -> dict[str, Any]:
    value_types = gguf.GGUFValueType
    if not _SCALARS:
        _SCALARS.update({int(t): struct.Struct("<" + fmt)
                         for t, fmt in gguf.GGUFWriter._simple_value_packing.items()})
    size = len(buf)
    magic, version, n_tensors, n_kv = _HEAD.unpack_from(buf, 0)
    if magic != _GGUF_MAGIC:
        raise _Corrupt(f"not a GGUF file: magic {magic!r} at byte 0, expected {_GGUF_MAGIC!r}")
    if version not in _GGUF_VERSIONS:
        if version and version & 0xFFFF == 0:
            raise _Corrupt(f"a big-endian GGUF file (version word {version:#x}); only little-endian is read")
        raise _Corrupt(f"GGUF version {version}; expected one of {', '.join(map(str, _GGUF_VERSIONS))}")
    pos = _HEAD.size

    def need(n: int, what: str) -> None:
        if pos + n > size:
            raise _Corrupt(f"{what} at byte {pos:,} needs {n:,} bytes, the file ends at {size:,}")

    def string(what: str) -> bytes:
        nonlocal pos
        need(8, f"the length of {what}")
        (length,) = _U64.unpack_from(buf, pos)
        pos += 8
        need(length, what)
        pos += length
        return bytes(buf[pos - length:pos])

    def skip_array(item_type: int, count: int, key: str, depth: int) -> None:
        nonlocal pos
        if item_type == value_types.STRING:
            # NOTE: the hot loop of the whole index (the default file: 303k strings, ~50 ms): no per-item calls
            unpack, end, at = _U64.unpack_from, size - 8, pos
            for _ in range(count):
                if at > end:
                    break
                at += 8 + unpack(buf, at)[0]
            else:
                if at <= size:
                    pos = at
                    return
            raise _Corrupt(f"string array {key!r} ({count:,} items from byte {pos:,}) runs past the end of "
                           f"the file ({size:,} bytes)")
        scalar = _SCALARS.get(item_type)
        if scalar is not None:
            need(count * scalar.size, f"array {key!r} of {count:,} items")
            pos += count * scalar.size
        elif item_type == value_types.ARRAY:
            if depth >= _MAX_ARRAY_NESTING:
                raise _Corrupt(f"array {key!r} nests arrays more than {_MAX_ARRAY_NESTING} deep")
            for _ in range(count):
                need(_ARRAY_HEAD.size, f"an array inside {key!r}")
                inner_type, inner_count = _ARRAY_HEAD.unpack_from(buf, pos)
                pos += _ARRAY_HEAD.size
                skip_array(inner_type, inner_count, key, depth + 1)
        else:
            raise _Corrupt(f"array {key!r} has unknown element type {item_type} at byte {pos:,}")

    metadata: dict[str, str | int | float | bool] = {}
    seen: set[str] = set()
    alignment = _DEFAULT_ALIGNMENT
    for number in range(n_kv):
        start = pos
        key = _text(string(f"metadata key {number} of {n_kv:,}"), "a metadata key", start)
        if key in seen:
            raise _Corrupt(f"metadata key {key!r} appears twice (again at byte {start:,})")
        seen.add(key)
        need(4, f"the value type of {key!r}")
        (value_type,) = _U32.unpack_from(buf, pos)
        pos += 4
        scalar = _SCALARS.get(value_type)
        if value_type == value_types.STRING:
            metadata[key] = string(f"the value of {key!r}").decode("utf-8", errors="replace")
        elif scalar is not None:
            need(scalar.size, f"the value of {key!r}")
            metadata[key] = scalar.unpack_from(buf, pos)[0]
            pos += scalar.size
        elif value_type == value_types.ARRAY:
            need(_ARRAY_HEAD.size, f"the array {key!r}")
            item_type, count = _ARRAY_HEAD.unpack_from(buf, pos)
            pos += _ARRAY_HEAD.size
            skip_array(item_type, count, key, 0)
        else:
            raise _Corrupt(f"metadata {key!r} has unknown value type {value_type} at byte {pos - 4:,}")
        if key == "general.alignment":
            alignment = metadata[key]  # type: ignore[assignment]
            if value_type != value_types.UINT32 or not isinstance(alignment, int) or alignment <= 0 or (
                    alignment & (alignment - 1)):
                raise _Corrupt(f"general.alignment must be a power of two stored as uint32, found {alignment!r} "
                               f"(value type {value_type})")

    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    for number in range(n_tensors):
        start = pos
        name = _text(string(f"the name of tensor {number} of {n_tensors:,}"), "a tensor name", start)
        need(4, f"the dimension count of tensor {name!r}")
        (n_dims,) = _U32.unpack_from(buf, pos)
        pos += 4
        need(8 * n_dims + _TENSOR_TAIL.size, f"the dimensions, type and offset of tensor {name!r}")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos)
        pos += 8 * n_dims
        raw_type, offset = _TENSOR_TAIL.unpack_from(buf, pos)
        pos += _TENSOR_TAIL.size
        infos.append((name, dims, raw_type, offset))

    data_start = -(-pos // alignment) * alignment
    qtypes = gguf.GGMLQuantizationType
    tensors: list[GGUFTensor] = []
    names: set[str] = set()
    for name, dims, raw_type, offset in infos:
        if name in names:
            raise _Corrupt(f"tensor {name!r} appears twice")
        names.add(name)
        try:
            qtype = qtypes(raw_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise _Corrupt(f"tensor {name!r} has unknown ggml type {raw_type}") from None
        shape = tuple(reversed(dims))
        n_elements = math.prod(dims)
        dtype = _FLOAT_DTYPES.get(qtype.name)
        if dtype is not None:
            view_shape = shape
        else:
            dtype = np.uint8
            if not shape or shape[-1] % block:
                raise _Corrupt(f"tensor {name!r} ({qtype.name}) has shape {list(shape)}: the row length is not "
                               f"a multiple of the {block}-value block")
            view_shape = (*shape[:-1], shape[-1] // block * type_size)
        n_bytes = n_elements * type_size // block
        begin = data_start + offset
        if begin + n_bytes > size:
            raise _Corrupt(f"tensor {name!r} ({qtype.name} {list(shape)}) spans bytes {begin:,}..{begin + n_bytes:,}, "
                           f"past the end of the file")
        data = mm[begin:begin + n_bytes].view(dtype).reshape(view_shape)
        tensors.append(GGUFTensor(name, qtype, shape, begin, n_bytes, data))
    return {"version": version, "alignment": alignment, "data_offset": data_start, "metadata": metadata,
            "tensors": tensors}


def _text(raw: bytes, what: str, at: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Corrupt(f"{what} at byte {at:,} is not UTF-8: {raw[:40]!r}") from None


def _FOUR_BIT_TYPES(gguf: object) -> tuple[object, ...]:  # noqa: N802
    types = gguf.GGMLQuantizationType  # type: ignore[attr-defined]
    return (types.Q4_K, types.Q4_0, types.Q4_1, types.Q3_K, types.Q2_K)


def _dequantized(gguf: object, data: np.ndarray, qtype: object) -> torch.Tensor:
    from gguf.quants import dequantize

    # NOTE: always a copy: a tensor viewing the file's memory map would keep the whole file mapped (and
    # counted in the RSS) for the life of the process
    return torch.from_numpy(np.array(dequantize(data, qtype), dtype=np.float32, copy=True))


def _quantized(gguf: object, data: np.ndarray, qtype: object, weight_format: str) -> QuantWeight:
    """Dequantize `_ROWS` rows at a time (bounded float32 scratch) and quantize each slice."""
    parts = [quantize(_dequantized(gguf, data[start:start + _ROWS], qtype), weight_format)
             for start in range(0, data.shape[0], _ROWS)]
    return parts[0] if len(parts) == 1 else concat_rows(parts)


def _qk_order(rows: int, num_heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation: hf[i] = gguf[order[i]]."""
    half = rows // num_heads // 2
    return torch.arange(rows).view(num_heads, half, 2).transpose(1, 2).reshape(-1)


# -- Q4_K ---------------------------------------------------------------------------------------------
#   super-block of 256 values, 144 bytes:  d f16 | dmin f16 | scales 12 B (8 x 6-bit sc, 8 x 6-bit m) | qs 128 B
#   qs chunk c (32 bytes, c = 0..3): low nibbles -> sub-block 2c, high nibbles -> sub-block 2c + 1

_Q4K_BYTES = 144


def q4k_to_int4(data: np.ndarray) -> QuantWeight:
    """Raw Q4_K rows [rows, blocks * 144] uint8 -> the same values as int4 (group 32), exactly."""
    rows = data.shape[0]
    blocks = np.ascontiguousarray(data).reshape(rows, -1, _Q4K_BYTES)  # [rows, nb, 144]
    nb = blocks.shape[1]
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [rows, nb]
    dmin = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    s = blocks[..., 4:16].astype(np.uint8)  # [rows, nb, 12]
    sc = np.empty((rows, nb, 8), dtype=np.uint8)
    m = np.empty((rows, nb, 8), dtype=np.uint8)
    sc[..., :4] = s[..., 0:4] & 63
    m[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    m[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    qs = blocks[..., 16:].reshape(rows, nb, 4, 32)
    q = np.stack([qs & 0xF, qs >> 4], axis=3)  # [rows, nb, 4, 2, 32]: sub-block 2c + h
    values = q.reshape(rows, nb * 256)
    scale = (d[..., None] * sc).reshape(rows, nb * 8)  # [rows, groups]
    low = (dmin[..., None] * m).reshape(rows, nb * 8)
    zero = 8 * scale - low
    return QuantWeight(4, torch.from_numpy(np.ascontiguousarray(values)), torch.from_numpy(scale.astype(np.float32)),
                       torch.from_numpy(zero.astype(np.float32)), INT4_GROUP)
