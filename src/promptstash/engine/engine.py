"""The engine: one step = schedule, run the model, sample, update requests.

Public contract (see ARCHITECTURE.md): `Engine.from_pretrained(model=None, **options)` and
`engine.generate(prompt, **sampling) -> Completion`, where prompt is a string, token ids or chat messages.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from promptstash.cache.manager import CacheManager, CacheStats
from promptstash.config import DTYPES, EngineConfig
from promptstash.engine.kv_store import KVStore
from promptstash.engine.request import Request, RequestStatus, RequestUpdate, StopChecker
from promptstash.engine.runner import ModelRunner
from promptstash.engine.sampling import SamplingParams, make_generator, sample
from promptstash.engine.scheduler import Scheduler
from promptstash.errors import ContextLengthError, InvalidRequestError
from promptstash.models.config import ModelConfig
from promptstash.models.llama import KVCache, LlamaModel

Prompt = str | Sequence[int] | Sequence[dict[str, Any]]
DEFAULT_NAMESPACE = "default"
END_OF_TEXT_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose K/V came from the cache
    completion_tokens: int
    # prompt tokens computed by this request and protected under a TTL class (its cache breakpoints)
    cache_write_tokens: dict[str, int] = field(default_factory=dict)
    cache_write_refused: bool = False  # breakpoints were asked for but protection would exceed the cap

    @property
    def num_cache_write_tokens(self) -> int:
        return sum(self.cache_write_tokens.values())


@dataclass(frozen=True)
class Timings:
    ttft_s: float  # arrival -> first output token (or end of prefill when max_tokens == 0)
    total_s: float  # arrival -> finished


@dataclass(frozen=True)
class Completion:
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    usage: Usage
    timings: Timings
    stop_sequence: str | None = None  # the stop string that ended generation, if one did
    prompt_token_ids: tuple[int, ...] = ()
    namespace: str = DEFAULT_NAMESPACE


@dataclass(frozen=True)
class PromptLogits:
    """Logits of every prompt position that was computed (not served from the cache)."""

    logits: torch.Tensor  # [prompt_len - num_cached_tokens, V] float32; row i predicts token num_cached + i + 1
    num_cached_tokens: int


@dataclass(frozen=True)
class EngineStats:
    num_prompt_tokens: int  # prompt tokens of admitted requests
    num_cached_tokens: int  # of those, served from the cache
    num_computed_prompt_tokens: int  # prompt tokens actually run through the model (incl. recomputation)
    num_generated_tokens: int
    num_steps: int
    num_preemptions: int
    cache: CacheStats

    @property
    def hit_rate(self) -> float:
        return self.num_cached_tokens / self.num_prompt_tokens if self.num_prompt_tokens else 0.0


class _NoTextDecoder:
    def push(self, token_id: int) -> str:
        return ""


class Engine:
    """Thread-safe: add_request / abort / step may be called from different threads."""

    def __init__(self, model: LlamaModel, tokenizer: Any | None, config: EngineConfig, model_id: str,
                 model_path: Path | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        """clock: the cache's time source for TTL protection (tests pass a fake one)."""
        self.model = model
        self.model_path = model_path
        self.tokenizer = tokenizer
        self.config = config
        self.model_id = model_id
        mcfg: ModelConfig = model.config
        block_size = config.block_size
        num_blocks = config.pool_blocks
        self.kv = KVCache(mcfg, num_blocks, block_size, model.dtype, model.device)
        kv_layout = f"bs{block_size}/{str(model.dtype).removeprefix('torch.')}"
        self.kv_store = self._make_store(model_id, kv_layout) if config.enable_prefix_caching else None
        self.cache = CacheManager(num_blocks, block_size, model_id, kv_layout, config.enable_prefix_caching,
                                  clock=clock, max_protected_blocks=int(num_blocks * config.max_protected_fraction),
                                  store=self.kv_store)
        self.scheduler = Scheduler(self.cache, config.max_num_seqs, config.max_prefill_tokens)
        self.runner = ModelRunner(model, self.kv)
        self.max_model_len = min(config.max_model_len or mcfg.max_position_embeddings, mcfg.max_position_embeddings)
        self.eos_token_ids = frozenset(getattr(tokenizer, "eos_token_ids", ()) or ()) | frozenset(mcfg.eos_token_ids)
        if tokenizer is not None:  # end-of-text markers that some converted checkpoints leave out of eos_token_id
            marks = (tokenizer.token_to_id(t) for t in END_OF_TEXT_TOKENS)
            self.eos_token_ids |= {i for i in marks if i is not None}
        self._requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._num_computed_prompt_tokens = 0
        self._num_generated_tokens = 0
        self._num_steps = 0

    def _make_store(self, model_id: str, kv_layout: str) -> KVStore | None:
        from promptstash.cache.tiers.chain import TierChain

        config = self.config
        tiers = []
        if config.kv_disk_dir:
            from promptstash.cache.tiers.disk import DiskTier

            tiers.append(DiskTier(config.kv_disk_dir, config.kv_disk_bytes))
        if config.redis_url:
            from promptstash.cache.tiers.redis_tier import RedisTier

            tiers.append(RedisTier(config.redis_url, default_ttl_s=config.redis_ttl_s))
        if not tiers:
            return None
        storage = None if config.kv_storage_dtype == "auto" else DTYPES[config.kv_storage_dtype]
        return KVStore(self.kv, TierChain(tiers), model_id, kv_layout, storage)

    def close(self, flush_timeout_s: float = 30.0) -> None:
        """Flush pending tier writes (bounded by flush_timeout_s) and close the tiers."""
        if self.kv_store is not None:
            self.kv_store.close(flush_timeout_s)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str | None = None, **options: Any) -> Engine:
        """Load a HF directory, a .gguf file, or (model=None) the default model; options: EngineConfig fields."""
        from promptstash.models.loader import load_state_dict, resolve_model
        from promptstash.models.tokenizer import Tokenizer

        config = EngineConfig.from_options(model, **options)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        resolved = resolve_model(config.model, cache_dir=config.cache_dir, progress=config.progress)
        model_config = ModelConfig.from_dir(resolved.path)
        weights = load_state_dict(resolved.path, config.torch_dtype, config.torch_device, progress=config.progress)
        llama = LlamaModel(model_config, weights, config.torch_dtype, config.torch_device)
        del weights
        return cls(llama, Tokenizer.from_dir(resolved.path), config, resolved.model_id, resolved.path)

    # -- requests --------------------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: a string (raw text), token ids, or chat messages (chat template)."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            return self._require_tokenizer().encode(prompt, add_special_tokens=True)
        items = list(prompt)
        if not items:
            raise InvalidRequestError("prompt is empty")
        if all(isinstance(t, dict) for t in items):
            text = self._require_tokenizer().apply_chat_template(items, add_generation_prompt=True)
            return self._require_tokenizer().encode(text, add_special_tokens=False)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
            vocab = self.model.config.vocab_size
            bad = [t for t in items if not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
            return items
        raise InvalidRequestError("prompt must be a string, a list of token ids or a list of chat messages")

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise InvalidRequestError("this engine has no tokenizer: pass token ids")
        return self.tokenizer

    def add_request(self, prompt: Prompt, sampling: SamplingParams | None = None, *,
                    namespace: str = DEFAULT_NAMESPACE, request_id: str | None = None,
                    on_update: Callable[[RequestUpdate], None] | None = None,
                    want_prompt_logits: bool = False,
                    cache_breakpoints: Sequence[tuple[int, str]] = ()) -> str:
        """Queue a request; returns its id. Raises InvalidRequestError / ContextLengthError up front.

        cache_breakpoints: (prefix_len, ttl_class) pairs; once the prompt is computed, the full blocks of
        each prefix are protected from eviction for that TTL class (see CacheManager.protect).
        """
        sampling = sampling or SamplingParams()
        token_ids = self.tokenize(prompt)
        prompt_len = len(token_ids)
        if prompt_len > self.max_model_len:
            raise ContextLengthError(
                f"prompt has {prompt_len} tokens; the context window is {self.max_model_len} tokens"
            )
        if prompt_len + sampling.max_tokens > self.max_model_len:
            raise ContextLengthError(
                f"prompt ({prompt_len} tokens) + max_tokens ({sampling.max_tokens}) = "
                f"{prompt_len + sampling.max_tokens} tokens exceeds the context window of {self.max_model_len} tokens"
            )
        pool_tokens = self.cache.pool.num_blocks * self.cache.block_size
        if prompt_len + sampling.max_tokens > pool_tokens:
            raise ContextLengthError(
                f"prompt ({prompt_len} tokens) + max_tokens ({sampling.max_tokens}) needs more KV than the "
                f"pool holds ({pool_tokens} tokens); raise kv_cache_tokens"
            )
        decoder = self.tokenizer.incremental_decoder() if self.tokenizer is not None else _NoTextDecoder()
        with self._lock:
            rid = request_id or f"req-{next(self._ids)}"
            if rid in self._requests:
                raise InvalidRequestError(f"request id {rid!r} is already in use")
            request = Request(
                request_id=rid, prompt_token_ids=token_ids, sampling=sampling, namespace=namespace,
                stop_checker=StopChecker(decoder, sampling.stop),
                eos_token_ids=frozenset() if sampling.ignore_eos else self.eos_token_ids,
                generator=make_generator(sampling.seed, self.model.device),
                on_update=on_update, want_prompt_logits=want_prompt_logits,
                cache_breakpoints=tuple((min(n, prompt_len), c) for n, c in cache_breakpoints),
            )
            self._requests[rid] = request
            self.scheduler.add(request)
        return rid

    def abort(self, request_id: str) -> None:
        """Stop a request now and release its blocks (no-op if it already finished)."""
        with self._lock:
            request = self._requests.get(request_id)
            if request is not None and not request.finished:
                self._finish(request, "abort")

    def has_unfinished(self) -> bool:
        with self._lock:
            return self.scheduler.has_unfinished()

    # -- the step --------------------------------------------------------------------------------
    def step(self) -> list[RequestUpdate]:
        """Run one scheduling step; returns an update for every request that produced output or finished."""
        with self._lock:
            chunks = self.scheduler.schedule()
            if not chunks:
                return []
            tables = [list(self.cache.block_table(c.request.request_id)) for c in chunks]
            try:
                out = self.runner.run(chunks, tables)
            except Exception:
                for chunk in chunks:  # keep the engine usable: the step's requests fail, nothing leaks
                    self._finish(chunk.request, "error")
                raise
            self._num_steps += 1
            updates: list[RequestUpdate] = []
            now = time.perf_counter()
            for chunk, rows in zip(chunks, out.rows, strict=True):
                request = chunk.request
                if request.status is not RequestStatus.RUNNING:
                    continue
                self._num_computed_prompt_tokens += max(0, min(chunk.end, request.prompt_len) - chunk.start)
                request.num_computed = chunk.end
                self.cache.commit(request.request_id, request.token_ids, chunk.end)
                if request.cache_breakpoints and request.cache_write is None and chunk.end >= request.prompt_len:
                    request.cache_write = self.cache.protect(request.request_id, request.cache_breakpoints)
                if request.want_prompt_logits:
                    request.prompt_logits.append(out.logits[rows])
                if chunk.end < len(request.token_ids):
                    continue
                update = self._advance(request, out.logits[rows.stop - 1], now)
                if update is not None:
                    updates.append(update)
            return updates

    def _advance(self, request: Request, logits: torch.Tensor, now: float) -> RequestUpdate | None:
        """Sample the next token of a request whose tokens are all computed."""
        params = request.sampling
        if request.num_output_tokens >= params.max_tokens:  # max_tokens == 0: prefill only
            request.first_token_time = request.first_token_time or now
            return self._finish(request, "length")
        token = sample(logits, params, request.generator)
        request.token_ids.append(token)
        self._num_generated_tokens += 1
        if request.first_token_time is None:
            request.first_token_time = now
        reason = None
        if token in request.eos_token_ids or token in params.stop_token_ids:
            reason = "stop"
        elif request.stop_checker.push(token):
            reason = "stop"
        elif request.num_output_tokens >= params.max_tokens or len(request.token_ids) >= self.max_model_len:
            reason = "length"
        if reason is not None:
            return self._finish(request, reason, new_token=token)
        update = RequestUpdate(request.request_id, (token,), request.stop_checker.take(final=False), False, None)
        if request.on_update is not None:
            request.on_update(update)
        return update

    def _finish(self, request: Request, reason: str, new_token: int | None = None) -> RequestUpdate:
        self.scheduler.finish(request)
        request.finish_reason = reason
        request.finish_time = time.perf_counter()
        new_tokens = () if new_token is None else (new_token,)
        request.stop_checker.flush()
        update = RequestUpdate(request.request_id, new_tokens, request.stop_checker.take(final=True), True, reason)
        if request.on_update is not None:
            request.on_update(update)
        return update

    # -- results ---------------------------------------------------------------------------------
    def completion(self, request_id: str) -> Completion:
        """The result of a finished request (forgets the request)."""
        with self._lock:
            request = self._requests[request_id]
            if not request.finished:
                raise InvalidRequestError(f"request {request_id!r} has not finished")
            del self._requests[request_id]
        end = request.finish_time or time.perf_counter()
        first = request.first_token_time or end
        return Completion(
            request_id=request_id,
            text=request.stop_checker.text,
            token_ids=tuple(request.output_token_ids),
            finish_reason=request.finish_reason or "abort",
            usage=self._usage(request),
            timings=Timings(ttft_s=first - request.arrival_time, total_s=end - request.arrival_time),
            stop_sequence=request.stop_checker.matched,
            prompt_token_ids=tuple(request.prompt_token_ids),
            namespace=request.namespace,
        )

    def usage(self, request_id: str) -> Usage:
        """Usage of a request so far (cached tokens are known once it is admitted)."""
        with self._lock:
            return self._usage(self._requests[request_id])

    def num_unfinished(self) -> int:
        with self._lock:
            return sum(1 for r in self._requests.values() if not r.finished)

    def _usage(self, request: Request) -> Usage:
        num_cached = max(request.num_cached_tokens, 0)
        written: dict[str, int] = {}
        write = request.cache_write
        if write is not None:
            bs = self.cache.block_size
            for j, ttl_class in enumerate(write.block_classes):
                if j * bs >= num_cached:  # computed here, not read
                    written[ttl_class] = written.get(ttl_class, 0) + bs
        return Usage(request.prompt_len, num_cached, request.num_output_tokens, written,
                     write is not None and write.refused)

    def run_until_done(self, request_ids: Sequence[str]) -> list[Completion]:
        pending = set(request_ids)
        while pending:
            self.step()
            with self._lock:
                pending = {r for r in pending if not self._requests[r].finished}
        return [self.completion(r) for r in request_ids]

    def generate(self, prompt: Prompt, *, namespace: str = DEFAULT_NAMESPACE,
                 on_update: Callable[[RequestUpdate], None] | None = None, **sampling: Any) -> Completion:
        """Generate for one prompt; `on_update` receives each streamed piece. sampling: SamplingParams fields."""
        rid = self.add_request(prompt, _sampling(sampling), namespace=namespace, on_update=on_update)
        return self.run_until_done([rid])[0]

    def generate_many(self, prompts: Sequence[Prompt], *, namespace: str = DEFAULT_NAMESPACE,
                      **sampling: Any) -> list[Completion]:
        """Submit all prompts together (continuous batching) and return their completions in order."""
        params = _sampling(sampling)
        ids = [self.add_request(p, params, namespace=namespace) for p in prompts]
        return self.run_until_done(ids)

    def stream(self, prompt: Prompt, *, namespace: str = DEFAULT_NAMESPACE, **sampling: Any) -> Iterator[RequestUpdate]:
        """Yield updates as tokens are generated; the last one has finished=True. Closing the iterator aborts."""
        rid = self.add_request(prompt, _sampling(sampling), namespace=namespace)
        try:
            while True:
                for update in self.step():
                    if update.request_id == rid:
                        yield update
                        if update.finished:
                            return
        finally:
            self.abort(rid)
            with self._lock:
                self._requests.pop(rid, None)

    def prompt_logits(self, prompt: Prompt, *, namespace: str = DEFAULT_NAMESPACE) -> PromptLogits:
        """Prefill a prompt (reusing the cache) and return the logits of every computed position."""
        rid = self.add_request(prompt, SamplingParams(max_tokens=0), namespace=namespace, want_prompt_logits=True)
        with self._lock:
            request = self._requests[rid]
        self.run_until_done([rid])
        return PromptLogits(torch.cat(request.prompt_logits), max(request.num_cached_tokens, 0))

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                num_prompt_tokens=self.scheduler.num_query_tokens,
                num_cached_tokens=self.scheduler.num_hit_tokens,
                num_computed_prompt_tokens=self._num_computed_prompt_tokens,
                num_generated_tokens=self._num_generated_tokens,
                num_steps=self._num_steps,
                num_preemptions=self.scheduler.num_preemptions,
                cache=self.cache.stats(),
            )

    def locate_prefix(self, token_ids: Sequence[int], namespace: str = DEFAULT_NAMESPACE) -> tuple[str | None,
                                                                                                  str | None]:
        """Where a prefix's blocks are now ("pool", "tier" or None) and its TTL class, if protected."""
        with self._lock:
            return self.cache.locate(token_ids, namespace)

    def check_integrity(self) -> None:
        with self._lock:
            self.cache.check_integrity()


def _sampling(options: dict[str, Any]) -> SamplingParams:
    stop = options.get("stop")
    if isinstance(stop, str):
        options = {**options, "stop": (stop,)}
    elif stop is not None:
        options = {**options, "stop": tuple(stop)}
    if options.get("stop_token_ids") is not None:
        options = {**options, "stop_token_ids": tuple(options["stop_token_ids"])}
    try:
        return SamplingParams(**options)
    except TypeError as exc:
        raise InvalidRequestError(f"unknown sampling option: {exc}") from None
