"""Byte records in the tiers: small opaque payloads (e.g. semantic-cache responses) next to the KV blocks.

    b"PSKV" | u32 header_len | header JSON (utf-8) | payload      (the framing of entry.py, so tiers and the disk
                                                                   tier's start-up scan treat both alike)
    header: {"record": kind, "version", "key": hex, "checksum": XXH3-128 of the payload, "expires_at"}

NOTE: decode_record() checks the magic, the kind, the version, the key it was stored under and the checksum;
anything else (a KV block entry, another kind, truncation, a flipped bit) raises CorruptEntryError, and the
caller ignores (and deletes) the record. A KV reader rejects a record too: its header has no KV fields.
"""

from __future__ import annotations

import json

import xxhash

from promptstash.cache.tiers.entry import _LEN, MAGIC, CorruptEntryError, read_header

RECORD_VERSION = 1


def encode_record(kind: str, key: bytes, payload: bytes, expires_at: float | None = None) -> bytes:
    header = json.dumps({"record": kind, "version": RECORD_VERSION, "key": key.hex(),
                         "checksum": xxhash.xxh3_128_hexdigest(payload), "expires_at": expires_at},
                        separators=(",", ":")).encode()
    return MAGIC + _LEN.pack(len(header)) + header + payload


def decode_record(data: bytes, kind: str, key: bytes) -> bytes:
    """The payload of a valid `kind` record stored under `key`. Raises CorruptEntryError."""
    header, offset = read_header(data)
    for field, value in (("record", kind), ("version", RECORD_VERSION), ("key", key.hex())):
        if header.get(field) != value:
            raise CorruptEntryError(f"{field} is {header.get(field)!r}, expected {value!r}")
    payload = bytes(data[offset:])
    if xxhash.xxh3_128_hexdigest(payload) != header.get("checksum"):
        raise CorruptEntryError("checksum mismatch")
    return payload
