"""Eviction policies: which cached, unreferenced block the pool takes next. Know nothing of K/V or tiers.

The pool hands a policy every block that becomes evictable (ref_count 0 with a hash) and takes it back when
the block is referenced again; `pop()` names the victim. The cache manager adds what only it knows, through
`note_sequence()`: when a sequence closes (a turn of a conversation ends), its published blocks head first
and its length. A policy may ignore that hint.

    lru    least recently released first; a closing sequence's tail before its head (today's behaviour)
    tlru   Tail-Optimized LRU (arXiv 2510.15152): a closing sequence's tail blocks that its next turn could
           recompute within the TTFT target are "safe" and go first (LRU among them), then plain LRU
    cost   GreedyDual-Size-Frequency: priority = L + uses × recompute cost; the lowest goes first, and
           L rises to each victim's priority, so idle blocks age out

NOTE: TTL-protected blocks hold a reference (their pin), so they are never evictable under any policy.
"""

from __future__ import annotations

import heapq
import statistics
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

EVICTION_POLICIES = ("lru", "tlru", "cost")


@dataclass(frozen=True)
class EvictionConfig:
    policy: str = "lru"
    ttft_slo_s: float = 1.0  # tlru: the time-to-first-token target
    prefill_tokens_per_s: float = 2000.0  # tlru: prefill speed until measured (CacheManager.set_prefill_rate)
    next_turn_tokens: int | None = None  # tlru: new tokens of a conversation's next turn; None = measured
    attention_tokens: int = 8192  # cost: context length at which a token's attention costs its dense layers

    def __post_init__(self) -> None:
        if self.policy not in EVICTION_POLICIES:
            raise ValueError(f"eviction policy must be one of {', '.join(EVICTION_POLICIES)}, got {self.policy!r}")
        if not self.ttft_slo_s > 0:
            raise ValueError(f"ttft_slo_s must be > 0, got {self.ttft_slo_s}")
        if not self.prefill_tokens_per_s > 0:
            raise ValueError(f"prefill_tokens_per_s must be > 0, got {self.prefill_tokens_per_s}")
        if self.next_turn_tokens is not None and self.next_turn_tokens < 0:
            raise ValueError(f"next_turn_tokens must be >= 0, got {self.next_turn_tokens}")
        if self.attention_tokens < 1:
            raise ValueError(f"attention_tokens must be >= 1, got {self.attention_tokens}")


class EvictionPolicy(Protocol):
    """The order in which evictable blocks are taken. Every method is O(1) or O(log n) per block."""

    name: str

    def __len__(self) -> int: ...

    def __contains__(self, block_id: int) -> bool: ...

    def __iter__(self) -> Iterator[int]:
        """Evictable blocks in no particular order (for checks)."""
        ...

    def add(self, block_id: int) -> None:
        """The block became evictable (blocks of one release arrive in the order the caller released them)."""
        ...

    def remove(self, block_id: int) -> None:
        """The block is referenced again (a hit): no longer evictable."""
        ...

    def pop(self) -> int:
        """Take the next victim (the caller checked len() > 0); the policy forgets it."""
        ...

    def order(self) -> list[int]:
        """Evictable blocks, the next victim first (tests and stats; may be O(n log n))."""
        ...

    def note_sequence(self, block_ids: Sequence[int], seq_len: int) -> None:
        """Hint, called just before a finished sequence's blocks are released: its published blocks, head
        first, and its length in tokens."""
        ...

    def note_request(self, prompt_len: int, num_cached: int) -> None:
        """Hint: a request was admitted with num_cached of its prompt_len tokens from the cache."""
        ...

    def set_prefill_rate(self, tokens_per_s: float) -> None:
        """Hint: the engine's measured prefill speed."""
        ...


class _NoHints:
    """The hints of EvictionPolicy as no-ops, for policies that ignore them."""

    def note_sequence(self, block_ids: Sequence[int], seq_len: int) -> None:
        pass

    def note_request(self, prompt_len: int, num_cached: int) -> None:
        pass

    def set_prefill_rate(self, tokens_per_s: float) -> None:
        pass


