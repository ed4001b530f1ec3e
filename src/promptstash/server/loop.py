"""The engine loop: one background thread steps the engine; async handlers submit requests and await updates.

    handler --submit()--> engine.add_request (worker thread) --> Submission
    engine thread: step() -> on_update -> loop.call_soon_threadsafe -> Submission's asyncio.Queue
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Sequence

from promptstash.engine.engine import Completion, Engine, Prompt, Usage
from promptstash.engine.request import RequestUpdate
from promptstash.engine.sampling import SamplingParams

log = logging.getLogger("promptstash.server")


class QueueFullError(Exception):
    pass


class Submission:
    """One request in flight. Iterate updates, then take completion(); abort() frees its blocks at once."""

    def __init__(self, loop: EngineLoop, request_id: str, queue: asyncio.Queue[RequestUpdate]) -> None:
        self._loop = loop
        self.request_id = request_id
        self._queue = queue
        self.finished = False
        self._closed = False

    async def updates(self) -> AsyncIterator[RequestUpdate]:
        while not self.finished:
            update = await self._queue.get()
            self.finished = update.finished
            yield update

    async def next_update(self, timeout: float) -> RequestUpdate | None:
        """The next update, or None after `timeout` seconds without one."""
        try:
            update = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None
        self.finished = update.finished
        return update

    async def usage(self) -> Usage:
        return await asyncio.to_thread(self._loop.engine.usage, self.request_id)

    async def completion(self) -> Completion:
        self._closed = True
        return await asyncio.to_thread(self._loop.release, self.request_id)

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
    def __init__(self, engine: Engine, max_queued_requests: int) -> None:
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.num_active = 0  # submitted and not yet released
        self.num_step_errors = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="promptstash-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while not self._stopping:
            if not self.engine.has_unfinished():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception:  # the step's requests finished with reason "error"; keep serving the rest
                self.num_step_errors += 1
                log.exception("engine step failed")

    async def submit(self, prompt: Prompt, sampling: SamplingParams, *, namespace: str,
                     cache_breakpoints: Sequence[tuple[int, str]] = (), request_id: str | None = None) -> Submission:
        """Queue a request. Raises QueueFullError, or the engine's InvalidRequestError / ContextLengthError."""
        with self._lock:
            if self.num_active >= self.max_queued_requests:
                raise QueueFullError(f"{self.num_active} requests are in flight (limit {self.max_queued_requests})")
            self.num_active += 1
        aio = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestUpdate] = asyncio.Queue()

        def on_update(update: RequestUpdate) -> None:
            aio.call_soon_threadsafe(queue.put_nowait, update)

        try:
            rid = await asyncio.to_thread(self.engine.add_request, prompt, sampling, namespace=namespace,
                                          request_id=request_id, on_update=on_update,
                                          cache_breakpoints=cache_breakpoints)
        except BaseException:
            with self._lock:
                self.num_active -= 1
            raise
        self._wake.set()
        return Submission(self, rid, queue)

    def release(self, request_id: str) -> Completion:
        try:
            return self.engine.completion(request_id)
        finally:
            with self._lock:
                self.num_active -= 1

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self.release(request_id)
