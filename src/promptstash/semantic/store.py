"""The semantic-cache index: per key (tenant namespace, model, context, output-changing sampling parameters),
the last user messages seen with their embeddings and the responses they got.

    key      = context_key(namespace, model_id, flavour, context, sampling, extra)       (bytes, blake2b-128)
    entry    = (embedding, last user message, StoredResponse)
    lookup   = the entry of the key with the highest similarity; a hit when similarity >= threshold AND
               guards.refusal(entry.query, query) is None

NOTE: the namespace (tenant plus cache_salt) is part of the key, so one tenant's entries are never
candidates for another's request. The in-memory index is the source of candidates; responses are also written
to the tiers (disk, Redis) as checksummed records (cache/tiers/record.py) under a hash of the key and the
message, and read back from there when the in-memory copy was dropped (only the newest `hot_responses` keep
one). A damaged or missing record is never served: the lookup is a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from promptstash.cache.tiers.entry import CorruptEntryError
from promptstash.cache.tiers.record import decode_record, encode_record
from promptstash.semantic.guards import refusal

log = logging.getLogger("promptstash.semantic")

RECORD_KIND = "semantic-response"
RECORD_TTL_S = 24 * 3600.0


def _digest(*parts: Any) -> bytes:
    """A stable digest of JSON-able parts (length-delimited by JSON itself)."""
    text = json.dumps(parts, separators=(",", ":"), sort_keys=True, ensure_ascii=False, default=repr)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def context_key(namespace: str, model_id: str, flavour: str, context: Any, sampling: Any, extra: Any = None) -> bytes:
    """The index key: everything but the last user message that changes the response. `context` and `sampling`
    are JSON-able (or repr-able) descriptions: the earlier messages, the tools and output format, the sampling
    parameters that change output (temperature, top_p, seed, max_tokens, stop, penalties, grammar...)."""
    return _digest("promptstash-semantic-v1", namespace, model_id, flavour, context, sampling, extra)


@dataclass(frozen=True)
class StoredResponse:
    """What a hit replays: the model's text and how it ended, with the token counts of the original run."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" | "length"
    stop_sequence: str | None
    completion_tokens: int

    def to_bytes(self) -> bytes:
        return json.dumps({"text": self.text, "token_ids": list(self.token_ids), "finish_reason": self.finish_reason,
                           "stop_sequence": self.stop_sequence, "completion_tokens": self.completion_tokens},
                          separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @staticmethod
    def from_bytes(data: bytes) -> StoredResponse:
        """Raises CorruptEntryError for anything that is not a well-formed response."""
        try:
            doc = json.loads(data.decode("utf-8"))
            response = StoredResponse(str(doc["text"]), tuple(int(t) for t in doc["token_ids"]),
                                      str(doc["finish_reason"]), doc["stop_sequence"], int(doc["completion_tokens"]))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CorruptEntryError(f"not a stored response: {exc}") from None
        if response.finish_reason not in ("stop", "length") or not (
                response.stop_sequence is None or isinstance(response.stop_sequence, str)):
            raise CorruptEntryError("not a stored response: bad finish_reason or stop_sequence")
        return response


@dataclass(frozen=True)
class Lookup:
    """The outcome of one lookup.

    status: "hit" (response set), "miss" (no candidate at or above the threshold), "refused" (the best
    candidate at or above the threshold was refused by `guard`). similarity: the best candidate's, or None
    when the key had no entries."""

    status: str
    similarity: float | None = None
    guard: str | None = None
    response: StoredResponse | None = None
    matched_query: str | None = None


@dataclass
class _Entry:
    record_key: bytes
    query: str
    embedding: np.ndarray  # (dim,), unit length
    response: StoredResponse | None  # None: only in the tiers


class SemanticIndex:
    """Thread-safe index of semantic-cache entries, bounded to `max_entries` (least recently used go first).

    `chain`: a TierChain (or anything with lookup / submit / delete) holding the responses as records; None
    keeps every response in memory."""

    def __init__(self, chain: Any = None, *, max_entries: int = 10_000, max_entries_per_key: int = 256,
                 hot_responses: int = 1024) -> None:
        self.chain = chain
        self.max_entries = max_entries
        self.max_entries_per_key = max_entries_per_key
        self.hot_responses = hot_responses
        self._keys: OrderedDict[bytes, list[_Entry]] = OrderedDict()
        self._hot: OrderedDict[bytes, _Entry] = OrderedDict()  # entries that keep their response in memory
        self._num_entries = 0
        self._lock = threading.Lock()

    @property
    def num_entries(self) -> int:
        return self._num_entries

    def lookup(self, key: bytes, query: str, embedding: np.ndarray, threshold: float) -> Lookup:
        """The best entry of `key` for `query` (whose unit-length `embedding` is given). Blocking when the
        response has to be read from a tier: call it off the event loop."""
        with self._lock:
            entries = self._keys.get(key)
            if not entries:
                return Lookup("miss")
            self._keys.move_to_end(key)
            matrix = np.stack([e.embedding for e in entries])
            sims = matrix @ np.asarray(embedding, dtype=np.float32)
            order = np.argsort(-sims, kind="stable")
            best_sim = float(sims[order[0]])
            candidates = [(entries[i], float(sims[i])) for i in order if sims[i] >= threshold]
        if not candidates:
            return Lookup("miss", best_sim)
        # NOTE: the best-scoring candidate that every guard accepts wins; a refusal is reported only when every
        # candidate at or above the threshold was refused (the best one's guard is named).
        first_guard = None
        for entry, sim in candidates:
            guard = refusal(entry.query, query)
            if guard is not None:
                first_guard = first_guard or guard
                continue
            response = self._response(key, entry)
            if response is None:
                continue
            return Lookup("hit", sim, None, response, entry.query)
        if first_guard is None:
            return Lookup("miss", best_sim)
        return Lookup("refused", candidates[0][1], first_guard)

    def _response(self, key: bytes, entry: _Entry) -> StoredResponse | None:
        with self._lock:
            if entry.response is not None:
                if entry.record_key in self._hot:
                    self._hot.move_to_end(entry.record_key)
                return entry.response
        if self.chain is None:
            return None
        found = self.chain.lookup(entry.record_key)
        try:
            if found is None:
                raise CorruptEntryError("record missing from every tier")
            data, tier = found
            response = StoredResponse.from_bytes(decode_record(data, RECORD_KIND, entry.record_key))
        except CorruptEntryError as exc:
            log.warning("semantic-cache record %s unusable (%s); dropping the entry", entry.record_key.hex(), exc)
            if found is not None:
                self.chain.delete(entry.record_key)
            self._remove(key, entry)
            return None
        return response

    def _remove(self, key: bytes, entry: _Entry) -> None:
        with self._lock:
            entries = self._keys.get(key)
            if entries and entry in entries:
                entries.remove(entry)
                self._num_entries -= 1
                if not entries:
                    del self._keys[key]
            self._hot.pop(entry.record_key, None)

    def add(self, key: bytes, query: str, embedding: np.ndarray, response: StoredResponse) -> None:
        """Remember `response` for `query` under `key` (replacing an entry with the same message)."""
        record_key = _digest("promptstash-semantic-record-v1", key.hex(), query)
        entry = _Entry(record_key, query, np.asarray(embedding, dtype=np.float32).reshape(-1), response)
        if self.chain is not None:
            payload = response.to_bytes()
            self.chain.submit(record_key, lambda: encode_record(RECORD_KIND, record_key, payload), RECORD_TTL_S)
        with self._lock:
            entries = self._keys.setdefault(key, [])
            self._keys.move_to_end(key)
            for old in [e for e in entries if e.query == query]:
                entries.remove(old)
                self._hot.pop(old.record_key, None)
                self._num_entries -= 1
            entries.append(entry)
            self._num_entries += 1
            self._hot[record_key] = entry
            if len(entries) > self.max_entries_per_key:
                dropped = entries.pop(0)
                self._hot.pop(dropped.record_key, None)
                self._num_entries -= 1
            while self._num_entries > self.max_entries and self._keys:
                old_key, old_entries = next(iter(self._keys.items()))
                dropped = old_entries.pop(0)
                self._hot.pop(dropped.record_key, None)
                self._num_entries -= 1
                if not old_entries:
                    del self._keys[old_key]
            # NOTE: with tiers, only the newest responses stay in memory; the rest are read back (and verified).
            while self.chain is not None and len(self._hot) > self.hot_responses:
                _, cold = self._hot.popitem(last=False)
                cold.response = None


def as_jsonable_messages(messages: Sequence[Any]) -> list[Any]:
    """ChatMessages (promptstash.prompts) as plain data for context_key: roles, texts, module marks and ids,
    tool calls and results. Cache breakpoints are left out: they change what is cached, not the response."""
    out = []
    for m in messages:
        out.append({
            "role": m.role,
            "blocks": [[b.text, b.module, b.module_id] for b in m.blocks],
            "tool_calls": [[c.id, c.name, c.arguments] for c in m.tool_calls],
            "tool_call_id": m.tool_call_id,
            "name": m.name,
        })
    return out
