"""The byte format of one stored block: a small header, then the K/V payload.

    b"PSKV" | u32 header_len | header JSON (utf-8) | payload
    header: format version, block hash, model id, KV layout, layer count, payload shape and dtype,
            token count, XXH3-128 of the payload, and the expiry (wall-clock seconds, or null)

XXH3 is not a cryptographic hash: it detects damage (truncation, flipped bits), not a forger with write
access to the cache directory or Redis, who could as well rewrite the header.

NOTE: decode() checks every field against what the reader expects; anything that does not match
(truncation, a flipped bit, another model's entry, another shape) raises CorruptEntryError, and the
caller deletes the entry and recomputes. A damaged entry can never reach the pool.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import xxhash

MAGIC = b"PSKV"
FORMAT_VERSION = 2
_LEN = struct.Struct("<I")
MAX_HEADER = 64 * 1024


class CorruptEntryError(ValueError):
    pass


@dataclass(frozen=True)
class EntryMeta:
    """What a reader expects of an entry besides its payload."""

    model_id: str
    kv_layout: str
    num_layers: int
    shape: tuple[int, ...]  # payload shape, e.g. (2, layers, block_size, kv_heads, head_dim)
    dtype: str  # storage dtype, e.g. "bfloat16"
    num_tokens: int

    @property
    def payload_bytes(self) -> int:
        size = {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]
        n = 1
        for d in self.shape:
            n *= d
        return n * size


def _digest(payload: bytes | memoryview) -> str:
    return xxhash.xxh3_128_hexdigest(payload)


def encode(block_hash: bytes, meta: EntryMeta, payload: bytes, expires_at: float | None) -> bytes:
    if len(payload) != meta.payload_bytes:
        raise ValueError(f"payload has {len(payload)} bytes; {meta} needs {meta.payload_bytes}")
    header = json.dumps({
        "version": FORMAT_VERSION, "block_hash": block_hash.hex(), "model_id": meta.model_id,
        "kv_layout": meta.kv_layout, "num_layers": meta.num_layers, "shape": list(meta.shape),
        "dtype": meta.dtype, "num_tokens": meta.num_tokens, "checksum": _digest(payload),
        "expires_at": expires_at,
    }, separators=(",", ":")).encode()
    return MAGIC + _LEN.pack(len(header)) + header + payload


def read_header(data: bytes) -> tuple[dict, int]:
    """The header dict and the payload offset. Raises CorruptEntryError."""
    if len(data) < 8 or data[:4] != MAGIC:
        raise CorruptEntryError("not a promptstash KV entry (bad magic or truncated)")
    (n,) = _LEN.unpack_from(data, 4)
    if n > MAX_HEADER or len(data) < 8 + n:
        raise CorruptEntryError("truncated header")
    try:
        header = json.loads(data[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptEntryError(f"unreadable header: {exc}") from None
    if not isinstance(header, dict):
        raise CorruptEntryError("header is not an object")
    return header, 8 + n


def decode(data: bytes, block_hash: bytes, meta: EntryMeta) -> memoryview:
    """The payload of a valid entry for this block and reader. Raises CorruptEntryError."""
    header, offset = read_header(data)
    expected = {"version": FORMAT_VERSION, "block_hash": block_hash.hex(), "model_id": meta.model_id,
                "kv_layout": meta.kv_layout, "num_layers": meta.num_layers, "shape": list(meta.shape),
                "dtype": meta.dtype, "num_tokens": meta.num_tokens}
    for key, value in expected.items():
        if header.get(key) != value:
            raise CorruptEntryError(f"{key} is {header.get(key)!r}, expected {value!r}")
    payload = memoryview(data)[offset:]
    if len(payload) != meta.payload_bytes:
        raise CorruptEntryError(f"payload has {len(payload)} bytes, expected {meta.payload_bytes}")
    if _digest(payload) != header.get("checksum"):
        raise CorruptEntryError("checksum mismatch")
    return payload
