"""Continuous batching: each step computes a chunk of tokens for every running request.

A request computes token_ids[num_computed:] in chunks; when a chunk reaches the end of its tokens the
step samples its next token (so decode is just a chunk of one token). Prefill chunks share a per-step
budget of `max_prefill_tokens`; decode tokens do not count against it.

NOTE: prefill chunks end at absolute multiples of `max_prefill_tokens` where the budget allows, so a
prompt is cut into the same chunks whether or not part of it came from the cache:

    tokens:     0 ........ C ........ 2C ..... len
    cache off:  [ chunk   )[ chunk    )[ chunk  )
    cache hit:  [ cached blocks ...  )[chunk )      <- last chunk ends at the same place

Admission order is a policy (`schedule`):

    fcfs   first come, first served
    lpm    longest cached prefix first (SGLang's longest-prefix-match): the waiting request with the most
           tokens already in the pool goes first, ties first come first served; a request waiting longer
           than `max_wait_s` goes ahead of every other (oldest first), so none starves

Under both, preempted requests go first, and a tenant already running `tenant_max_running` requests is
skipped (its next request waits, later tenants' requests go ahead). Requests sharing an uncomputed prefix
still compute it once whatever the order (the cache manager's pending blocks, `waits_for_other`).

A request with modules assembles its prompt after its prefix match (see engine/assembly.py): its chunks
are then "encode" (a module computed alone), "assemble" (rows in position order, after fills that copy
cached modules in), and finally plain decode chunks.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from promptstash.cache.manager import CacheManager
from promptstash.engine.assembly import Fill, ModuleWork, plan_assembly
from promptstash.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledChunk:
    """Work for one request in one step. A "compute" chunk computes token_ids[start:end]; "encode" and
    "assemble" chunks compute the positions in `rows` (see engine/assembly.py), after copying `fills` in;
    start and end are then request.num_computed before and after the chunk."""

    request: Request
    start: int
    end: int
    kind: str = "compute"  # "compute" | "encode" | "assemble"
    rows: tuple[int, ...] = ()
    fills: tuple[Fill, ...] = ()
    work: ModuleWork | None = None  # encode: the module computed alone
    row_module: tuple[int, ...] = ()  # assemble: per row, the module it repairs or -1

    @property
    def num_tokens(self) -> int:
        return self.end - self.start if self.kind == "compute" else len(self.rows)


SCHEDULES = ("fcfs", "lpm")


class Scheduler:
    def __init__(self, cache: CacheManager, max_num_seqs: int, max_prefill_tokens: int,
                 tenant_max_running: int = 0, *, schedule: str = "fcfs", max_wait_s: float = 10.0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        """tenant_max_running: requests of one tenant running at once (0 = no limit); schedule: admission
        order, "fcfs" or "lpm"; max_wait_s: lpm's bound on how long a request is passed over; clock: the
        time base of Request.arrival_time."""
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if not max_wait_s >= 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.schedule_policy = schedule
        self.max_wait_s = max_wait_s
        self.clock = clock
        self._hashes: dict[str, list[bytes]] = {}  # lpm: waiting request -> its prompt's block hashes
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.tenant_max_running = tenant_max_running
        self.block_size = cache.block_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_query_tokens = 0  # prompt tokens looked up in the cache (first admission only)
        self.num_hit_tokens = 0  # of those, served from the cache
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def adopt(self, request: Request) -> None:
        """Run a request whose K/V are already in place (a forked sample: cache.fork opened its sequence)."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def preempt(self, request: Request) -> None:
        """Give a running request's blocks back; it restarts later, hitting its own cached blocks."""
        self.cache.close(request.request_id, turn_ended=False)
        request.assembly = None
        self.running.remove(request)
        request.status = RequestStatus.WAITING
        request.num_computed = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def finish(self, request: Request) -> None:
        """Drop a finished or aborted request and release its blocks."""
        if request in self.running:
            self.running.remove(request)
            self.cache.close(request.request_id)
        elif request in self.waiting:
            self.waiting.remove(request)
            self._hashes.pop(request.request_id, None)
        request.status = RequestStatus.FINISHED

    def schedule(self) -> list[ScheduledChunk]:
        """Chunks to compute in this step; at most one per request."""
        chunks: list[ScheduledChunk] = []
        scheduled: set[str] = set()
        budget = self.max_prefill_tokens
        for request in list(self.running):
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            chunk = self._schedule_one(request, budget, scheduled, may_preempt=True)
            if chunk is not None:
                budget -= self._prefill_cost(chunk)
                chunks.append(chunk)
        running_by_tenant = Counter(r.tenant for r in self.running)
        for request in self.admission_order():
            if len(self.running) >= self.max_num_seqs or budget <= 0:
                break
            if self.tenant_max_running and running_by_tenant[request.tenant] >= self.tenant_max_running:
                continue  # this tenant has its share running: later tenants' requests go first
            request.num_computed = self.cache.open(request.request_id, request.token_ids, request.namespace)
            chunk = self._schedule_one(request, budget, scheduled, may_preempt=False)
            if chunk is None and not self.cache.waits_for_other(request.request_id, request.num_computed):
                self.cache.close(request.request_id, turn_ended=False)  # the pool has no room yet: stay queued
                request.assembly = None
                break
            self.waiting.remove(request)
            self._hashes.pop(request.request_id, None)
            self.running.append(request)
            running_by_tenant[request.tenant] += 1
            request.status = RequestStatus.RUNNING
            if request.num_cached_tokens is None:
                request.num_cached_tokens = request.num_computed
                self.cache.note_admission(request.prompt_len, request.num_computed)
                self.num_query_tokens += request.prompt_len
                self.num_hit_tokens += request.num_computed
            if chunk is not None:
                budget -= self._prefill_cost(chunk)
                chunks.append(chunk)
        return chunks

    def admission_order(self) -> list[Request]:
        """Waiting requests in the order they are offered a place (see the module docstring)."""
        if self.schedule_policy == "fcfs" or len(self.waiting) < 2:
            return list(self.waiting)
        now = self.clock()
        first: list[Request] = []  # preempted, then overdue: oldest first
        ranked: list[tuple[int, int, Request]] = []
        for i, request in enumerate(self.waiting):
            if request.num_preemptions or now - request.arrival_time >= self.max_wait_s:
                first.append(request)
                continue
            hashes = self._hashes.get(request.request_id)
            if hashes is None:
                hashes = self._hashes[request.request_id] = self.cache.prefix_hashes(request.token_ids,
                                                                                     request.namespace)
            ranked.append((-self.cache.cached_prefix_len(hashes), i, request))
        first.sort(key=lambda r: (r.num_preemptions == 0, r.arrival_time))
        ranked.sort(key=lambda t: t[:2])
        return first + [r for _, _, r in ranked]

    def _prefill_cost(self, chunk: ScheduledChunk) -> int:
        if chunk.kind != "compute":
            return chunk.num_tokens
        return 0 if chunk.num_tokens == 1 and chunk.end == len(chunk.request.token_ids) else chunk.num_tokens

    def _chunk_end(self, request: Request, budget: int) -> int:
        start, total = request.num_computed, len(request.token_ids)
        if total - start == 1:
            return total  # a decode token (or a last prompt token): outside the prefill budget
        end = min(total, (start // self.max_prefill_tokens + 1) * self.max_prefill_tokens)
        if end - start > budget:
            end = start + max(budget, 0)
            end -= end % self.block_size
        return max(end, start)

    def _schedule_one(self, request: Request, budget: int, scheduled: set[str],
                      may_preempt: bool) -> ScheduledChunk | None:
        rid = request.request_id
        if request.num_computed < len(request.token_ids) - 1:
            # still in prefill: pick up blocks that concurrent requests have published meanwhile
            num_cached = self.cache.extend_match(rid, len(request.token_ids))
            if num_cached > request.num_computed:
                if request.num_cached_tokens is not None and request.num_preemptions == 0:
                    self.num_hit_tokens += num_cached - request.num_computed
                    request.num_cached_tokens = num_cached
                request.num_computed = num_cached
            if self.cache.waits_for_other(rid, request.num_computed):
                return None  # the next block is being computed by another request: reuse it later
        if (request.assembly is None and request.modules and request.num_computed < request.prompt_len
                and request.module_repair.strategy != "full"):
            request.assembly = plan_assembly(request.prompt_len, request.num_computed, request.modules,
                                             request.module_hashes, request.module_repair)
            if request.assembly is not None:
                self.cache.limit_publish(rid, request.assembly.first_module_start)
        if request.assembly is not None and not request.assembly.done:
            return self._assembly_chunk(request, budget, scheduled, may_preempt)
        end = self._chunk_end(request, budget)
        if end <= request.num_computed:
            return None
        if not self._allocate(request, end, scheduled, may_preempt):
            return None
        scheduled.add(rid)
        return ScheduledChunk(request, request.num_computed, end)

    def _allocate(self, request: Request, end: int, scheduled: set[str], may_preempt: bool) -> bool:
        """Blocks for request.token_ids[:end], preempting later requests if allowed; False: wait."""
        while not self.cache.allocate(request.request_id, end):
            victims = [r for r in self.running if r is not request and r.request_id not in scheduled]
            if may_preempt and victims:
                self.preempt(victims[-1])
                continue
            if any(r is not request for r in self.running):
                return False  # others still hold blocks: wait for them
            # nothing else can free blocks: TTL protections give way rather than stall this request forever
            if not self.cache.allocate(request.request_id, end, last_resort=True):
                return False
        return True

    def _assembly_chunk(self, request: Request, budget: int, scheduled: set[str],
                        may_preempt: bool) -> ScheduledChunk | None:
        """The next piece of a module assembly: held cached modules to fill in, then one module to encode
        alone, or (all modules in place) the next rows to assemble."""
        assembly = request.assembly
        assert assembly is not None
        rid = request.request_id
        if not self._allocate(request, request.prompt_len, scheduled, may_preempt):
            return None
        fills = []
        for work in assembly.works:
            if not work.filled and not work.num_encoded:
                block_ids = self.cache.hold_module(rid, work.hashes, work.span.ttl_class)
                if block_ids is not None:
                    work.filled = work.hit = True
                    fills.append(Fill(work, block_ids))
        scheduled.add(rid)
        now = request.num_computed
        work = assembly.next_encode()
        if work is not None:
            start = work.span.start + work.num_encoded
            end = min(work.span.end, start + max(budget, 0))
            if end > start:
                return ScheduledChunk(request, now, now, "encode", tuple(range(start, end)), tuple(fills), work)
            return ScheduledChunk(request, now, now, "assemble", (), tuple(fills)) if fills else None
        take = max(budget, 0)
        first = assembly.next_row
        rows = assembly.rows[first:first + take]
        row_module = assembly.row_module[first:first + take]
        if not rows and not fills and first < len(assembly.rows):
            return None
        final = first + len(rows) >= len(assembly.rows)
        return ScheduledChunk(request, now, request.prompt_len if final else now, "assemble", tuple(rows),
                              tuple(fills), None, tuple(row_module))
