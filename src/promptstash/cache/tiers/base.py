"""The tier interface and its statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class TierStats:
    """Counters of one tier (monotonic, except num_entries / num_bytes)."""

    name: str
    num_entries: int = 0
    num_bytes: int = 0
    num_hits: int = 0
    num_misses: int = 0
    num_writes: int = 0
    num_refused_writes: int = 0  # over the size cap, disk full, read-only directory
    num_failed_writes: int = 0  # backend errors (Redis unreachable, I/O error)
    num_failed_reads: int = 0
    num_corrupt: int = 0  # entries found damaged and deleted (at start, or when a load verified them)
    num_expired: int = 0
    load_seconds: float = 0.0  # time spent in get() on hits
    num_loaded_blocks: int = 0  # entries verified and copied into the pool


class Tier(Protocol):
    """A store of entries keyed by block hash.

    Contract: no method raises for backend trouble (a full disk, a Redis that went away): get() then
    misses and put() returns False, and the failure is counted in stats(). Entries are bytes made by
    entry.encode(); the tier does not look inside them.
    """

    name: str

    def get(self, block_hash: bytes) -> bytes | None:
        """The entry, or None (missing, expired or unreadable)."""
        ...

    def contains(self, block_hash: bytes) -> bool:
        """Cheap existence check (may be stale: get() can still miss)."""
        ...

    def put(self, block_hash: bytes, entry: bytes, ttl_s: float | None) -> bool:
        """Store an entry, replacing any; ttl_s None = no expiry (evicted by size alone). True if stored."""
        ...

    def delete(self, block_hash: bytes) -> None:
        ...

    def stats(self) -> TierStats:
        ...

    def close(self) -> None:
        ...
