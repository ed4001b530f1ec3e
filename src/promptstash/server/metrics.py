"""What the server reports: Prometheus metrics and the /v1/cache/stats totals, from one record() per response,
kept per tenant.

NOTE: every counter is fed from the same usage object that the response carries, so /metrics and
/v1/cache/stats always agree with the sum of the usage fields returned. A tenant sees only its own
figures (its totals; its series of the per-request families, labelled tenant=...); the pool, the tiers and
the engine are shared by all tenants, so only an admin (or the metrics key, or the local tenant when no
keys are configured) sees them. Engine figures come from engine.stats() and engine.config alone.

Modules: a tenant's totals count its own module lookups, hits and reused / recomputed tokens (from usage); the
engine-wide module figures (modules cached in the pool, their blocks and bytes, registry size, tier hits) are
shared like the pool's, so only an admin sees them (/v1/cache/stats "modules", promptstash_module_* metrics).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from promptstash.cache.modules import ModuleSpan
from promptstash.config import PriceSheet
from promptstash.engine.engine import Completion, Engine
from promptstash.server.recent import RecentRequests

disable_created_metrics()  # no *_created series: they double the output and nobody graphs them
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


@dataclass
class Totals:
    num_requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cache_write_tokens: dict[str, int] = field(default_factory=lambda: {"5m": 0, "1h": 0, "24h": 0})
    num_refused_writes: int = 0
    computed_prompt_tokens: int = 0  # uncached prompt tokens of requests that computed some
    prefill_seconds: float = 0.0  # their time to first token
    module_lookups: int = 0  # modules in prompts, outside the reused prefix (usage.num_modules)
    module_hits: int = 0  # of those, found in the cache
    module_cached_tokens: int = 0  # module tokens reused and not recomputed (part of cached_tokens)
    module_recomputed_tokens: int = 0  # module tokens loaded but recomputed by the repair strategy

    def copy(self) -> Totals:
        return replace(self, cache_write_tokens=dict(self.cache_write_tokens))

    def add(self, other: Totals) -> None:
        for name in ("num_requests", "prompt_tokens", "cached_tokens", "completion_tokens", "num_refused_writes",
                     "computed_prompt_tokens", "prefill_seconds", "module_lookups", "module_hits",
                     "module_cached_tokens", "module_recomputed_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for ttl, n in other.cache_write_tokens.items():
            self.cache_write_tokens[ttl] = self.cache_write_tokens.get(ttl, 0) + n


class TenantView:
    """A collector over the per-request metrics that yields only one tenant's samples (for generate_latest)."""

    def __init__(self, metrics: list[Counter | Histogram], tenant: str) -> None:
        self._metrics = metrics
        self._tenant = tenant

    def collect(self) -> Iterator[Metric]:
        for metric in self._metrics:
            for family in metric.collect():
                mine = Metric(family.name, family.documentation, family.type, family.unit)
                mine.samples = [s for s in family.samples if s.labels.get("tenant") == self._tenant]
                yield mine


