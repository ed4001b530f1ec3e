"""Stored responses of POST /v1/responses (`store: true`, the default), for GET / DELETE /v1/responses/{id} and
for `previous_response_id` follow-ups.

Two stores keep this contract (the ResponseStorage protocol below): ResponseStore here, in this
process's memory, and response_store_redis.RedisResponseStore, shared by every replica pointing at one Redis
(create_app uses it when the engine has a Redis URL and prefix caching; it states its differences).

CONTRACT
- In memory only: a restart forgets every stored response (a follow-up then gets a 404 and must resend its
  history as input items).
- Keyed by (tenant, id): a tenant never finds another tenant's response; get / delete with another tenant's id
  behave exactly as with an unknown id (None / False).
- Bounded: at most `max_entries` responses (the oldest is forgotten first) and none older than `max_age_s`
  (counted from when it was stored; using it does not extend it).
- A stored response keeps its whole conversation (`messages`: earlier turns, this turn's input and its output),
  so a follow-up renders it without walking a chain of responses that may have been forgotten. Messages are
  immutable and shared between the responses of one conversation, so a long chain costs references, not copies.
- Never raises on a store, lookup or delete (an unknown, expired or unreadable response is None / False).
- Thread-safe. The server calls every store from worker threads (asyncio.to_thread), never on the event loop:
  NOTE: a shared store's calls wait on the network.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from promptstash.prompts import ChatMessage

DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_MAX_AGE_S = 24 * 3600.0


@dataclass(frozen=True)
class StoredResponse:
    id: str
    tenant: str
    created: float  # when it was put, on the store's clock (seconds; the Redis store's: Unix time)
    body: dict[str, Any]  # the response object as returned (GET returns it)
    messages: tuple[ChatMessage, ...]  # the conversation so far, this response's output included (no instructions)


class ResponseStorage(Protocol):
    """What the Responses API needs of a store (the module docstring's contract)."""

    def __len__(self) -> int: ...

    def put(self, tenant: str, response_id: str, body: dict[str, Any], messages: tuple[ChatMessage, ...]
            ) -> StoredResponse: ...

    def get(self, tenant: str, response_id: str) -> StoredResponse | None: ...

    def delete(self, tenant: str, response_id: str) -> bool: ...

    def close(self) -> None: ...


class ResponseStore:
    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_age_s: float = DEFAULT_MAX_AGE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1 or max_age_s <= 0:
            raise ValueError("a response store holds at least one response for a positive time")
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, str], StoredResponse] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._items)

    def put(self, tenant: str, response_id: str, body: dict[str, Any], messages: tuple[ChatMessage, ...]
            ) -> StoredResponse:
        stored = StoredResponse(response_id, tenant, self._clock(), body, messages)
        with self._lock:
            self._items.pop((tenant, response_id), None)
            self._items[(tenant, response_id)] = stored
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
            self._expire()
        return stored

    def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        with self._lock:
            self._expire()
            return self._items.get((tenant, response_id))

    def delete(self, tenant: str, response_id: str) -> bool:
        with self._lock:
            self._expire()
            return self._items.pop((tenant, response_id), None) is not None

    def close(self) -> None:
        """Nothing to release (the Redis store closes its connections)."""

    def _expire(self) -> None:
        oldest_kept = self._clock() - self.max_age_s
        while self._items:
            key, first = next(iter(self._items.items()))
            if first.created > oldest_kept:
                break
            del self._items[key]
