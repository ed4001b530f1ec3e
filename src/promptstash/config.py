"""Engine options, validated once."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

import torch

from promptstash.errors import InvalidRequestError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CUDA_DEFAULT_DTYPE = "bfloat16"


def cpu_has_native_bf16() -> bool:
    """True if the CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_default_dtype() -> str:
    """float32, unless the CPU has native bfloat16 matmul.

    Chosen by measurement (README, "Choosing the dtype"): without those instructions prefill runs at the
    same speed in both (bfloat16 prefill upcasts its matmuls), so float32's exact reuse costs nothing there.
    """
    return "bfloat16" if cpu_has_native_bf16() else "float32"


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF directory or .gguf file; None = the default model
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"  # activations and KV: "auto" | "float32" | "bfloat16" | "float16"
    # weights: "auto" | "float32" | "bfloat16" | "float16" | "int8" | "int4" (models/quant.py). "auto" with an
    # explicit dtype keeps the weights in that dtype; with dtype "auto" too, it measures (Engine.from_pretrained)
    weights: str = "auto"
    # quantized weights: every batch on the quantized kernels, whose rows do not depend on the batch, so a
    # request's tokens and logits are bit-identical alone or beside others; costs prefill speed (README)
    batch_invariant: bool = False
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # KV pool size in blocks; None = kv_cache_tokens / block_size
    kv_cache_tokens: int = 32768
    max_num_seqs: int = 16  # requests running at once
    tenant_max_running: int = 0  # requests of one tenant running at once (0 = no limit)
    max_prefill_tokens: int = 512  # prefill tokens per step (chunk size)
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # None = the model's context window
    cache_dir: str | None = None  # where converted models live; None = ~/.cache/promptstash
    progress: bool = True  # progress bars while converting / loading
    num_threads: int | None = None  # torch CPU threads; None = torch's default
    max_protected_fraction: float = 0.5  # share of the pool that TTL-protected (cache_control) blocks may hold
    # lower tiers: KV blocks beyond the pool (None = off). Entries are content-addressed by block hash.
    kv_disk_dir: str | None = None  # local disk tier directory
    kv_disk_bytes: int = 8 * 1024**3  # its size cap (LRU beyond)
    redis_url: str | None = None  # e.g. redis://127.0.0.1:6379/0
    redis_ttl_s: float | None = 3600.0  # expiry of unprotected blocks in Redis (protected: their TTL class)
    kv_storage_dtype: str = "auto"  # dtype of stored entries; "auto" = the pool's (exact reuse)
    # modules: what is recomputed where cached modules are assembled (none | legolink[:K] | cacheblend[:R] | full)
    module_repair: str = "none"  # chosen by `bench modules` (see cache/modules.py)
    # which cached block goes first when the pool is full: lru | tlru | cost (cache/eviction.py, `bench policies`)
    eviction: str = "lru"
    ttft_slo_ms: float = 1000.0  # tlru: the TTFT target that decides which tail blocks are safe to evict
    schedule: str = "fcfs"  # admission order: fcfs | lpm (longest cached prefix first; engine/scheduler.py)
    max_wait_ms: float = 10000.0  # lpm: a request waiting this long goes ahead of every other

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise InvalidRequestError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        from promptstash.models.quant import WEIGHT_FORMATS

        if self.weights != "auto" and self.weights not in WEIGHT_FORMATS:
            raise InvalidRequestError(
                f"weights must be 'auto' or one of {', '.join(WEIGHT_FORMATS)}, got {self.weights!r}")
        if self.weights in DTYPES and self.dtype not in ("auto", self.weights):
            raise InvalidRequestError(
                f"weights {self.weights!r} run in their own dtype; got dtype {self.dtype!r} (use dtype 'auto' or "
                f"{self.weights!r}, or quantized weights: int8, int4)")
        for name in ("block_size", "kv_cache_tokens", "max_num_seqs", "max_prefill_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.tenant_max_running, int) or self.tenant_max_running < 0:
            raise InvalidRequestError(f"tenant_max_running must be an integer >= 0, got {self.tenant_max_running!r}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise InvalidRequestError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_storage_dtype != "auto" and self.kv_storage_dtype not in DTYPES:
            raise InvalidRequestError(f"kv_storage_dtype must be 'auto' or one of {', '.join(DTYPES)}, "
                                      f"got {self.kv_storage_dtype!r}")
        from promptstash.cache.eviction import EVICTION_POLICIES
        from promptstash.cache.modules import ModuleRepair
        from promptstash.engine.scheduler import SCHEDULES

        ModuleRepair.parse(self.module_repair)
        if self.eviction not in EVICTION_POLICIES:
            raise InvalidRequestError(
                f"eviction must be one of {', '.join(EVICTION_POLICIES)}, got {self.eviction!r}")
        if self.schedule not in SCHEDULES:
            raise InvalidRequestError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        for name in ("ttft_slo_ms", "max_wait_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise InvalidRequestError(f"{name} must be a number > 0, got {value!r}")
        if not 0.0 <= self.max_protected_fraction <= 1.0:
            raise InvalidRequestError(f"max_protected_fraction must be in [0, 1], got {self.max_protected_fraction}")
        if self.max_prefill_tokens % self.block_size:
            raise InvalidRequestError(
                f"max_prefill_tokens ({self.max_prefill_tokens}) must be a multiple of block_size ({self.block_size})"
            )
        try:
            torch.device(self.device)
        except RuntimeError as exc:
            raise InvalidRequestError(f"invalid device {self.device!r}: {exc}") from None

    @classmethod
    def from_options(cls, model: str | None = None, **options: Any) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InvalidRequestError(
                f"unknown engine option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(model=model, **options)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The activations' and KV's dtype."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if self.weights in DTYPES:
            return DTYPES[self.weights]
        return DTYPES[CUDA_DEFAULT_DTYPE if self.torch_device.type == "cuda" else cpu_default_dtype()]

    @property
    def fixed_weights(self) -> str | None:
        """The weight format, unless it is left to measurement at load (weights and dtype both "auto")."""
        if self.weights != "auto":
            return self.weights
        if self.dtype != "auto":
            return self.dtype
        return None

    @property
    def pool_blocks(self) -> int:
        return self.num_blocks if self.num_blocks is not None else -(-self.kv_cache_tokens // self.block_size)


@dataclass(frozen=True)
class PriceSheet:
    """Prices for cost estimates: a base input price and the providers' cache multipliers."""

    input_per_mtok: float = 3.0  # dollars per million uncached input tokens
    output_per_mtok: float = 15.0
    anthropic_write_5m: float = 1.25  # cache write, 5-minute TTL, times the input price
    anthropic_write_1h: float = 2.0
    anthropic_read: float = 0.1
    openai_read: float = 0.5  # OpenAI-style: cached input tokens at a 50% discount


_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s?#]+")  # a browser's Origin header: scheme://host[:port]


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # name in /v1/models; None = derived from the model id
    api_keys: dict[str, str] | None = None  # API key -> tenant; None or empty = one local tenant, no auth
    admin_keys: tuple[str, ...] = ()  # see every tenant's figures and the pool / tiers; tenant "admin" on routes
    metrics_key: str | None = None  # /metrics with every figure (a Prometheus scraper); no other route
    metrics_port: int | None = None  # a second listener on `host` serving /metrics alone, all figures, no key
    min_cacheable_tokens: int = 1024  # shorter cache_control prefixes write nothing (no error)
    max_queued_requests: int = 256  # unfinished requests beyond this are refused (429 / 529)
    tenant_max_queued: int = 0  # unfinished requests per tenant beyond this are refused (429 / 529); 0 = off
    stream_idle_timeout_s: float = 30.0  # a stream whose client reads nothing this long is aborted; 0 = off
    max_body_bytes: int = 32 * 1024 * 1024
    default_max_tokens: int = 1024  # OpenAI routes, when the request gives none
    prices: PriceSheet = PriceSheet()
    # browser origins allowed to call the API (CORS); "*" = any; empty = no CORS headers, preflights get 405
    cors_allow_origins: tuple[str, ...] = ()
    # tenants whose chat requests use the semantic cache unless they say "semantic_cache": false; "*" = every tenant
    semantic_cache_tenants: tuple[str, ...] = ()
    # KV events (cache/events.py): publish stored / removed block hashes to this Redis (None = off)
    kv_events_url: str | None = None
    replica_id: str | None = None  # names this replica in KV events and the blocks summary; None = hostname:port

    def __post_init__(self) -> None:
        object.__setattr__(self, "semantic_cache_tenants", tuple(self.semantic_cache_tenants))
        if any(not isinstance(t, str) or not t.strip() for t in self.semantic_cache_tenants):
            raise InvalidRequestError("semantic_cache_tenants: tenant names must be non-empty strings")
        for name in ("min_cacheable_tokens", "max_queued_requests", "max_body_bytes", "default_max_tokens",
                     "tenant_max_queued"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise InvalidRequestError(f"{name} must be a non-negative integer, got {value!r}")
        if not isinstance(self.stream_idle_timeout_s, int | float) or not self.stream_idle_timeout_s >= 0:
            raise InvalidRequestError(f"stream_idle_timeout_s must be >= 0, got {self.stream_idle_timeout_s!r}")
        if self.metrics_port is not None and not (isinstance(self.metrics_port, int) and 0 < self.metrics_port
                                                  < 65536 and self.metrics_port != self.port):
            raise InvalidRequestError(f"metrics_port must be a TCP port other than port ({self.port}), "
                                      f"got {self.metrics_port!r}")
        object.__setattr__(self, "admin_keys", tuple(self.admin_keys))
        tenant_keys = set(self.api_keys or {})
        if any(not k for k in (*tenant_keys, *self.admin_keys)) or self.metrics_key == "":
            raise InvalidRequestError("API keys must not be empty")
        if "admin" in (self.api_keys or {}).values():
            raise InvalidRequestError("tenant name 'admin' is reserved for admin keys")
        if len(set(self.admin_keys)) != len(self.admin_keys) or tenant_keys & set(self.admin_keys):
            raise InvalidRequestError("an admin key is listed twice, or is also a tenant's API key")
        if self.metrics_key is not None and self.metrics_key in tenant_keys | set(self.admin_keys):
            raise InvalidRequestError("the metrics key must differ from every tenant and admin key")
        origins = tuple(o.strip().rstrip("/").lower() if isinstance(o, str) else o for o in self.cors_allow_origins)
        object.__setattr__(self, "cors_allow_origins", origins)  # as browsers send them: lower case, no slash
        for origin in origins:
            if origin != "*" and not (isinstance(origin, str) and _ORIGIN.fullmatch(origin)):
                raise InvalidRequestError(f"cors_allow_origins: {origin!r} is not an origin; give '*' or "
                                          "scheme://host[:port] with no path, e.g. http://localhost:3000")
