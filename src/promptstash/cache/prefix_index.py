"""block hash -> pool block, for longest-prefix lookup. Knows nothing of tensors or tiers."""

from __future__ import annotations

from collections.abc import Sequence


class PrefixIndex:
    def __init__(self) -> None:
        self._blocks: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    def get(self, block_hash: bytes) -> int | None:
        return self._blocks.get(block_hash)

    def longest_prefix(self, hashes: Sequence[bytes], start: int = 0, max_blocks: int | None = None) -> list[int]:
        """Blocks for hashes[start:], stopping at the first miss or after max_blocks hashes in total."""
        end = len(hashes) if max_blocks is None else min(len(hashes), max_blocks)
        found = []
        for j in range(start, end):
            block_id = self._blocks.get(hashes[j])
            if block_id is None:
                break
            found.append(block_id)
        return found

    def insert(self, block_hash: bytes, block_id: int) -> bool:
        """Publish a block; False (and no change) if another block already holds this hash."""
        if block_hash in self._blocks:
            return False
        self._blocks[block_hash] = block_id
        return True

    def remove(self, block_hash: bytes, block_id: int) -> None:
        if self._blocks.get(block_hash) == block_id:
            del self._blocks[block_hash]

    def items(self) -> list[tuple[bytes, int]]:
        return list(self._blocks.items())
