"""What every route shares: the server state, API keys -> callers (tenants, admins, the metrics scraper),
cache namespaces, reading a request body within its byte limit, waiting for a completion.

    --api-key KEY:TENANT     a tenant's key (several keys may name one tenant: key rotation)
    --api-key KEY            a tenant named key-<first 12 hex of sha256(KEY)>: stable across restarts and
                             reorderings (the tenant is part of every block hash, on disk and in Redis too)
    --admin-key KEY          every tenant's figures, the pool and the tiers; tenant "admin" on model routes
    --metrics-key KEY        /metrics with every figure, for a Prometheus scraper; nothing else

No tenant or admin keys = one local tenant, no auth, every figure visible (a metrics key alone only guards
/metrics).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from promptstash.config import ServerConfig
from promptstash.engine.engine import Completion, Engine
from promptstash.errors import PromptstashError
from promptstash.server.errors import APIError
from promptstash.server.loop import EngineLoop, Submission
from promptstash.server.metrics import ServerStats
from promptstash.server.semantic import SemanticCache, SemanticOption, SemanticOutcome, SemanticPlan, plan_for

LOCAL_TENANT = "local"
ADMIN_TENANT = "admin"
GENERATED_TENANT_PREFIX = "key-"
RESERVED_TENANTS = (ADMIN_TENANT,)


class APIKeyConfigError(PromptstashError, ValueError):
    """API keys that cannot be served as given (a key listed twice, a reserved or colliding tenant name)."""


def generated_tenant_name(key: str) -> str:
    """The tenant of a key given without one: derived from the key alone, so it never changes when keys are
    added, removed or reordered, and it cannot equal an explicit name (those may not use the prefix)."""
    return GENERATED_TENANT_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:12]


def _masked(key: str) -> str:
    return repr(key[:4] + "…") if len(key) > 4 else "of length " + str(len(key))


def parse_api_keys(entries: Iterable[str], sources: Sequence[str] | None = None) -> dict[str, str]:
    """KEY or KEY:TENANT entries -> {key: tenant}. `sources` names each entry in errors (e.g. "keys.txt
    line 3"); keys themselves are only shown by their first 4 characters.

    Refused, with an APIKeyConfigError naming the entry: an empty key or tenant, a key listed twice, an
    explicit tenant that starts with the generated prefix ("key-") or is reserved ("admin"), and a generated
    name equal to an explicit one. Two keys explicitly naming the same tenant is allowed (key rotation).
    """
    entries = list(entries)
    where = list(sources) if sources is not None else [f"API key entry {i + 1}" for i in range(len(entries))]
    keys: dict[str, str] = {}
    seen_at: dict[str, str] = {}
    explicit: dict[str, str] = {}  # tenant -> where it was first named
    generated: dict[str, str] = {}
    for entry, src in zip(entries, where, strict=True):
        key, colon, tenant = entry.partition(":")
        key, tenant = key.strip(), tenant.strip()
        if not key:
            raise APIKeyConfigError(f"{src}: empty API key (expected KEY or KEY:TENANT)")
        if colon and not tenant:
            raise APIKeyConfigError(f"{src}: empty tenant name after ':' (expected KEY or KEY:TENANT)")
        if key in seen_at:
            raise APIKeyConfigError(f"{src}: API key {_masked(key)} is listed twice (first at {seen_at[key]}); "
                                    "each key may appear once")
        seen_at[key] = src
        if tenant:
            if tenant.startswith(GENERATED_TENANT_PREFIX):
                raise APIKeyConfigError(
                    f"{src}: tenant name {tenant!r} starts with {GENERATED_TENANT_PREFIX!r}, which is reserved for "
                    "the names generated for keys given without a tenant; choose another name")
            if tenant in RESERVED_TENANTS:
                raise APIKeyConfigError(f"{src}: tenant name {tenant!r} is reserved (admin keys use it)")
            explicit.setdefault(tenant, src)
        else:
            tenant = generated_tenant_name(key)
            generated[tenant] = src
        keys[key] = tenant
    for tenant, src in generated.items():  # impossible with the reserved prefix; kept as the stated invariant
        if tenant in explicit:
            raise APIKeyConfigError(f"{src}: the generated tenant name {tenant!r} equals the tenant named at "
                                    f"{explicit[tenant]}")
    return keys


def cache_namespace(tenant: str, cache_salt: str | None) -> str:
    """NOTE: the namespace is part of every block hash: tenants (and salts) never share blocks. Each part is
    length-prefixed, so no tenant name can spell another tenant's namespace plus a salt."""
    namespace = f"tenant:{len(tenant)}:{tenant}"
    return namespace + (f"|salt:{len(cache_salt)}:{cache_salt}" if cache_salt else "")


def registry_namespace(tenant: str) -> str:
    """Where a tenant's registered modules (POST /v1/modules) live: its namespace without a cache_salt, so a
    module id resolves for every request of the tenant, salted or not. NOTE: only the module's text is looked
    up there; its K/V are computed and cached in the request's own namespace (salt included)."""
    return cache_namespace(tenant, None)


@dataclass(frozen=True)
class Caller:
    """Who sent a request. tenant None = the metrics key; sees_all = admin, metrics key or the local tenant."""

    tenant: str | None
    sees_all: bool
    role: str  # "local" | "tenant" | "admin" | "metrics"


LOCAL_CALLER = Caller(LOCAL_TENANT, True, "local")


@dataclass
class ServerState:
    engine: Engine
    config: ServerConfig
    loop: EngineLoop
    stats: ServerStats
    model_name: str
    created: int
    semantic: SemanticCache | None = None  # None: built on first use (server/semantic.py)
    _keys: list[tuple[bytes, Caller]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        c = self.config
        self._keys = [(k.encode(), Caller(t, False, "tenant")) for k, t in (c.api_keys or {}).items()]
        self._keys += [(k.encode(), Caller(ADMIN_TENANT, True, "admin")) for k in c.admin_keys]
        if c.metrics_key:
            self._keys.append((c.metrics_key.encode(), Caller(None, True, "metrics")))

    def semantic_cache(self) -> SemanticCache:
        """The server's semantic cache; its responses go to the engine's tiers when it has any."""
        if self.semantic is None:
            from promptstash.semantic.store import SemanticIndex

            store = getattr(self.engine, "kv_store", None)
            self.semantic = SemanticCache(SemanticIndex(store.chain if store is not None else None),
                                          self.stats.record_semantic)
        return self.semantic

    def semantic_default(self, tenant: str) -> bool:
        """Whether the semantic cache is on for `tenant`'s requests that do not say (--semantic-cache-tenant)."""
        tenants = self.config.semantic_cache_tenants
        return "*" in tenants or tenant in tenants

    async def semantic_lookup(self, plan: SemanticPlan | None) -> SemanticOutcome | None:
        """Look an opted-in request up (None: not opted in)."""
        return None if plan is None else await self.semantic_cache().lookup(plan)

    def semantic_plan(self, option: SemanticOption, *, tenant: str, **kwargs: Any) -> SemanticPlan | None:
        """plan_for() with this server's model and the tenant's default (None: the request is not opted in)."""
        return plan_for(option, self.semantic_default(tenant), tenant=tenant, model_id=self.engine.model_id, **kwargs)

    @property
    def auth_required(self) -> bool:
        """True when tenant or admin keys are configured (a metrics key alone guards /metrics only)."""
        return bool(self.config.api_keys or self.config.admin_keys)

    def model_names(self) -> set[str]:
        return {self.model_name, self.engine.model_id, "default"}

    def check_model(self, name: str, param: str = "model") -> None:
        if name not in self.model_names():
            raise APIError(404, f"model {name!r} not found; this server serves {self.model_name!r}",
                           param=param, code="model_not_found")

    def caller(self, request: Request, *, metrics: bool = False, query_key: bool = False) -> Caller:
        """The caller of the request's key (Authorization: Bearer KEY, x-api-key: KEY, or ?key=KEY where
        `query_key`). `metrics`: the route is /metrics, where the metrics key is accepted."""
        guarded = self.auth_required or (metrics and self.config.metrics_key)
        if not guarded:
            return LOCAL_CALLER
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not given and query_key:
            given = request.query_params.get("key")
        if not given:
            where = "'Authorization: Bearer KEY' or 'x-api-key: KEY'" + (" (or ?key=KEY)" if query_key else "")
            raise APIError(401, f"missing API key: send {where}", code="invalid_api_key")
        found = None
        for key, who in self._keys:  # compare with every key: the time taken does not tell which matched
            if hmac.compare_digest(key, given.encode()) and found is None:
                found = who
        if found is None or (found.role == "metrics" and not metrics):
            raise APIError(401, "invalid API key", code="invalid_api_key")
        return found

    def tenant(self, request: Request) -> str:
        """The tenant of a model route's caller (401 without a tenant or admin key, when keys are set)."""
        tenant = self.caller(request).tenant
        assert tenant is not None
        return tenant

    async def read_body(self, request: Request) -> bytes:
        """The request body, never more than max_body_bytes of it: 413 from Content-Length before reading,
        or as soon as a body without one (chunked) passes the limit."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            text = declared.strip()
            if not text.isascii() or not text.isdigit():
                raise APIError(400, f"malformed Content-Length header {declared[:40]!r}")
            if int(text) > limit:
                raise APIError(413, f"request body is {int(text)} bytes; the limit is {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body is over the limit of {limit} bytes (read {size} so far)")
            chunks.append(chunk)
        return b"".join(chunks)

    def check_prompt_chars(self, num_chars: int, param: str) -> None:
        """Refuse, before any rendering or tokenizing, a prompt that has more characters than the context
        window could hold even if every token were the longest one."""
        limit = self.engine.max_prompt_chars
        if num_chars > limit:
            raise APIError(400, f"prompt has {num_chars} characters; at most {limit} characters fit in the "
                                f"context window of {self.engine.max_model_len} tokens", param=param,
                           code="context_length_exceeded")


async def wait_for_completion(submission: Submission, request: Request) -> Completion | None:
    """Wait for a non-streamed request; None (and the request aborted) if the client went away."""
    try:
        while not submission.finished:
            if await submission.next_update(timeout=0.5) is None and await request.is_disconnected():
                await submission.abort()
                return None
        return await submission.completion()
    except BaseException:
        await submission.abort()
        raise


def model_name_for(engine: Engine) -> str:
    return engine.model_id.split("@", 1)[0]
