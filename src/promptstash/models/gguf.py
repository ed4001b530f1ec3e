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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from promptstash.errors import CorruptModelError, ModelLoadError
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

    reader = open_reader(path)
    permute_qk = architecture_of(reader) in ("llama", "mistral")
    quantized = weight_format in ("int8", "int4")
    out: dict[str, torch.Tensor | QuantWeight] = {}
    for tensor in reader.tensors:
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
    del reader
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
    try:
        import gguf
    except ImportError as exc:
        raise ModelLoadError("reading GGUF files needs the gguf package: pip install 'promptstash[gguf]'") from exc
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