class ServerStats:
    def __init__(self, engine: Engine, prices: PriceSheet) -> None:
        self.engine = engine
        self.recent = RecentRequests(engine.tokenizer, engine.config.block_size)
        self.prices = prices
        self.totals: dict[str, Totals] = {}  # per tenant
        self._lock = threading.Lock()
        self.registry = CollectorRegistry()  # every figure: what an admin, the metrics key and --metrics-port see
        r = self.registry
        self.m_requests = Counter("promptstash_requests", "Finished requests", ["route", "finish_reason", "tenant"],
                                  registry=r)
        self.m_prompt = Counter("promptstash_prompt_tokens", "Prompt tokens (cache queries, in tokens)", ["tenant"],
                                registry=r)
        self.m_cached = Counter("promptstash_cached_tokens", "Prompt tokens served from the cache (hits)",
                                ["tenant"], registry=r)
        self.m_generated = Counter("promptstash_generation_tokens", "Generated tokens", ["tenant"], registry=r)
        self.m_written = Counter("promptstash_cache_write_tokens", "Prompt tokens written under a TTL class",
                                 ["ttl", "tenant"], registry=r)
        self.m_refused = Counter("promptstash_cache_write_refused", "Cache writes refused (protected blocks "
                                 "would exceed the pool's cap)", ["tenant"], registry=r)
        self.m_ttft = Histogram("promptstash_time_to_first_token_seconds", "Time to first token", ["tenant"],
                                buckets=LATENCY_BUCKETS, registry=r)
        self.m_e2e = Histogram("promptstash_e2e_request_latency_seconds", "End-to-end request latency",
                               ["tenant"], buckets=LATENCY_BUCKETS, registry=r)
        # the semantic cache (server/semantic.py): opted-in lookups, hits, and refusals by the guard that refused
        self.m_semantic_lookups = Counter("promptstash_semantic_cache_lookups", "Semantic-cache lookups of opted-in "
                                          "requests, by outcome (hit, miss, refused, bypass, error)",
                                          ["outcome", "tenant"], registry=r)
        self.m_semantic_hits = Counter("promptstash_semantic_cache_hits", "Requests answered from the semantic cache "
                                       "(the model did not run)", ["tenant"], registry=r)
        self.m_semantic_refusals = Counter("promptstash_semantic_cache_refusals", "Semantic-cache candidates above "
                                           "the threshold refused by a guard", ["guard", "tenant"], registry=r)
        self._per_request = [self.m_requests, self.m_prompt, self.m_cached, self.m_generated, self.m_written,
                             self.m_refused, self.m_ttft, self.m_e2e, self.m_semantic_lookups, self.m_semantic_hits,
                             self.m_semantic_refusals]
        r.register(_PoolCollector(engine))

    def record_semantic(self, tenant: str, outcome: str, guard: str | None = None) -> None:
        """One opted-in request's semantic-cache outcome (hit | miss | refused | bypass | error)."""
        self.m_semantic_lookups.labels(outcome=outcome, tenant=tenant).inc()
        if outcome == "hit":
            self.m_semantic_hits.labels(tenant=tenant).inc()
        elif outcome == "refused" and guard is not None:
            self.m_semantic_refusals.labels(guard=guard, tenant=tenant).inc()

    def tenant_view(self, tenant: str) -> TenantView:
        """What /metrics shows a tenant's key: its own series of the per-request families, nothing shared."""
        return TenantView(self._per_request, tenant)

    def record(self, route: str, completion: Completion, tenant: str, *, modules: Sequence[ModuleSpan] = ()) -> None:
        """One finished response; `modules`: the prompt's module spans (for "why did this miss?")."""
        u, t = completion.usage, completion.timings
        self.recent.add(route, completion.request_id, completion, tenant, modules=modules)
        with self._lock:
            tot = self.totals.setdefault(tenant, Totals())
            tot.num_requests += 1
            tot.prompt_tokens += u.prompt_tokens
            tot.cached_tokens += u.cached_tokens
            tot.completion_tokens += u.completion_tokens
            for ttl, n in u.cache_write_tokens.items():
                tot.cache_write_tokens[ttl] = tot.cache_write_tokens.get(ttl, 0) + n
                self.m_written.labels(ttl, tenant).inc(n)
            tot.num_refused_writes += int(u.cache_write_refused)
            tot.module_lookups += u.num_modules
            tot.module_hits += u.num_module_hits
            tot.module_cached_tokens += u.module_cached_tokens
            tot.module_recomputed_tokens += u.recomputed_tokens
            if u.prompt_tokens > u.cached_tokens:
                tot.computed_prompt_tokens += u.prompt_tokens - u.cached_tokens
                tot.prefill_seconds += t.ttft_s
        self.m_requests.labels(route, completion.finish_reason, tenant).inc()
        self.m_prompt.labels(tenant).inc(u.prompt_tokens)
        self.m_cached.labels(tenant).inc(u.cached_tokens)
        self.m_generated.labels(tenant).inc(u.completion_tokens)
        if u.cache_write_refused:
            self.m_refused.labels(tenant).inc()
        self.m_ttft.labels(tenant).observe(t.ttft_s)
        self.m_e2e.labels(tenant).observe(t.total_s)

    def snapshot(self, tenant: str | None = None) -> dict[str, Any]:
        """The /v1/cache/stats document: one tenant's totals, or (None) every tenant's with the per-tenant
        split, the pool and the tiers."""
        with self._lock:
            per_tenant = {name: tot.copy() for name, tot in self.totals.items()}
        if tenant is not None:
            doc = {"tenant": tenant, **self._totals_json(per_tenant.get(tenant, Totals()))}
            return doc
        everyone = Totals()
        for tot in per_tenant.values():
            everyone.add(tot)
        stats = self.engine.stats()
        cache = stats.cache
        doc = self._totals_json(everyone)
        doc["tenants"] = {name: {k: self._totals_json(tot)[k] for k in ("num_requests", "prompt_tokens",
                                                                        "cached_tokens", "completion_tokens",
                                                                        "hit_rate")}
                          for name, tot in sorted(per_tenant.items())}
        doc["pool"] = {
            "num_blocks": cache.usage.num_blocks,
            "block_size": self.engine.config.block_size,
            "used": cache.usage.num_in_use,
            "cached": cache.usage.num_cached,
            "free": cache.usage.num_free,
            "evictions": cache.num_evictions,
            "protected_blocks": cache.num_protected_blocks,
            "forced_expiries": cache.num_forced_expiries,
        }
        doc["requests"] = {"waiting": stats.num_waiting, "loading": stats.num_loading, "running": stats.num_running,
                           "errors": stats.num_errors}
        doc["modules"] = self._engine_modules_json(stats.modules)
        doc["tiers"] = [dict(t.__dict__) for t in stats.tiers]
        doc["dropped_tier_writes"] = stats.num_dropped_tier_writes
        doc["process"] = self._process_json()
        return doc

    def _process_json(self) -> dict[str, Any]:
        """The server process's memory (admin only, like the pool): what the weights and the KV pool hold."""
        model = self.engine.model
        rss, peak = process_memory()
        return {
            "rss_bytes": rss, "peak_rss_bytes": peak,
            "weights": model.weight_format, "dtype": str(model.dtype).removeprefix("torch."),
            "weight_bytes": model.weight_bytes,
            "kv_pool_bytes": self.engine.kv.k.numel() * self.engine.kv.k.element_size() * 2,
        }

    @staticmethod
    def _engine_modules_json(m: Any) -> dict[str, Any]:
        """Engine-wide module figures (every tenant's): admin only, like the pool."""
        return {
            "lookups": m.num_lookups, "hits": m.num_hits, "tier_hits": m.num_tier_hits, "hit_rate": m.hit_rate,
            "reused_tokens": m.num_reused_tokens, "recomputed_tokens": m.num_recomputed_tokens,
            "stored": m.num_stored, "cached": m.num_cached, "blocks": m.num_blocks, "bytes": m.num_bytes,
            "registered": m.num_registered,
        }

    def _totals_json(self, tot: Totals) -> dict[str, Any]:
        p = self.prices
        uncached = tot.prompt_tokens - tot.cached_tokens
        written = sum(tot.cache_write_tokens.values())
        price = p.input_per_mtok / 1e6
        no_cache = tot.prompt_tokens * price
        anthropic = price * (uncached - written + tot.cache_write_tokens.get("5m", 0) * p.anthropic_write_5m
                             + (tot.cache_write_tokens.get("1h", 0) + tot.cache_write_tokens.get("24h", 0))
                             * p.anthropic_write_1h + tot.cached_tokens * p.anthropic_read)
        openai = price * (uncached + tot.cached_tokens * p.openai_read)
        rate = tot.computed_prompt_tokens / tot.prefill_seconds if tot.prefill_seconds > 0 else None
        return {
            "num_requests": tot.num_requests,
            "prompt_tokens": tot.prompt_tokens,
            "cached_tokens": tot.cached_tokens,
            "uncached_prompt_tokens": uncached,
            "completion_tokens": tot.completion_tokens,
            "hit_rate": tot.cached_tokens / tot.prompt_tokens if tot.prompt_tokens else 0.0,
            "cache_write_tokens": tot.cache_write_tokens,
            "refused_writes": tot.num_refused_writes,
            "prefix_cached_tokens": tot.cached_tokens - tot.module_cached_tokens,
            "module_usage": {
                "lookups": tot.module_lookups, "hits": tot.module_hits,
                "hit_rate": tot.module_hits / tot.module_lookups if tot.module_lookups else 0.0,
                "reused_tokens": tot.module_cached_tokens, "recomputed_tokens": tot.module_recomputed_tokens,
            },
            "savings": {
                "prefill_tokens_per_s": rate,
                "prefill_seconds_saved": tot.cached_tokens / rate if rate else 0.0,
                "prices": p.__dict__,
                "input_cost_without_cache": no_cache,
                "anthropic_style": {"input_cost": anthropic, "saved": no_cache - anthropic},
                "openai_style": {"input_cost": openai, "saved": no_cache - openai},
            },
        }


