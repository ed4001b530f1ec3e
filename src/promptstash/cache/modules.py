"""Modules: text whose K/V are computed once, in isolation, and reused at any position of a later prompt.

A module's K/V are computed attending only to itself, from position 0 (Prompt Cache), and stored as blocks
under module hashes (hashing.module_hashes: model, KV layout, tenant namespace and the module's tokens).
Placed at position p of a prompt, its keys are rotated by p (RoPE rotations compose); its values carry no
position. Modules did not attend to what precedes them, so a repair strategy decides what is recomputed:

    none        concatenate as loaded (Prompt Cache)
    legolink:k  recompute the first k tokens of each module (EPIC's LegoLink); they attend to everything before
    cacheblend:r  recompute the fraction r of module tokens whose K/V deviate most from a full pass,
                selected at an early layer (CacheBlend)
    full        recompute everything: the same tokens with caching off (module marks only change tokenization)

A prompt's modules are spans of its token ids (ModuleSpan); the registry maps ids to module texts per
tenant namespace (POST /v1/modules).
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from promptstash.cache.ttl import TTL_SECONDS
from promptstash.errors import InvalidRequestError

REPAIR_STRATEGIES = ("none", "legolink", "cacheblend", "full")
# NOTE: defaults chosen by `promptstash bench modules` (benchmarks/results/modules.md): legolink:16 kept the gold
# answer as close to full as legolink:32 at less cost; cacheblend:0.3 came closer than 0.1 and 0.15. The server
# default (config.EngineConfig.module_repair) is "none": of the strategies that meet the speed targets it stayed
# closest to full, level with legolink, and it is the fastest.
DEFAULT_LINK_TOKENS = 16
DEFAULT_BLEND_FRACTION = 0.3
DEFAULT_BLEND_LAYER = 1
MODULE_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


@dataclass(frozen=True)
class ModuleRepair:
    """What is recomputed where modules are assembled into a prompt (see the module docstring)."""

    strategy: str = "none"
    link_tokens: int = DEFAULT_LINK_TOKENS  # legolink: tokens recomputed at the start of each module
    blend_fraction: float = DEFAULT_BLEND_FRACTION  # cacheblend: share of module tokens recomputed
    blend_layer: int = DEFAULT_BLEND_LAYER  # cacheblend: the layer whose K/V deviation selects them

    @property
    def label(self) -> str:
        if self.strategy == "legolink":
            return f"legolink:{self.link_tokens}"
        if self.strategy == "cacheblend":
            return f"cacheblend:{self.blend_fraction:g}"
        return self.strategy

    @classmethod
    def parse(cls, value: str | ModuleRepair) -> ModuleRepair:
        """"none" | "legolink" | "legolink:K" | "cacheblend" | "cacheblend:R" | "full" (K tokens, R in (0, 1])."""
        if isinstance(value, ModuleRepair):
            return value
        if not isinstance(value, str):
            raise InvalidRequestError(f"module_repair must be a string, got {type(value).__name__}")
        name, _, arg = value.partition(":")
        if name not in REPAIR_STRATEGIES:
            raise InvalidRequestError(
                f"unknown module_repair {value!r}; expected one of none, legolink[:K], cacheblend[:R], full")
        if not arg:
            return cls(name)
        try:
            if name == "legolink":
                k = int(arg)
                if not 0 <= k <= 4096:
                    raise ValueError
                return cls(name, link_tokens=k)
            if name == "cacheblend":
                r = float(arg)
                if not 0.0 <= r <= 1.0:
                    raise ValueError
                return cls(name, blend_fraction=r)
        except ValueError:
            pass
        raise InvalidRequestError(f"bad module_repair {value!r}: legolink:K takes a token count 0..4096, "
                                  "cacheblend:R a fraction in [0, 1]; none and full take no argument")


@dataclass(frozen=True)
class ModuleSpan:
    """A module inside a prompt: token_ids[start:end] are the module's own tokens (tokenized on their own)."""

    start: int
    end: int
    module_id: str | None = None  # set when the prompt named a registered module
    ttl_class: str | None = None  # protect the module's blocks in the pool this long after each use

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class RegisteredModule:
    module_id: str
    text: str
    token_ids: tuple[int, ...]
    ttl_class: str
    created_at: float  # wall-clock seconds
    expires_at: float  # wall-clock seconds; refreshed by every use

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class ModuleRegistry:
    """Module ids -> texts, per tenant namespace. Thread-safe; an entry expires its TTL after its last use."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], RegisteredModule] = {}

    @staticmethod
    def check_id(module_id: str) -> str:
        if not isinstance(module_id, str) or not MODULE_ID_PATTERN.match(module_id):
            raise InvalidRequestError("a module id is 1-128 characters of letters, digits, '_', '.', ':' or '-'")
        return module_id

    def put(self, namespace: str, text: str, token_ids: tuple[int, ...], *, module_id: str | None = None,
            ttl_class: str = "5m") -> RegisteredModule:
        if ttl_class not in TTL_SECONDS:
            raise InvalidRequestError(f"ttl must be one of {', '.join(TTL_SECONDS)}, got {ttl_class!r}")
        module_id = self.check_id(module_id) if module_id is not None else f"mod_{uuid.uuid4().hex[:20]}"
        now = self._clock()
        entry = RegisteredModule(module_id, text, tuple(token_ids), ttl_class, now, now + TTL_SECONDS[ttl_class])
        with self._lock:
            self._entries[(namespace, module_id)] = entry
        return entry

    def get(self, namespace: str, module_id: str) -> RegisteredModule | None:
        """The module (its TTL restarts), or None if unknown or expired."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get((namespace, module_id))
            if entry is None:
                return None
            if entry.expires_at <= now:
                del self._entries[(namespace, module_id)]
                return None
            entry = self._entries[(namespace, module_id)] = RegisteredModule(
                entry.module_id, entry.text, entry.token_ids, entry.ttl_class, entry.created_at,
                now + TTL_SECONDS[entry.ttl_class])
            return entry

    def list(self, namespace: str) -> list[RegisteredModule]:
        now = self._clock()
        with self._lock:
            for key in [k for k, e in self._entries.items() if e.expires_at <= now]:
                del self._entries[key]
            return sorted((e for (ns, _), e in self._entries.items() if ns == namespace), key=lambda e: e.created_at)

    def delete(self, namespace: str, module_id: str) -> bool:
        with self._lock:
            return self._entries.pop((namespace, module_id), None) is not None

    def __len__(self) -> int:
        return len(self._entries)
