"""Stored responses shared through Redis: the store of a server with a shared Redis (--redis-url, redis:// or
redis+cluster://), so that a `previous_response_id` follow-up, a GET or a DELETE reaches every replica behind a
load balancer, and survives a restart.

    key:    promptstash:response:{<tenant>/<id>}   tenant and id percent-encoded (quote(..., safe="")), so neither
                                                   can spell a '/', a brace or the other; the braces are a Redis
                                                   Cluster hash tag: an entry is one key in one slot
    value:  JSON {"v": 1, "tenant", "id", "created" (Unix seconds), "body" (the response object), "messages"}
            messages: [{"role", "blocks": [{"text", "ttl_class", "module", "module_id"}], "tool_calls": [{"id",
            "name", "arguments"}], "tool_call_id", "name", "tool_call_ttls"}]: every field of prompts.ChatMessage,
            TextBlock and tools.ToolCall, written and read explicitly (decode(encode(m)) == m)
    expiry: PX max_age_s, set by the put (server-side: Redis drops old responses; using one does not extend it)

CONTRACT (response_store.py's, for every replica sharing the Redis, with these differences)
- Keyed by (tenant, id) in Redis too: the tenant is part of the key, and an entry whose stored tenant or id differ
  from its key's is treated as missing, like one that is not JSON, has another version or any field of the wrong
  type or name: such a read is a 404, never a 500 and never another conversation. Damaged entries are left to
  expire (one of a newer version may be a newer replica's); the first is logged as a warning, later ones counted.
- Bounded by age in Redis (PX), by count and age in this process's memory (max_entries bounds only the memory).
- Backend trouble never fails a call (redis_tier.RedisGuard: back-off, one warning per outage):
  put() writes Redis and this process's memory; with Redis down the response is kept in memory only ("local"),
  and a follow-up on this replica still finds it (other replicas do not; it is not copied to Redis later).
  get() asks Redis first; with Redis down it answers from memory. When Redis answers without a valid entry, a
  memory copy of a response that Redis had is dropped (deleted or expired elsewhere), a local one is served.
  delete() deletes in Redis and memory; with Redis down it deletes from memory, and remembers the delete for
  max_age_s so this replica never serves the Redis copy again (other replicas may until it expires or is deleted).
- len() is a LOCAL figure: the responses this process holds in memory (counting Redis would need a SCAN).
- Slow: every call may wait on the network (socket_timeout_s at most). NOTE: never call it on the event loop.
- Thread-safe.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from promptstash.cache.tiers.redis_tier import RedisGuard
from promptstash.prompts import ChatMessage, TextBlock
from promptstash.server.response_store import DEFAULT_MAX_AGE_S, DEFAULT_MAX_ENTRIES, ResponseStore, StoredResponse
from promptstash.tools import ToolCall

log = logging.getLogger("promptstash.server")

KEY_PREFIX = "promptstash:response:"
FORMAT_VERSION = 1
ENTRY_FIELDS = frozenset({"v", "tenant", "id", "created", "body", "messages"})
MESSAGE_FIELDS = frozenset({"role", "blocks", "tool_calls", "tool_call_id", "name", "tool_call_ttls"})
BLOCK_FIELDS = frozenset({"text", "ttl_class", "module", "module_id"})
CALL_FIELDS = frozenset({"id", "name", "arguments"})


class DamagedEntry(ValueError):
    """A stored value that is not a readable entry of this format for the key it was read from."""


# -- the value format ------------------------------------------------------------------------------------------

def encode_message(message: ChatMessage) -> dict[str, Any]:
    return {"role": message.role,
            "blocks": [{"text": b.text, "ttl_class": b.ttl_class, "module": b.module, "module_id": b.module_id}
                       for b in message.blocks],
            "tool_calls": [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in message.tool_calls],
            "tool_call_id": message.tool_call_id, "name": message.name,
            "tool_call_ttls": list(message.tool_call_ttls)}


def decode_message(data: Any) -> ChatMessage:
    """encode_message's output back to the ChatMessage; DamagedEntry for anything else."""
    m = _fields(data, MESSAGE_FIELDS, "message")
    blocks = tuple(_block(b) for b in _list(m["blocks"], "blocks"))
    calls = tuple(_call(c) for c in _list(m["tool_calls"], "tool_calls"))
    ttls = tuple(_opt_str(t, "tool_call_ttls[]") for t in _list(m["tool_call_ttls"], "tool_call_ttls"))
    return ChatMessage(_str(m["role"], "role"), blocks, calls, _opt_str(m["tool_call_id"], "tool_call_id"),
                       _opt_str(m["name"], "name"), ttls)


def encode_entry(stored: StoredResponse) -> bytes:
    return json.dumps({"v": FORMAT_VERSION, "tenant": stored.tenant, "id": stored.id, "created": stored.created,
                       "body": stored.body, "messages": [encode_message(m) for m in stored.messages]},
                      separators=(",", ":")).encode()