class _PoolCollector:
    """Pool and eviction figures, read from the engine at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        cache = stats.cache
        blocks = GaugeMetricFamily("promptstash_pool_blocks", "KV pool blocks by state", labels=["state"])
        blocks.add_metric(["used"], cache.usage.num_in_use)
        blocks.add_metric(["cached"], cache.usage.num_cached)
        blocks.add_metric(["free"], cache.usage.num_free)
        yield blocks
        protected = GaugeMetricFamily("promptstash_protected_blocks", "Blocks protected by a TTL class",
                                      labels=["ttl"])
        for ttl, n in cache.num_protected_blocks.items():
            protected.add_metric([ttl], n)
        yield protected
        yield CounterMetricFamily("promptstash_evictions", "Cached blocks evicted from the pool",
                                  value=cache.num_evictions)
        yield CounterMetricFamily("promptstash_preemptions", "Requests preempted for lack of blocks",
                                  value=stats.num_preemptions)
        yield GaugeMetricFamily("promptstash_requests_unfinished", "Requests queued or running",
                                value=stats.num_waiting + stats.num_loading + stats.num_running)
        state = GaugeMetricFamily("promptstash_requests_by_state", "Unfinished requests by state", labels=["state"])
        for name, value in (("waiting", stats.num_waiting), ("loading", stats.num_loading),
                            ("running", stats.num_running)):
            state.add_metric([name], value)
        yield state
        yield CounterMetricFamily("promptstash_request_errors", "Requests finished with an error",
                                  value=stats.num_errors)
        yield from _module_families(stats.modules)
        if not stats.tiers:
            return
        gauges = {"num_entries": "Entries stored", "num_bytes": "Bytes stored"}
        counters = {"num_hits": "Lookups that hit", "num_misses": "Lookups that missed", "num_writes": "Writes",
                    "num_refused_writes": "Writes refused (size cap, disk full, read-only)",
                    "num_failed_writes": "Writes failed (backend error)", "num_failed_reads": "Reads failed",
                    "num_corrupt": "Damaged entries found and deleted", "num_expired": "Entries expired",
                    "load_seconds": "Seconds spent reading hits",
                    "num_loaded_blocks": "Blocks loaded into the pool"}
        for key, text in {**gauges, **counters}.items():
            name = "promptstash_tier_" + key.removeprefix("num_")
            cls = GaugeMetricFamily if key in gauges else CounterMetricFamily
            family = cls(name, text + ", per tier", labels=["tier"])
            for t in stats.tiers:
                family.add_metric([t.name], getattr(t, key))
            yield family
        yield CounterMetricFamily("promptstash_tier_dropped_writes", "Tier writes dropped (write queue full)",
                                  value=stats.num_dropped_tier_writes)


MODULE_COUNTERS = {  # ModuleStats field -> (metric name, help); engine-wide, so admin only like the pool
    "num_lookups": ("promptstash_module_lookups", "Modules looked up in the cache (outside a reused prefix)"),
    "num_hits": ("promptstash_module_hits", "Module lookups that hit (in the pool or a tier)"),
    "num_tier_hits": ("promptstash_module_tier_hits", "Module hits loaded from a tier (disk, Redis)"),
    "num_reused_tokens": ("promptstash_module_reused_tokens", "Module tokens reused and not recomputed"),
    "num_recomputed_tokens": ("promptstash_module_recomputed_tokens",
                              "Module tokens loaded from the cache but recomputed by the repair strategy"),
    "num_stored": ("promptstash_module_stored", "Modules computed in isolation and stored"),
}
MODULE_GAUGES = {
    "num_cached": ("promptstash_module_cached", "Distinct modules whose blocks are all in the pool now"),
    "num_blocks": ("promptstash_module_blocks", "Pool blocks held by modules now"),
    "num_bytes": ("promptstash_module_bytes", "K/V bytes of the pool blocks held by modules now"),
    "num_registered": ("promptstash_module_registered", "Modules in the registry (POST /v1/modules), all tenants"),
}


def _module_families(modules: Any) -> Iterator[Metric]:
    for key, (name, text) in MODULE_COUNTERS.items():
        yield CounterMetricFamily(name, text, value=getattr(modules, key))
    for key, (name, text) in MODULE_GAUGES.items():
        yield GaugeMetricFamily(name, text, value=getattr(modules, key))


def process_memory() -> tuple[int, int]:
    """(resident, peak resident) bytes of this process, from /proc (0, 0 where it is absent)."""
    found = {"VmRSS": 0, "VmHWM": 0}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in found:
                    found[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return found["VmRSS"], found["VmHWM"]
