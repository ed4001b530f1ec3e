"""Assembling a prompt from modules: which module K/V are copied in, and which tokens are computed.

After its exact-prefix match, a request with modules (and a repair strategy other than `full`) computes
its prompt in three kinds of work, scheduled as chunks:

    prompt:    [ prefix hit ][ text ][ module A ][ text ][ module B ][ question ]
    encode:                           [ A alone ]                                 A missed the cache: computed
                                                                                  alone from position 0, copied
                                                                                  to A's own blocks, then its
                                                                                  keys moved to A's position
    fill:                                                  [ B copy  ]            B hit: its K/V copied in,
                                                                                  keys moved to B's position
    assemble:                 [ rows ][ repair ][ rows ][ repair ][ rows ... ]    every other token, plus
                                                                                  what the repair recomputes,
                                                                                  in position order

Each assembled row attends to everything before it: text and question rows see the modules' K/V; repair
rows (legolink: the first k tokens of each module; cacheblend: the module tokens selected by deviation)
overwrite those tokens' K/V with ones computed in full context.

NOTE: only the prefix before the first module holds exact K/V; the cache manager never publishes the
request's blocks beyond it (limit_publish), so approximate K/V never pose as an exact prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

from promptstash.cache.modules import ModuleRepair, ModuleSpan


@dataclass(eq=False)
class ModuleWork:
    """One module of a request, from the cache's point of view."""

    span: ModuleSpan
    hashes: tuple[bytes, ...]
    filled: bool = False  # its K/V are in the request's blocks, at its position
    hit: bool = False  # they came from the cache (else the request computed them alone)
    num_encoded: int = 0  # tokens computed alone so far (a miss)
    num_recomputed: int = 0  # tokens recomputed in full context by the repair


@dataclass(frozen=True)
class Fill:
    """Copy a cached module's K/V (held blocks) into the request's blocks at the module's position."""

    work: ModuleWork
    block_ids: tuple[int, ...]


@dataclass(eq=False)
class Assembly:
    works: list[ModuleWork]
    rows: list[int]  # positions computed in the assemble phase, ascending
    row_module: list[int]  # per row: index of the module it repairs, or -1 (text, question)
    repair: ModuleRepair
    next_row: int = 0

    @property
    def first_module_start(self) -> int:
        return self.works[0].span.start

    @property
    def done(self) -> bool:
        return self.next_row >= len(self.rows) and all(w.filled for w in self.works)

    def next_encode(self) -> ModuleWork | None:
        return next((w for w in self.works if not w.filled), None)

    @property
    def num_reused(self) -> int:
        """Module tokens from the cache that were not recomputed."""
        return sum(w.span.num_tokens - w.num_recomputed for w in self.works if w.hit)

    @property
    def num_recomputed(self) -> int:
        """Module tokens from the cache that the repair recomputed."""
        return sum(w.num_recomputed for w in self.works if w.hit)


def plan_assembly(prompt_len: int, num_cached: int, modules: tuple[ModuleSpan, ...],
                  hashes: tuple[tuple[bytes, ...], ...], repair: ModuleRepair) -> Assembly | None:
    """The assembly of a prompt whose first num_cached tokens came from the prefix cache; None when no
    module lies past them (a module the prefix covers in part is computed as text)."""
    works = [ModuleWork(m, h) for m, h in zip(modules, hashes, strict=True) if m.start >= num_cached]
    if not works or repair.strategy == "full":
        return None
    rows: list[int] = []
    row_module: list[int] = []
    position = num_cached
    for i, w in enumerate(works):
        rows.extend(range(position, w.span.start))
        row_module.extend([-1] * (w.span.start - position))
        if repair.strategy == "legolink":
            num = min(repair.link_tokens, w.span.num_tokens)
        elif repair.strategy == "cacheblend":
            num = w.span.num_tokens
        else:
            num = 0
        rows.extend(range(w.span.start, w.span.start + num))
        row_module.extend([i] * num)
        position = w.span.end
    rows.extend(range(position, prompt_len))
    row_module.extend([-1] * (prompt_len - position))
    return Assembly(works, rows, row_module, repair)