class LRUPolicy(_NoHints):
    """Least recently released first. NOTE: callers release a sequence tail first, so its tail goes first."""

    name = "lru"

    def __init__(self) -> None:
        self._queue: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._queue)

    def __contains__(self, block_id: int) -> bool:
        return block_id in self._queue

    def __iter__(self) -> Iterator[int]:
        return iter(self._queue)

    def add(self, block_id: int) -> None:
        self._queue[block_id] = None

    def remove(self, block_id: int) -> None:
        del self._queue[block_id]

    def pop(self) -> int:
        return self._queue.popitem(last=False)[0]

    def order(self) -> list[int]:
        return list(self._queue)


class TailOptimizedLRUPolicy:
    """T-LRU: a conversation's next turn recomputes what the cache lost of it plus its new tokens. Keeping
    only its first `m` blocks keeps that turn under the TTFT target while

        (seq_len - m * block_size) + next_turn_tokens <= ttft_slo_s * prefill_tokens_per_s  (= budget)

    so blocks from m_min = ceil((seq_len + next_turn_tokens - budget) / block_size) on are "safe": losing them
    costs no SLO violation. They are evicted first (LRU among them), then every other block by LRU.

        blocks:   [ 0 ][ 1 ][ 2 ][ 3 ][ 4 ][ 5 ]  (seq_len = 6 blocks, budget - next_turn = 2.5 blocks)
                                      ^ m_min = 4: blocks 4 and 5 are safe

    next_turn_tokens, unless fixed, is the median uncached prompt length of recent requests that hit the
    cache (follow-up turns), or of all recent requests before any hit.
    NOTE: a block is safe only while it was in the safe tail of every sequence that closed holding it: once a
    sequence needed it to meet the target (a long conversation's head, a shared system prompt), it stays
    unsafe until evicted. Measured (`bench policies`, ShareGPT): letting each closing sequence re-mark its
    blocks instead gave 39.7% / 46.4% token hit rate at 5% / 10% pools, against 41.7% / 49.3% this way.
    """

    name = "tlru"

    def __init__(self, block_size: int, ttft_slo_s: float, prefill_tokens_per_s: float,
                 next_turn_tokens: int | None = None) -> None:
        self.block_size = block_size
        self.ttft_slo_s = ttft_slo_s
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.fixed_next_turn_tokens = next_turn_tokens
        self._safe: OrderedDict[int, None] = OrderedDict()
        self._rest: OrderedDict[int, None] = OrderedDict()
        self._marked: set[int] = set()  # safe: in the safe tail of every sequence that closed holding it
        self._needed: set[int] = set()  # unsafe for good: some sequence needed it to meet the target
        self._follow_ups: deque[int] = deque(maxlen=256)  # uncached tokens of requests that hit the cache
        self._firsts: deque[int] = deque(maxlen=256)  # uncached tokens of requests that did not

    def __len__(self) -> int:
        return len(self._safe) + len(self._rest)

    def __contains__(self, block_id: int) -> bool:
        return block_id in self._safe or block_id in self._rest

    def __iter__(self) -> Iterator[int]:
        yield from self._safe
        yield from self._rest

    @property
    def budget_tokens(self) -> float:
        return self.ttft_slo_s * self.prefill_tokens_per_s

    @property
    def next_turn_tokens(self) -> int:
        if self.fixed_next_turn_tokens is not None:
            return self.fixed_next_turn_tokens
        sample = self._follow_ups or self._firsts
        return int(statistics.median(sample)) if sample else 0

    def add(self, block_id: int) -> None:
        (self._safe if block_id in self._marked else self._rest)[block_id] = None

    def remove(self, block_id: int) -> None:
        if block_id in self._safe:
            del self._safe[block_id]
        else:
            del self._rest[block_id]

    def pop(self) -> int:
        queue = self._safe if self._safe else self._rest
        block_id = queue.popitem(last=False)[0]
        self._marked.discard(block_id)
        self._needed.discard(block_id)
        return block_id

    def order(self) -> list[int]:
        return [*self._safe, *self._rest]

    def note_sequence(self, block_ids: Sequence[int], seq_len: int) -> None:
        spare = self.budget_tokens - self.next_turn_tokens
        excess = seq_len - spare  # tokens that must stay cached to meet the target
        m_min = max(0, -(-int(excess) // self.block_size)) if excess > 0 else 0
        for j, block_id in enumerate(block_ids):
            if j < m_min:
                self._marked.discard(block_id)
                self._needed.add(block_id)
            elif block_id not in self._needed:
                self._marked.add(block_id)

    def note_request(self, prompt_len: int, num_cached: int) -> None:
        (self._follow_ups if num_cached > 0 else self._firsts).append(prompt_len - num_cached)

    def set_prefill_rate(self, tokens_per_s: float) -> None:
        if tokens_per_s > 0:
            self.prefill_tokens_per_s = tokens_per_s


class CostAwarePolicy(_NoHints):
    """GreedyDual-Size-Frequency over blocks of one size: priority = L + uses × cost, lowest evicted first.

    A block's cost is the compute its loss forces on a later hit: itself and every block after it in the
    sequence (a prefix match stops at the first missing block), each block weighted by its attention depth:

        cost(j) = sum over k = j .. n-1 of (1 + (k + 1/2) * block_size / attention_tokens)   [block computes]

    so the head of a long document costs far more than the head of a short one, and a sequence's tail goes
    before its head. uses counts the sequences that closed holding the block. L starts at 0 and becomes each
    victim's priority, so blocks not used for a while fall below newly released ones (aging).
    NOTE: a block keeps the highest cost any sequence gave it until it is evicted.
    """

    name = "cost"

    def __init__(self, block_size: int, attention_tokens: int) -> None:
        self.block_size = block_size
        self.attention_tokens = attention_tokens
        self.inflation = 0.0  # L
        self._priority: dict[int, float] = {}  # evictable block -> its priority now
        self._heap: list[tuple[float, int, int]] = []  # (priority, tiebreak, block); stale entries skipped
        self._cost: dict[int, float] = {}
        self._uses: dict[int, int] = {}
        self._tiebreak = 0

    def __len__(self) -> int:
        return len(self._priority)

    def __contains__(self, block_id: int) -> bool:
        return block_id in self._priority

    def __iter__(self) -> Iterator[int]:
        return iter(self._priority)

    def priority(self, block_id: int) -> float:
        return self.inflation + self._uses.get(block_id, 1) * self._cost.get(block_id, 1.0)

    def add(self, block_id: int) -> None:
        value = self.priority(block_id)
        self._priority[block_id] = value
        self._tiebreak += 1  # released later -> evicted later among equals (LRU among ties)
        heapq.heappush(self._heap, (value, self._tiebreak, block_id))

    def remove(self, block_id: int) -> None:
        del self._priority[block_id]  # its heap entry goes stale

    def pop(self) -> int:
        while True:
            value, _, block_id = heapq.heappop(self._heap)
            if self._priority.get(block_id) == value:
                break
        del self._priority[block_id]
        self._cost.pop(block_id, None)
        self._uses.pop(block_id, None)
        self.inflation = max(self.inflation, value)
        if len(self._heap) > 4 * len(self._priority) + 64:
            self._compact()
        return block_id

    def _compact(self) -> None:
        live = {b: v for b, v in self._priority.items()}
        self._heap = [(v, t, b) for v, t, b in self._heap if live.get(b) == v]
        heapq.heapify(self._heap)

    def order(self) -> list[int]:
        return [b for _, _, b in sorted(e for e in self._heap if self._priority.get(e[2]) == e[0])]

    def note_sequence(self, block_ids: Sequence[int], seq_len: int) -> None:
        total = 0.0
        for k in range(len(block_ids) - 1, -1, -1):
            total += 1.0 + (k + 0.5) * self.block_size / self.attention_tokens
            block_id = block_ids[k]
            self._cost[block_id] = max(self._cost.get(block_id, 0.0), total)
            self._uses[block_id] = self._uses.get(block_id, 0) + 1


def make_policy(config: EvictionConfig, block_size: int) -> EvictionPolicy:
    if config.policy == "tlru":
        return TailOptimizedLRUPolicy(block_size, config.ttft_slo_s, config.prefill_tokens_per_s,
                                      config.next_turn_tokens)
    if config.policy == "cost":
        return CostAwarePolicy(block_size, config.attention_tokens)
    return LRUPolicy()
