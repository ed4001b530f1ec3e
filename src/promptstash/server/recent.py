"""Recent requests, per tenant: the dashboard's request list, its top cached prefixes, and
"why did this miss?" — where a prompt first diverged from the closest earlier prompt.

    earlier:  [ system prompt ........ | "Today is 2026-11-27" | question ]
    this:     [ system prompt ........ | "Today is 2026-11-28" | question ]
                                                   ^ diverged_at: the first token that differs
    reused = diverged_at rounded down to whole blocks (only full blocks are cached)

A prompt with modules is also reused after the divergence, module by module: the report then says how many of
its modules hit and how many tokens they gave (reused, recomputed by repair), and for each module after the
exact prefix whether an earlier request of the namespace carried the same module (a miss then means it was
evicted) or it was new (computed and stored now: the next prompt with it hits).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from promptstash.cache.modules import ModuleSpan
from promptstash.engine.engine import Completion

CONTEXT_TOKENS = 24  # tokens of text shown on each side of a divergence


@dataclass(frozen=True)
class RecentRequest:
    request_id: str
    route: str
    tenant: str
    namespace: str  # the cache namespace (tenant and cache_salt): only requests in one namespace share blocks
    prompt_token_ids: tuple[int, ...]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float
    finished_at: float
    modules: tuple[ModuleSpan, ...] = ()  # the prompt's module spans
    num_modules: int = 0  # usage: modules outside the reused prefix, and how many of those hit
    num_module_hits: int = 0
    module_cached_tokens: int = 0
    recomputed_tokens: int = 0
    module_repair: str | None = None

    def module_tokens(self, span: ModuleSpan) -> tuple[int, ...]:
        return self.prompt_token_ids[span.start:span.end]


def common_prefix_len(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RecentRequests:
    def __init__(self, tokenizer: Any, block_size: int, max_requests: int = 512) -> None:
        self.tokenizer = tokenizer
        self.block_size = block_size
        self._items: deque[RecentRequest] = deque(maxlen=max_requests)
        self._lock = threading.Lock()

    def add(self, route: str, request_id: str, completion: Completion, tenant: str, *,
            modules: Sequence[ModuleSpan] = ()) -> None:
        u = completion.usage
        item = RecentRequest(request_id, route, tenant, completion.namespace, completion.prompt_token_ids,
                             u.prompt_tokens, u.cached_tokens, u.completion_tokens, completion.timings.ttft_s,
                             time.time(), tuple(modules), u.num_modules, u.num_module_hits, u.module_cached_tokens,
                             u.recomputed_tokens, u.module_repair)
        with self._lock:
            self._items.append(item)

    def _snapshot(self, tenant: str | None) -> list[RecentRequest]:
        """Requests of one tenant (whatever their cache_salt), or of all (None)."""
        with self._lock:
            return [r for r in self._items if tenant is None or r.tenant == tenant]

    def _text(self, ids: tuple[int, ...]) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def recent(self, tenant: str | None, limit: int = 50) -> list[dict[str, Any]]:
        """The newest requests first, with their cached / uncached split."""
        return [{"request_id": r.request_id, "route": r.route, "prompt_tokens": r.prompt_tokens,
                 "cached_tokens": r.cached_tokens, "uncached_tokens": r.prompt_tokens - r.cached_tokens,
                 "module_cached_tokens": r.module_cached_tokens, "num_modules": len(r.modules),
                 "completion_tokens": r.completion_tokens, "ttft_s": r.ttft_s, "finished_at": r.finished_at}
                for r in reversed(self._snapshot(tenant)[-limit:])]

    def top_prefixes(self, tenant: str | None, locate: Callable[[tuple[int, ...], str], tuple] | None = None,
                     limit: int = 10) -> list[dict[str, Any]]:
        """Prefixes that served hits, grouped by their first block: first tokens, size, hits; where they are now
        (locate(token_ids, namespace) -> (tier, ttl_class))."""
        groups: dict[tuple[str, tuple[int, ...]], dict[str, Any]] = {}
        for r in self._snapshot(tenant):
            if r.cached_tokens < self.block_size:
                continue
            key = (r.namespace, r.prompt_token_ids[:self.block_size])
            g = groups.setdefault(key, {"first_tokens": self._text(r.prompt_token_ids[:CONTEXT_TOKENS]),
                                        "size_tokens": 0, "hits": 0, "cached_tokens": 0, "_ids": (), "_ns": ""})
            if r.cached_tokens >= g["size_tokens"]:
                g["size_tokens"], g["_ns"] = r.cached_tokens, r.namespace
                g["_ids"] = r.prompt_token_ids[:r.cached_tokens]
            g["hits"] += 1
            g["cached_tokens"] += r.cached_tokens
        top = sorted(groups.values(), key=lambda g: (-g["cached_tokens"], -g["hits"]))[:limit]
        for g in top:
            ids, ns = g.pop("_ids"), g.pop("_ns")
            g["tier"], g["ttl_class"] = locate(ids, ns) if locate is not None else (None, None)
        return top

    def divergence(self, request_id: str, tenant: str | None) -> dict[str, Any] | None:
        """Why did this request miss (fully or partly)? None if the id is unknown (to this tenant)."""
        items = self._snapshot(tenant)
        index = next((i for i, r in enumerate(items) if r.request_id == request_id), None)
        if index is None:
            return None
        this = items[index]
        best, best_len = None, -1
        for other in items[:index]:
            if other.namespace != this.namespace:
                continue
            n = common_prefix_len(this.prompt_token_ids, other.prompt_token_ids)
            if n > best_len:
                best, best_len = other, n
        report: dict[str, Any] = {
            "request_id": this.request_id, "prompt_tokens": this.prompt_tokens, "cached_tokens": this.cached_tokens,
            "block_size": self.block_size,
        }
        modules_note = ""
        if this.modules:
            report["modules"] = self._modules_report(this, items[:index])
            modules_note = " " + report["modules"]["explanation"]
        if best is None:
            report.update(closest_request_id=None, diverged_at_token=0,
                          explanation="no earlier request of this tenant to compare with: a first request computes "
                                      "its whole prompt" + (", modules included" if this.modules else "")
                                      + modules_note)
            return report
        at = best_len
        lo = max(0, at - CONTEXT_TOKENS)
        report.update(
            closest_request_id=best.request_id,
            diverged_at_token=at,
            common_prefix_tokens=at,
            reusable_tokens=min(at, this.prompt_tokens - 1) // self.block_size * self.block_size,
            this_token_id=this.prompt_token_ids[at] if at < len(this.prompt_token_ids) else None,
            earlier_token_id=best.prompt_token_ids[at] if at < len(best.prompt_token_ids) else None,
            text_before=self._text(this.prompt_token_ids[lo:at]),
            this_text_after=self._text(this.prompt_token_ids[at:at + CONTEXT_TOKENS]),
            earlier_text_after=self._text(best.prompt_token_ids[at:at + CONTEXT_TOKENS]),
        )
        if at >= len(this.prompt_token_ids):
            report["explanation"] = "the whole prompt repeats an earlier one; the last partial block is recomputed"
        elif this.modules:
            report["explanation"] = (
                f"the prompt first differs from request {best.request_id} at token {at}; after that point only "
                f"modules can be reused, the rest is computed.")
        else:
            report["explanation"] = (
                f"the prompt first differs from request {best.request_id} at token {at}; everything after that "
                f"point is recomputed (a common cause is a timestamp or a reordered list near the start)")
        report["explanation"] += modules_note
        return report

    def _modules_report(self, this: RecentRequest, earlier: list[RecentRequest]) -> dict[str, Any]:
        """The modules of `this` and what became of them: counts from its usage, and for each module whether an
        earlier request of its namespace carried the same tokens as a module (then a miss means eviction)."""
        seen: dict[tuple[int, ...], str] = {}
        for other in earlier:
            if other.namespace == this.namespace:
                for span in other.modules:
                    seen[other.module_tokens(span)] = other.request_id
        prefix = this.cached_tokens - this.module_cached_tokens  # the exact prefix reused
        details = []
        for span in this.modules:
            tokens = this.module_tokens(span)
            details.append({
                "start": span.start, "end": span.end, "num_tokens": span.num_tokens, "module_id": span.module_id,
                "in_reused_prefix": span.end <= prefix,
                "seen_in_request_id": seen.get(tokens),
                "first_tokens": self._text(tokens[:CONTEXT_TOKENS]),
            })
        looked_up = this.num_modules
        misses = looked_up - this.num_module_hits
        in_prefix = sum(d["in_reused_prefix"] for d in details)
        parts = [f"{len(details)} module(s) in the prompt"]
        if in_prefix:
            parts.append(f"{in_prefix} inside the reused exact prefix")
        repair = f" by repair {this.module_repair}" if this.module_repair else ""
        parts.append(f"{this.num_module_hits} of {looked_up} looked up hit ({this.module_cached_tokens} tokens reused "
                     f"at their new positions, {this.recomputed_tokens} recomputed{repair})")
        text = "; ".join(parts) + "."
        if misses > 0:
            new = sum(1 for d in details if not d["in_reused_prefix"] and d["seen_in_request_id"] is None
                      and d["module_id"] is None)  # a registered module was precomputed when registered
            text += (f" {misses} missed: " + (f"{new} had not been seen before in this namespace (computed and "
                                                f"stored now, so the next prompt with them hits)" if new else "")
                     + ("; " if new and misses > new else "")
                     + ("others were seen earlier but their blocks had been evicted" if misses > new else "") + ".")
        return {"num_modules": len(details), "num_looked_up": looked_up, "num_hits": this.num_module_hits,
                "num_misses": misses, "reused_tokens": this.module_cached_tokens,
                "recomputed_tokens": this.recomputed_tokens, "module_repair": this.module_repair,
                "modules": details, "explanation": text}
