"""The semantic cache in the server: the `semantic_cache` request field, the per-tenant default, lookups before
the model runs, storing what the model answered, and the labels a response carries.

Request field (chat routes: /v1/chat/completions and /v1/messages):
    "semantic_cache": true | false | null | {"threshold": 0.0..1.0}     ({} = true with the default threshold)
Absent or null: on when the tenant is listed by --semantic-cache-tenant (or it names '*'), else off. Anything
else (a string, a threshold outside [0, 1] or not a number, an unknown key) is a 400 in the route's format.

Eligible requests (otherwise the response says bypass:<reason> and the model runs as usual): the last message is
a user message of plain text (no modules, no tool result, no assistant prefill); n == 1; no logprobs;
max_tokens > 0; and greedy sampling (temperature 0, or top_k 1) or a seed. NOTE: temperature > 0 without a seed
is never served from, nor stored in, the semantic cache: its answers are meant to differ. A seeded request only
matches entries made with the same seed and sampling parameters (they are part of the key).

Labels (only when the request opted in; a request that did not never gets a semantic answer):
    header  x-promptstash-semantic-cache: hit | miss | refused:<guard> | bypass:<reason> | error
    usage   "semantic_cache": {"hit": bool, "similarity": float | null, "guard"?: str, "bypass"?: str}
A hit reports every prompt token as cached (prompt_tokens = cached_tokens = the prompt's tokens; Anthropic:
cache_read_input_tokens = the prompt's tokens, input_tokens 0) and the stored answer's completion tokens.

NOTE: embedding runs on a worker thread (asyncio.to_thread), never on the event loop or under the engine's lock.
A lookup that fails (the embedding model cannot load, anything unexpected) logs a warning and the request runs
the model as if it had not opted in (labelled "error"): never a 500.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from promptstash.engine.engine import Completion, Timings, Usage
from promptstash.engine.results import RequestUpdate
from promptstash.engine.sampling import SamplingParams
from promptstash.prompts import ChatMessage
from promptstash.semantic import DEFAULT_THRESHOLD
from promptstash.semantic.store import Lookup, SemanticIndex, StoredResponse, as_jsonable_messages, context_key
from promptstash.server.validate import Body, type_name

log = logging.getLogger("promptstash.semantic")

HEADER = "x-promptstash-semantic-cache"
ALL_TENANTS = "*"
FIELD = "semantic_cache"


@dataclass(frozen=True)
class SemanticOption:
    """The request's `semantic_cache` field: requested None = absent (the tenant's default applies)."""

    requested: bool | None = None
    threshold: float | None = None


def parse_option(body: Body) -> SemanticOption:
    """`semantic_cache` -> SemanticOption; a wrong type, an unknown key or a threshold outside [0, 1] is a 400."""
    value = body.data.get(FIELD)
    if value is None:
        return SemanticOption()
    if isinstance(value, bool):
        return SemanticOption(value)
    if not isinstance(value, dict):
        raise body.fail(FIELD, f"expected true, false or an object like {{\"threshold\": 0.9}}, got {type_name(value)}")
    unknown = sorted(set(value) - {"threshold"})
    if unknown:
        raise body.fail(FIELD, f"unknown key {unknown[0][:40]!r}; the only key is 'threshold' (a number in [0, 1])")
    threshold = value.get("threshold")
    if threshold is None:
        return SemanticOption(True)
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold) \
            or not 0.0 <= threshold <= 1.0:
        shown = repr(threshold)[:40] if isinstance(threshold, int | float) else type_name(threshold)
        raise body.fail(f"{FIELD}.threshold", f"expected a number in [0, 1], got {shown}")
    return SemanticOption(True, float(threshold))


@dataclass(frozen=True)
class SemanticPlan:
    """What one opted-in request asks of the semantic cache (built on the request's worker thread).

    key / query None: the request is not eligible (`bypass` says why)."""

    tenant: str
    threshold: float
    key: bytes | None
    query: str | None
    bypass: str | None = None


def _ineligible(messages: Sequence[ChatMessage], sampling: SamplingParams, has_modules: bool) -> str | None:
    if not messages or messages[-1].role != "user":
        return "last-message-not-user"
    last = messages[-1]
    if has_modules or any(b.module or b.module_id is not None for m in messages for b in m.blocks):
        return "modules"
    if not "".join(b.text for b in last.blocks).strip():
        return "empty-message"
    if sampling.n != 1:
        return "n"
    if sampling.logprobs is not None:
        return "logprobs"
    if sampling.max_tokens == 0:
        return "max-tokens-0"
    if not sampling.greedy and sampling.seed is None:
        return "sampling-without-seed"
    return None


def plan_for(option: SemanticOption, default_on: bool, *, tenant: str, namespace: str, model_id: str,
             flavour: str, messages: Sequence[ChatMessage], sampling: SamplingParams, extra: Any = None,
             has_modules: bool = False) -> SemanticPlan | None:
    """The plan of a request, or None when the semantic cache is off for it (not asked, not the tenant's default,
    or asked off). `extra`: whatever else of the request changes the response (tools, how output is parsed)."""
    enabled = option.requested if option.requested is not None else default_on
    if not enabled:
        return None
    threshold = DEFAULT_THRESHOLD if option.threshold is None else option.threshold
    reason = _ineligible(messages, sampling, has_modules)
    if reason is not None:
        return SemanticPlan(tenant, threshold, None, None, reason)
    query = "\n".join(b.text for b in messages[-1].blocks)
    # NOTE: the key holds every sampling parameter (seed included), and greedy requests normalise temperature
    # and seed away (they do not change a greedy answer), so a hit always replays an answer the request could
    # have got itself.
    sampling_key = sampling if not sampling.greedy else replace(sampling, temperature=0.0, seed=None)
    key = context_key(namespace, model_id, flavour, as_jsonable_messages(messages[:-1]), repr(sampling_key), extra)
    return SemanticPlan(tenant, threshold, key, query)


@dataclass(frozen=True)
class SemanticOutcome:
    """What the semantic cache did for one opted-in request: status hit | miss | refused | bypass | error."""

    plan: SemanticPlan
    status: str
    similarity: float | None = None
    guard: str | None = None
    response: StoredResponse | None = None
    embedding: np.ndarray | None = None

    @property
    def hit(self) -> bool:
        return self.status == "hit"

    def header(self) -> str:
        if self.status == "refused":
            return f"refused:{self.guard}"
        if self.status == "bypass":
            return f"bypass:{self.plan.bypass}"
        return self.status

    def headers(self) -> dict[str, str]:
        return {HEADER: self.header()}

    def usage(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"hit": self.hit,
                               "similarity": None if self.similarity is None else round(self.similarity, 4)}
        if self.status == "refused":
            doc["guard"] = self.guard
        elif self.status == "bypass":
            doc["bypass"] = self.plan.bypass
        elif self.status == "error":
            doc["error"] = True
        return doc


def with_label(usage_doc: dict[str, Any], outcome: SemanticOutcome | None) -> dict[str, Any]:
    """A usage object with the `semantic_cache` extension added (unchanged when the request did not opt in)."""
    if outcome is not None:
        usage_doc["semantic_cache"] = outcome.usage()
    return usage_doc


class SemanticCache:
    """The server's semantic cache: the embedder (loaded on first use, on a worker thread), the index, and the
    metrics. `embedder_factory`: () -> an object with embed(texts) -> (n, d) unit rows (tests pass a fake)."""

    def __init__(self, index: SemanticIndex, record: Callable[[str, str, str | None], None],
                 embedder_factory: Callable[[], Any] | None = None) -> None:
        self.index = index
        self._record = record  # (tenant, status, guard) -> metrics
        if embedder_factory is None:
            from promptstash.semantic.embedding import load_embedder

            embedder_factory = load_embedder
        self._embedder_factory = embedder_factory

    def _lookup_blocking(self, plan: SemanticPlan) -> tuple[Lookup, np.ndarray]:
        assert plan.key is not None and plan.query is not None
        embedding = self._embedder_factory().embed([plan.query])[0]
        return self.index.lookup(plan.key, plan.query, embedding, plan.threshold), embedding

    async def lookup(self, plan: SemanticPlan) -> SemanticOutcome:
        """Look the request up (off the event loop). Never raises: a failure is status "error"."""
        if plan.key is None:
            outcome = SemanticOutcome(plan, "bypass")
        else:
            try:
                found, embedding = await asyncio.to_thread(self._lookup_blocking, plan)
                outcome = SemanticOutcome(plan, found.status, found.similarity, found.guard, found.response,
                                          embedding)
            except Exception as exc:
                log.warning("semantic-cache lookup failed (%s: %s); running the model", type(exc).__name__, exc)
                outcome = SemanticOutcome(plan, "error")
        try:
            self._record(plan.tenant, outcome.status, outcome.guard)
        except Exception:  # metrics must never fail a request
            log.exception("semantic-cache metrics")
        return outcome

    def store(self, outcome: SemanticOutcome | None, completion: Completion) -> None:
        """Remember the model's answer to a request that missed (or was refused). Only whole, successful answers."""
        if outcome is None or outcome.hit or outcome.embedding is None or outcome.plan.key is None:
            return
        if completion.finish_reason not in ("stop", "length") or len(completion.samples) != 1:
            return
        try:
            response = StoredResponse(completion.text, tuple(completion.token_ids), completion.finish_reason,
                                      completion.stop_sequence, completion.usage.completion_tokens)
            assert outcome.plan.query is not None
            self.index.add(outcome.plan.key, outcome.plan.query, outcome.embedding, response)
        except Exception as exc:
            log.warning("semantic-cache store failed (%s: %s)", type(exc).__name__, exc)


def hit_completion(outcome: SemanticOutcome, request_id: str, token_ids: Sequence[int], namespace: str,
                   tenant: str) -> Completion:
    """The Completion a hit replays: the stored answer, every prompt token counted as cached, no time taken."""
    response = outcome.response
    assert response is not None
    n = len(token_ids)
    return Completion(request_id=request_id, text=response.text, token_ids=response.token_ids,
                      finish_reason=response.finish_reason, usage=Usage(n, n, response.completion_tokens),
                      timings=Timings(0.0, 0.0), stop_sequence=response.stop_sequence,
                      prompt_token_ids=tuple(token_ids), namespace=namespace, tenant=tenant)


class ReplaySubmission:
    """A finished "submission" replaying a Completion, so that the routes' streaming and non-streaming code paths
    serve a hit unchanged: one update with all the text, then the completion."""

    def __init__(self, completion: Completion) -> None:
        self._completion = completion
        self.request_id = completion.request_id
        self.finished = False
        self._update = RequestUpdate(completion.request_id, completion.token_ids, completion.text, True,
                                     completion.finish_reason, completion.usage, completion,
                                     sample_finish_reason=completion.finish_reason)

    async def updates(self) -> AsyncIterator[RequestUpdate]:
        if not self.finished:
            self.finished = True
            yield self._update

    async def next_update(self, timeout: float) -> RequestUpdate | None:
        if self.finished:
            return None
        self.finished = True
        return self._update

    def usage(self) -> Usage:
        return self._completion.usage

    async def completion(self) -> Completion:
        self.finished = True
        return self._completion

    def abort_soon(self) -> None:
        pass

    async def abort(self) -> None:
        pass