def decode_entry(raw: bytes, tenant: str, response_id: str) -> StoredResponse:
    """The entry stored under (tenant, response_id); DamagedEntry unless it is exactly that."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise DamagedEntry(f"not JSON ({type(exc).__name__})") from None
    entry = _fields(data, ENTRY_FIELDS, "entry")
    if entry["v"] != FORMAT_VERSION or isinstance(entry["v"], bool):
        raise DamagedEntry(f"format version {entry['v']!r}, this server reads {FORMAT_VERSION}")
    if entry["tenant"] != tenant or entry["id"] != response_id:
        raise DamagedEntry("its tenant or id is not its key's")
    created = entry["created"]
    if not isinstance(created, (int, float)) or isinstance(created, bool):
        raise DamagedEntry("created: not a number")
    if not isinstance(entry["body"], dict):
        raise DamagedEntry("body: not an object")
    messages = tuple(decode_message(m) for m in _list(entry["messages"], "messages"))
    return StoredResponse(response_id, tenant, float(created), entry["body"], messages)


def _fields(data: Any, names: frozenset[str], what: str) -> dict[str, Any]:
    if not isinstance(data, dict) or data.keys() != names:
        raise DamagedEntry(f"{what}: not an object with exactly the fields {sorted(names)}")
    return data


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise DamagedEntry(f"{what}: not an array")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise DamagedEntry(f"{what}: not a string")
    return value


def _opt_str(value: Any, what: str) -> str | None:
    return None if value is None else _str(value, what)


def _block(data: Any) -> TextBlock:
    b = _fields(data, BLOCK_FIELDS, "block")
    if not isinstance(b["module"], bool):
        raise DamagedEntry("module: not a boolean")
    return TextBlock(_str(b["text"], "text"), _opt_str(b["ttl_class"], "ttl_class"), b["module"],
                     _opt_str(b["module_id"], "module_id"))


def _call(data: Any) -> ToolCall:
    c = _fields(data, CALL_FIELDS, "tool call")
    return ToolCall(_str(c["id"], "id"), _str(c["name"], "name"), _str(c["arguments"], "arguments"))


# -- the store -------------------------------------------------------------------------------------------------

class RedisResponseStore:
    """ResponseStore's interface over the Redis at `url` (see the module docstring). Construction connects only
    for a Redis Cluster (redis_tier.connect), so a single Redis that is down does not stop a server starting."""

    def __init__(self, url: str, *, max_entries: int = DEFAULT_MAX_ENTRIES, max_age_s: float = DEFAULT_MAX_AGE_S,
                 key_prefix: str = KEY_PREFIX, retry_interval_s: float = 5.0, socket_timeout_s: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        if max_entries < 1 or max_age_s <= 0:
            raise ValueError("a response store holds at least one response for a positive time")
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self.key_prefix = key_prefix
        # NOTE: one clock (Unix seconds by default) for `created` in Redis and for the memory copies' age, so every
        # StoredResponse this store returns counts its age the same way.
        self._clock = clock
        self._guard = RedisGuard(url, label="Responses API store", logger=log, retry_interval_s=retry_interval_s,
                                 socket_timeout_s=socket_timeout_s)
        self._shared = ResponseStore(max_entries, max_age_s, clock)  # copies of what Redis holds: for outages
        self._local = ResponseStore(max_entries, max_age_s, clock)  # put while Redis was down: only here
        self._deleted = ResponseStore(max_entries, max_age_s, clock)  # deleted while Redis was down (tombstones)
        self._lock = threading.Lock()
        self.num_failed_calls = 0  # Redis calls that failed or were skipped while backing off
        self.num_damaged = 0  # entries read that were not readable for their key

    def key(self, tenant: str, response_id: str) -> str:
        return f"{self.key_prefix}{{{quote(tenant, safe='')}/{quote(response_id, safe='')}}}"

    def __len__(self) -> int:
        return len(self._shared) + len(self._local)

    def put(self, tenant: str, response_id: str, body: dict[str, Any], messages: tuple[ChatMessage, ...]
            ) -> StoredResponse:
        stored = StoredResponse(response_id, tenant, self._clock(), body, messages)
        value = encode_entry(stored)
        px = max(1, round(self.max_age_s * 1000))
        ok, _ = self._redis(lambda: self._guard.client.set(self.key(tenant, response_id), value, px=px))
        self._deleted.delete(tenant, response_id)
        if ok:
            self._local.delete(tenant, response_id)
            return self._shared.put(tenant, response_id, body, messages)
        self._shared.delete(tenant, response_id)
        return self._local.put(tenant, response_id, body, messages)

    def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        if self._deleted.get(tenant, response_id) is not None:
            self.delete(tenant, response_id)  # retries the Redis delete; the tombstone stays until it succeeds
            return None
        ok, raw = self._redis(lambda: self._guard.client.get(self.key(tenant, response_id)))
        if not ok:
            return self._shared.get(tenant, response_id) or self._local.get(tenant, response_id)
        if raw is not None:
            try:
                return decode_entry(bytes(raw), tenant, response_id)
            except DamagedEntry as exc:
                self._damaged(tenant, response_id, exc)
        self._shared.delete(tenant, response_id)  # deleted or expired elsewhere, or damaged: gone for everyone
        return self._local.get(tenant, response_id)

    def delete(self, tenant: str, response_id: str) -> bool:
        ok, removed = self._redis(lambda: self._guard.client.delete(self.key(tenant, response_id)))
        shared = self._shared.delete(tenant, response_id)
        local = self._local.delete(tenant, response_id)
        if ok:
            self._deleted.delete(tenant, response_id)
            return bool(removed) or local
        if shared or local:
            self._deleted.put(tenant, response_id, {}, ())
        return shared or local

    def close(self) -> None:
        self._guard.close()

    def _redis(self, op: Callable[[], Any]) -> tuple[bool, Any]:
        ok, result = self._guard.call(op)
        if not ok:
            with self._lock:
                self.num_failed_calls += 1
        return ok, result

    def _damaged(self, tenant: str, response_id: str, exc: DamagedEntry) -> None:
        with self._lock:
            self.num_damaged += 1
            first = self.num_damaged == 1
        (log.warning if first else log.debug)(
            "Responses API store: the entry for response %r of tenant %r in the Redis at %s is damaged (%s); "
            "treated as missing%s", response_id[:80], tenant, self._guard.where, exc,
            " (further damaged entries are counted, not logged)" if first else "")
