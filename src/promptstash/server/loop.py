"""The engine loop: one background thread steps the engine; async handlers submit requests and await updates.

    handler --submit()--> engine.add_request (worker thread) --> Submission
    engine thread: step() -> on_update -> loop.call_soon_threadsafe -> Submission's asyncio.Queue
                   idle (nothing scheduled): sleeps until the engine has work, never spins
                   every CHECK_INTERVAL_S: aborts streams nobody reads, reconciles submissions with the engine

NOTE: the in-flight count is the engine's own count of unfinished requests (plus submissions still being
added): a request counts from add_request until the engine finishes it, whatever happens to the HTTP
handler. Requests are added detached, so a finished request leaves nothing behind in the engine.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence

from promptstash.cache.modules import ModuleRepair, ModuleSpan
from promptstash.engine.engine import Completion, Engine, Prompt, Usage
from promptstash.engine.request import RequestUpdate
from promptstash.engine.sampling import SamplingParams

log = logging.getLogger("promptstash.server")
CHECK_INTERVAL_S = 1.0
IDLE_WAIT_S = 0.5


class QueueFullError(Exception):
    pass


class TenantQueueFullError(QueueFullError):
    """This tenant has tenant_max_queued requests in flight."""


class Submission:
    """One request in flight. Iterate updates, then take completion(); abort() frees its blocks at once."""

    def __init__(self, loop: EngineLoop, request_id: str, queue: asyncio.Queue[RequestUpdate]) -> None:
        self._loop = loop
        self.request_id = request_id
        self._queue = queue
        self.finished = False
        self._closed = False
        self._completion: Completion | None = None
        self._usage: Usage | None = None
        self.added = False  # engine.add_request has returned
        # read by the engine thread's idle check: when an update arrived that nobody has taken yet
        self._lock = threading.Lock()
        self._num_unread = 0
        self._unread_since: float | None = None

    # -- engine thread -----------------------------------------------------------------------
    def _delivered(self) -> None:
        with self._lock:
            self._num_unread += 1
            if self._unread_since is None:
                self._unread_since = time.monotonic()

    def idle_for(self, now: float) -> float:
        """Seconds the oldest unread update has waited (0 if the reader is keeping up)."""
        with self._lock:
            return 0.0 if self._unread_since is None else now - self._unread_since

    # -- event loop --------------------------------------------------------------------------
    def _took(self, update: RequestUpdate) -> RequestUpdate:
        with self._lock:
            self._num_unread -= 1
            self._unread_since = time.monotonic() if self._num_unread else None
        if update.usage is not None and self._usage is None:
            self._usage = update.usage
        if update.finished:
            self.finished = True
            self._completion = update.completion
        return update

    async def updates(self) -> AsyncIterator[RequestUpdate]:
        while not self.finished:
            yield self._took(await self._queue.get())

    async def next_update(self, timeout: float) -> RequestUpdate | None:
        """The next update, or None after `timeout` seconds without one."""
        try:
            update = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None
        return self._took(update)

    def usage(self) -> Usage:
        """Usage as of the first update, which always carries it (cached and written tokens are known by
        then). NOTE: only after an update was taken: a detached request may already be gone from the engine."""
        if self._usage is None:
            raise RuntimeError(f"request {self.request_id}: usage() before its first update")
        return self._usage

    async def completion(self) -> Completion:
        """The completion, once the last update has been taken."""
        self._closed = True
        while not self.finished:
            self._took(await self._queue.get())
        assert self._completion is not None
        return self._completion

    def abort_soon(self) -> None:
        """abort() without awaiting: for cleanup in a cancelled task (a disconnected streaming client)."""
        if not self._closed:
            self._closed = True
            asyncio.get_running_loop().run_in_executor(None, self._loop.abort, self.request_id)

    async def abort(self) -> None:
        """Stop generating and release the request (no-op once completion() was taken)."""
        if not self._closed:
            self._closed = True
            await asyncio.to_thread(self._loop.abort, self.request_id)


class EngineLoop:
    def __init__(self, engine: Engine, max_queued_requests: int = 256, *, tenant_max_queued: int = 0,
                 stream_idle_timeout_s: float = 0.0) -> None:
        """max_queued_requests: unfinished requests beyond which submit() refuses; tenant_max_queued: the
        same per tenant (0 = off); stream_idle_timeout_s: abort a request whose reader has left an update
        untaken this long (0 = off)."""
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self.tenant_max_queued = tenant_max_queued
        self.stream_idle_timeout_s = stream_idle_timeout_s
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._adding = 0  # submissions between the limit check and engine.add_request returning
        self._adding_by_tenant: Counter[str] = Counter()
        self._submissions: dict[str, Submission] = {}
        self.num_step_errors = 0
        self.num_idle_aborts = 0  # streams aborted because their reader stopped reading
        self.num_reconciled = 0  # mismatches the periodic check found and repaired (should stay 0)

    @property
    def num_active(self) -> int:
        """Requests in flight: unfinished in the engine, or being added to it."""
        return self.engine.num_unfinished() + self._adding

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="promptstash-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self.engine.wake()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        next_check = time.monotonic() + CHECK_INTERVAL_S
        while not self._stopping:
            try:
                result = self.engine.run_step()
            except Exception:  # run_step finishes failed requests itself; this is a bug, but keep serving
                self.num_step_errors += 1
                log.exception("engine step failed")
                result = None
            if result is None or not result.num_scheduled:
                self.engine.wait_for_work(IDLE_WAIT_S)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + CHECK_INTERVAL_S
                try:
                    self.check(now)
                except Exception:
                    log.exception("engine loop check failed")

    def check(self, now: float | None = None) -> None:
        """Abort streams nobody reads; make the submissions agree with the engine's live requests."""
        now = time.monotonic() if now is None else now
        with self._lock:
            submissions = dict(self._submissions)
        if self.stream_idle_timeout_s > 0:
            running = self.engine.unfinished_ids()
            for rid, sub in submissions.items():
                if rid in running and sub.idle_for(now) > self.stream_idle_timeout_s:
                    self.num_idle_aborts += 1
                    log.warning("request %s: its client read nothing for %.0f s; aborting it", rid,
                                self.stream_idle_timeout_s)
                    self.engine.abort(rid)
        added = {rid: sub for rid, sub in submissions.items() if sub.added}
        live = self.engine.unfinished_ids()  # NOTE: after reading `added`: an added request missing here finished
        with self._lock:
            for rid, sub in added.items():
                if rid not in live and self._submissions.get(rid) is sub:
                    del self._submissions[rid]  # its last update is queued for the handler (or nobody listens)
            orphans = [rid for rid in live if rid not in self._submissions]
        for rid in orphans:  # NOTE: the loop owns its engine: a request no submission tracks has no reader
            self.num_reconciled += 1
            log.error("request %s is running with no client; aborting it", rid)
            self.engine.abort(rid)

    async def submit(self, prompt: Prompt, sampling: SamplingParams, *, namespace: str, tenant: str | None = None,
                     cache_breakpoints: Sequence[tuple[int, str]] = (), request_id: str | None = None,
                     modules: Sequence[ModuleSpan] = (), module_repair: str | ModuleRepair | None = None
                     ) -> Submission:
        """Queue a request. Raises QueueFullError / TenantQueueFullError, or the engine's InvalidRequestError /
        ContextLengthError. modules / module_repair: the prompt's module spans and the repair strategy (None:
        the engine's default), passed to engine.add_request."""
        tenant = namespace if tenant is None else tenant
        with self._lock:
            if self.num_active >= self.max_queued_requests:
                raise QueueFullError(f"{self.num_active} requests are in flight (limit {self.max_queued_requests})")
            mine = self.engine.num_unfinished(tenant) + self._adding_by_tenant[tenant]
            if self.tenant_max_queued and mine >= self.tenant_max_queued:
                raise TenantQueueFullError(f"this API key has {mine} requests in flight (per-key limit "
                                           f"{self.tenant_max_queued})")
            self._adding += 1
            self._adding_by_tenant[tenant] += 1
        aio = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestUpdate] = asyncio.Queue()
        rid = request_id or uuid.uuid4().hex[:24]
        submission = Submission(self, rid, queue)

        def on_update(update: RequestUpdate) -> None:
            submission._delivered()
            aio.call_soon_threadsafe(queue.put_nowait, update)

        def add() -> str:
            try:
                with self._lock:
                    self._submissions[rid] = submission
                try:
                    added = self.engine.add_request(prompt, sampling, namespace=namespace, tenant=tenant,
                                                    request_id=rid, on_update=on_update, detach=True,
                                                    cache_breakpoints=cache_breakpoints, modules=modules,
                                                    module_repair=module_repair)
                    submission.added = True
                    return added
                except BaseException:
                    with self._lock:
                        self._submissions.pop(rid, None)
                    raise
            finally:
                with self._lock:
                    self._adding -= 1
                    self._adding_by_tenant[tenant] -= 1
                    if not self._adding_by_tenant[tenant]:
                        del self._adding_by_tenant[tenant]

        future = aio.run_in_executor(None, add)
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:  # the client left while we were adding: abort once it is added
            future.add_done_callback(lambda f: None if f.cancelled() or f.exception() else self.abort(rid))
            raise
        self.engine.wake()
        return submission

    def abort(self, request_id: str) -> None:
        """NOTE: the submission stays tracked until check() sees its request finished, so that check() never
        takes a request aborted meanwhile for an orphan."""
        self.engine.abort(request_id)
