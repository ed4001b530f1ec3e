"""Chained block hashes: equal hash <=> equal tokens from the start of the prompt up to this block,
under the same model, KV layout and tenant namespace.

    root   = H(version, model id, kv layout, namespace)
    hash_0 = H(root,   tokens[0 : B])
    hash_j = H(hash_j-1, tokens[j*B : (j+1)*B])

blake2b-128 over little-endian uint32 token ids: stable across processes and restarts, so lower tiers
can be content-addressed by it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

HASH_VERSION = "promptstash-block-v1"
DIGEST_SIZE = 16


def root_hash(model_id: str, kv_layout: str, namespace: str) -> bytes:
    """The parent of a sequence's first block. `namespace` is the tenant (plus any salt)."""
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    for part in (HASH_VERSION, model_id, kv_layout, namespace):
        data = part.encode()
        h.update(len(data).to_bytes(4, "little"))
        h.update(data)
    return h.digest()


def block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=DIGEST_SIZE)
    h.update(np.asarray(token_ids, dtype="<u4").tobytes())
    return h.digest()


def extend_hashes(hashes: list[bytes], root: bytes, token_ids: Sequence[int], block_size: int) -> None:
    """Append the hashes of every full block of `token_ids` not yet in `hashes`."""
    for j in range(len(hashes), len(token_ids) // block_size):
        parent = hashes[j - 1] if j else root
        hashes.append(block_hash(parent, token_ids[j * block_size:(j + 1) * block_size]))


MODULE_KIND = "module"


def module_root_hash(model_id: str, kv_layout: str, namespace: str) -> bytes:
    """The parent of a module's first block: a prefix root with a fifth part, "module".

    NOTE: a module's K/V are computed in isolation from position 0, so they differ from the same tokens'
    K/V as a prompt prefix; the distinct root keeps the two apart in every index and tier.
    """
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    for part in (HASH_VERSION, model_id, kv_layout, namespace, MODULE_KIND):
        data = part.encode()
        h.update(len(data).to_bytes(4, "little"))
        h.update(data)
    return h.digest()


def module_hashes(root: bytes, token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Hashes of a module's blocks: every full block, then its partial tail block if it has one.

    A tail block's hash covers fewer tokens than a full block's, so it never equals a full block's hash.
    """
    hashes: list[bytes] = []
    extend_hashes(hashes, root, token_ids, block_size)
    tail = len(token_ids) % block_size
    if tail:
        hashes.append(block_hash(hashes[-1] if hashes else root, token_ids[len(token_ids) - tail:]))
    return hashes
