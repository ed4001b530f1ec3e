"""The engine: one step = schedule, run the model, post-process (commit, protect, sample, stop).

Public contract (see ARCHITECTURE.md): `Engine.from_pretrained(model=None, **options)` and
`engine.generate(prompt, **sampling) -> Completion`, where prompt is a string, token ids or chat messages.

A request's life, and who moves it:

    add_request ──> LOADING ──(loader thread: tier reads, off the lock)──> WAITING ──schedule──> RUNNING
                    (only with tiers)                                          ^── preempt ──┘      │
    abort, finish, or an error in its step ─────────────────────────────────────────> FINISHED <──┘

NOTE: the engine counts a request as unfinished from add_request until it finishes, whatever its caller
does; a finished request is forgotten at once, and its Completion goes to its last update (and, unless
the request was added with detach=True, to completion()).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import replace as _replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from promptstash.cache.eviction import EvictionConfig
from promptstash.cache.manager import CacheManager, CacheStats, LoadPlan
from promptstash.cache.modules import ModuleRegistry, ModuleRepair, ModuleSpan, RegisteredModule
from promptstash.cache.tiers.base import TierStats
from promptstash.cache.tiers.store import KVStore, lower_thread_priority
from promptstash.config import DTYPES, EngineConfig
from promptstash.engine.assembly import Fill, ModuleWork
from promptstash.engine.grammar import CompiledGrammar, GrammarSpec, compile_grammar
from promptstash.engine.request import Request, RequestStatus, SampleGroup, StopChecker
from promptstash.engine.results import DEFAULT_NAMESPACE, Completion, RequestUpdate, Timings, TokenLogprob, Usage
from promptstash.engine.runner import ModelRunner, StepLogits
from promptstash.engine.sampling import SamplingParams, make_generator, sample
from promptstash.engine.scheduler import ScheduledChunk, Scheduler
from promptstash.errors import ContextLengthError, InvalidRequestError
from promptstash.models.config import ModelConfig
from promptstash.models.llama import KVCache, LlamaModel
from promptstash.prompts import ChatMessage, RenderedPrompt, chat_messages, render
from promptstash.tools import ToolDef

__all__ = ["DEFAULT_NAMESPACE", "Completion", "Engine", "EngineStats", "ModuleRepair", "ModuleSpan", "ModuleStats",
           "Prompt", "PromptLogits", "RegisteredModule", "RequestUpdate", "StepResult", "Timings", "Usage"]

log = logging.getLogger("promptstash.engine")
Prompt = str | Sequence[int] | Sequence[dict[str, Any]]
LOADER_THREADS = 4
END_OF_TEXT_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>")


@dataclass(frozen=True)
class PromptLogits:
    """Logits of every prompt position that was computed (not served from the cache)."""

    logits: torch.Tensor  # [rows, V] float32; row i predicts token positions[i] + 1
    num_cached_tokens: int
    positions: torch.Tensor | None = None  # [rows] long: without modules, num_cached .. prompt_len - 1
    usage: Usage | None = None


@dataclass(frozen=True)
class ModuleStats:
    """Module (position-independent) reuse since start, and what the pool holds now."""

    num_lookups: int = 0  # module spans looked up in the cache
    num_hits: int = 0  # of those, found (in the pool, or loaded from a tier)
    num_tier_hits: int = 0  # of the hits, loaded from a tier
    num_reused_tokens: int = 0  # module tokens reused and not recomputed
    num_recomputed_tokens: int = 0  # module tokens reused but recomputed by repair
    num_stored: int = 0  # modules computed in isolation and stored
    num_cached: int = 0  # distinct modules whose blocks are all in the pool now
    num_blocks: int = 0  # pool blocks held by modules now
    num_bytes: int = 0  # K/V bytes of those blocks
    num_registered: int = 0  # modules in the registry (/v1/modules), all tenants

    @property
    def hit_rate(self) -> float:
        return self.num_hits / self.num_lookups if self.num_lookups else 0.0


@dataclass(frozen=True)
class EngineStats:
    """Every figure of the engine, its cache and its tiers (what metrics and the dashboard show)."""

    num_prompt_tokens: int  # prompt tokens of admitted requests
    num_cached_tokens: int  # of those, served from the cache
    num_computed_prompt_tokens: int  # prompt tokens actually run through the model (incl. recomputation)
    num_generated_tokens: int
    num_steps: int
    num_preemptions: int
    cache: CacheStats
    num_waiting: int = 0  # requests now queued for the scheduler
    num_loading: int = 0  # requests now waiting for their prefix to load from the tiers
    num_running: int = 0  # requests now being computed
    num_errors: int = 0  # requests finished with an error (a failed step, sampling or post-processing)
    tiers: tuple[TierStats, ...] = ()  # per tier, in lookup order (disk, then Redis)
    num_dropped_tier_writes: int = 0  # tier writes dropped because the write queue was full
    modules: ModuleStats = ModuleStats()

    @property
    def hit_rate(self) -> float:
        return self.num_cached_tokens / self.num_prompt_tokens if self.num_prompt_tokens else 0.0

    @property
    def num_unfinished(self) -> int:
        return self.num_waiting + self.num_loading + self.num_running


@dataclass(frozen=True)
class StepResult:
    updates: tuple[RequestUpdate, ...]
    num_scheduled: int  # chunks computed; 0 = nothing could run (the caller may wait for work)


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
        activations = str(model.dtype).removeprefix("torch.")
        kv_layout = f"bs{block_size}/{activations}"
        # NOTE: other weights, other K/V: the layout (so every block hash) names the weight format, e.g.
        # bs16/bfloat16/int4, so int4 and bfloat16 weights never share blocks through a disk or Redis tier.
        # Float weights are held in the activations' dtype, which the layout names already.
        if model.weight_format != activations:
            kv_layout += f"/{model.weight_format}"
        self.kv_store = self._make_store(model_id, kv_layout) if config.enable_prefix_caching else None
        self.cache = CacheManager(num_blocks, block_size, model_id, kv_layout, config.enable_prefix_caching,
                                  clock=clock, max_protected_blocks=int(num_blocks * config.max_protected_fraction),
                                  store=self.kv_store,
                                  eviction=EvictionConfig(config.eviction, ttft_slo_s=config.ttft_slo_ms / 1000))
        self.scheduler = Scheduler(self.cache, config.max_num_seqs, config.max_prefill_tokens,
                                   config.tenant_max_running, schedule=config.schedule,
                                   max_wait_s=config.max_wait_ms / 1000)
        self._prefill_rate: float | None = None  # measured prefill tokens/s (moving average), for tlru
        self.runner = ModelRunner(model, self.kv)
        self.max_model_len = min(config.max_model_len or mcfg.max_position_embeddings, mcfg.max_position_embeddings)
        self.eos_token_ids = frozenset(getattr(tokenizer, "eos_token_ids", ()) or ()) | frozenset(mcfg.eos_token_ids)
        if tokenizer is not None:  # end-of-text markers that some converted checkpoints leave out of eos_token_id
            marks = (tokenizer.token_to_id(t) for t in END_OF_TEXT_TOKENS)
            self.eos_token_ids |= {i for i in marks if i is not None}
        self.modules = ModuleRegistry()
        self.default_module_repair = ModuleRepair.parse(config.module_repair)
        self._requests: dict[str, Request] = {}  # unfinished requests
        self._results: dict[str, Completion] = {}  # finished, not detached, completion() not yet taken
        self._groups: dict[str, SampleGroup] = {}  # unfinished requests with n > 1, by request id
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._wake = threading.Event()  # set when there may be new work for step()
        # NOTE: written under the lock, read without it (a plain int / dict read is atomic), so that the
        # server's event loop can read them while a step holds the lock.
        self._num_unfinished = 0
        self._unfinished_by_tenant: Counter[str] = Counter()
        self._num_loading = 0
        self._num_computed_prompt_tokens = 0
        self._num_generated_tokens = 0
        self._num_steps = 0
        self._num_errors = 0
        self._module_counts: Counter[str] = Counter()
        # NOTE: several loaders, so that a slow load does not hold up requests arriving behind it; two loads
        # of the same blocks are harmless (finish_load keeps the first published copy).
        self._loader = (ThreadPoolExecutor(max_workers=LOADER_THREADS, thread_name_prefix="promptstash-tier-loader",
                                           initializer=lower_thread_priority) if self.kv_store is not None else None)

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

    def flush_tiers(self, timeout_s: float = 30.0) -> bool:
        """Wait until queued tier writes are done (True if in time, or there are no tiers)."""
        return self.kv_store.flush(timeout_s) if self.kv_store is not None else True

    def close(self, flush_timeout_s: float = 30.0) -> None:
        """Stop loading, flush pending tier writes (bounded by flush_timeout_s) and close the tiers."""
        if self._loader is not None:
            self._loader.shutdown(wait=True, cancel_futures=True)
        if self.kv_store is not None:
            self.kv_store.close(flush_timeout_s)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str | None = None, **options: Any) -> Engine:
        """Load a HF directory, a .gguf file, or (model=None) the default model; options: EngineConfig fields."""
        from promptstash.models.gguf import release_free_memory
        from promptstash.models.loader import load_weights, resolve_model
        from promptstash.models.quant import QUANTIZED_FORMATS, auto_format, check_format, choose_dense_min_rows
        from promptstash.models.tokenizer import Tokenizer

        config = EngineConfig.from_options(model, **options)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        device, dtype = config.torch_device, config.torch_dtype
        weight_format = config.fixed_weights
        if weight_format is not None:
            check_format(weight_format, device)  # before the (slow) load
        resolved = resolve_model(config.model, cache_dir=config.cache_dir, progress=config.progress)
        model_config = ModelConfig.from_dir(resolved.path)
        shape = (model_config.hidden_size, 2 * model_config.intermediate_size)  # the biggest per-layer product
        if weight_format is None:
            weight_format = auto_format(dtype, device, *shape)
        dense_min_rows = 0
        if weight_format in QUANTIZED_FORMATS:
            dense_min_rows = 1 << 62 if config.batch_invariant else choose_dense_min_rows(*shape, dtype, device)
        weights = load_weights(resolved.path, weight_format, dtype, device, model_config.num_heads,
                               model_config.num_kv_heads, progress=config.progress)
        llama = LlamaModel(model_config, weights, dtype, device, weight_format, dense_min_rows)
        llama.batch_invariant = config.batch_invariant
        del weights
        release_free_memory()
        return cls(llama, Tokenizer.from_dir(resolved.path), config, resolved.model_id, resolved.path)

    # -- requests --------------------------------------------------------------------------------
    @cached_property
    def max_prompt_chars(self) -> int:
        """Characters beyond which a text prompt cannot fit the context window, whatever its tokens.

        NOTE: no token covers more characters than the longest token of the vocabulary, so a text of more
        than max_model_len * that many characters has more than max_model_len tokens. Checking this before
        tokenizing bounds the work a hostile 30 MB prompt can cause.
        """
        longest = self.tokenizer.max_token_chars if self.tokenizer is not None else 1
        return self.max_model_len * max(1, longest)

    def check_prompt_chars(self, num_chars: int) -> None:
        """Raise ContextLengthError if a text of num_chars characters cannot fit the context window."""
        if num_chars > self.max_prompt_chars:
            raise ContextLengthError(
                f"prompt has {num_chars:,} characters; no text over {self.max_prompt_chars:,} characters fits "
                f"the context window of {self.max_model_len} tokens")

    def tokenize(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: a string (raw text), token ids, or chat messages (chat template)."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            self.check_prompt_chars(len(prompt))
            return self._require_tokenizer().encode(prompt, add_special_tokens=True)
        items = list(prompt)
        if not items:
            raise InvalidRequestError("prompt is empty")
        if all(isinstance(t, dict) for t in items):
            self.check_prompt_chars(sum(_text_chars(m.get("content")) for m in items))
            text = self._require_tokenizer().apply_chat_template(items, add_generation_prompt=True)
            return self._require_tokenizer().encode(text, add_special_tokens=False)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
            vocab = self.model.config.vocab_size
            bad = [t for t in items if not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
            return items
        raise InvalidRequestError("prompt must be a string, a list of token ids or a list of chat messages")

    def render(self, messages: Sequence[dict[str, Any]] | Sequence[ChatMessage], namespace: str = DEFAULT_NAMESPACE,
               *, tools: Sequence[ToolDef] = (), continue_final: bool = False) -> RenderedPrompt:
        """Chat messages -> token ids, cache breakpoints and module spans. Messages are ChatMessages or
        OpenAI-style dicts whose content parts may be `{"type": "text", "text": ..., "module": true}` or
        `{"type": "module", "id": ...}` (a module registered in `namespace`). tools / continue_final: see
        prompts.render."""
        items = list(messages)
        if not items:
            raise InvalidRequestError("prompt is empty")
        msgs = items if all(isinstance(m, ChatMessage) for m in items) else chat_messages(items)
        self.check_prompt_chars(sum(len(b.text) for m in msgs for b in m.blocks))
        return render(self._require_tokenizer(), msgs, lambda module_id: self._resolve_module(namespace, module_id),
                      tools=tools, continue_final=continue_final)

    def compile_grammar(self, spec: GrammarSpec) -> CompiledGrammar:
        """The compiled grammar of a spec (cached by spec.key); InvalidRequestError if it cannot be compiled.
        Compiling may take a while: callers on an event loop run it on a worker thread first, so that
        add_request finds it in the cache."""
        return compile_grammar(spec, self._require_tokenizer(), self.model.config.vocab_size)

    def _resolve_module(self, namespace: str, module_id: str) -> RegisteredModule:
        module = self.modules.get(namespace, module_id)
        if module is None:
            raise InvalidRequestError(f"unknown module id {module_id!r} (register it with POST /v1/modules or "
                                      "Engine.register_module; modules expire after their TTL)")
        return module

    def prepare_module(self, text: str, *, namespace: str = DEFAULT_NAMESPACE, module_id: str | None = None,
                       ttl: str = "5m") -> tuple[RegisteredModule, list[int], tuple[ModuleSpan, ...]]:
        """Tokenize and register a module; returns it, and the prompt and module span that precompute it:
        add_request(token_ids, SamplingParams(max_tokens=0), modules=spans, module_repair="none")."""
        if not isinstance(text, str) or not text:
            raise InvalidRequestError("a module's text must be a non-empty string")
        if module_id is not None:
            ModuleRegistry.check_id(module_id)
        self.check_prompt_chars(len(text))
        token_ids = self._require_tokenizer().encode(text, add_special_tokens=False)
        self.check_module_len(len(token_ids))
        module = self.modules.put(namespace, text, tuple(token_ids), module_id=module_id, ttl_class=ttl)
        return module, token_ids, (ModuleSpan(0, len(token_ids), module.module_id, module.ttl_class),)

    def check_module_len(self, num_tokens: int) -> None:
        """Raise ContextLengthError for a module that cannot fit the context window or the pool."""
        if num_tokens > self.max_model_len:
            raise ContextLengthError(f"module has {num_tokens} tokens; the context window is {self.max_model_len}")
        if 2 * num_tokens > self.cache.num_pool_tokens:
            raise ContextLengthError(f"module has {num_tokens} tokens; computing and storing it needs twice that "
                                     f"in the KV pool, which holds {self.cache.num_pool_tokens} tokens")

    def register_module(self, text: str, *, namespace: str = DEFAULT_NAMESPACE, module_id: str | None = None,
                        ttl: str = "5m") -> RegisteredModule:
        """Precompute a module and register it under an id (Python API; runs the engine until it is stored)."""
        module, token_ids, spans = self.prepare_module(text, namespace=namespace, module_id=module_id, ttl=ttl)
        rid = self.add_request(token_ids, SamplingParams(max_tokens=0), namespace=namespace, modules=spans,
                               module_repair="none")
        completion = self.run_until_done([rid])[0]
        if completion.finish_reason == "error":
            self.modules.delete(namespace, module.module_id)
            raise InvalidRequestError(f"computing the module failed: {completion.error}")
        return module

    def list_modules(self, namespace: str = DEFAULT_NAMESPACE) -> list[RegisteredModule]:
        return self.modules.list(namespace)

    def delete_module(self, module_id: str, namespace: str = DEFAULT_NAMESPACE) -> bool:
        """Forget a registered module (its cached blocks age out of the pool like any others)."""
        return self.modules.delete(namespace, module_id)

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise InvalidRequestError("this engine has no tokenizer: pass token ids")
        return self.tokenizer

    def add_request(self, prompt: Prompt, sampling: SamplingParams | None = None, *,
                    namespace: str = DEFAULT_NAMESPACE, tenant: str | None = None, request_id: str | None = None,
                    on_update: Callable[[RequestUpdate], None] | None = None,
                    want_prompt_logits: bool = False, detach: bool = False,
                    cache_breakpoints: Sequence[tuple[int, str]] = (), modules: Sequence[ModuleSpan] = (),
                    module_repair: str | ModuleRepair | None = None) -> str:
        """Queue a request; returns its id. Raises InvalidRequestError / ContextLengthError up front.

        namespace: the cache namespace (part of every block hash); tenant: who the request counts against
        for fair sharing (default: the namespace). on_update receives every update, on the engine thread;
        it must be quick and must not call back into the engine. detach: the completion goes to the last
        update only, and completion() will not know the request.
        cache_breakpoints: (prefix_len, ttl_class) pairs; once the prompt is computed, the full blocks of
        each prefix are protected from eviction for that TTL class (see CacheManager.protect).
        modules: spans of token ids that are modules (chat messages bring their own, from parts marked
        `"module": true` or `{"type": "module", "id": ...}`); module_repair: what is recomputed where they
        are assembled (default: the engine's `module_repair`); see cache/modules.py.
        """
        sampling = sampling or SamplingParams()
        repair = self.default_module_repair if module_repair is None else ModuleRepair.parse(module_repair)
        items = None if isinstance(prompt, str) else list(prompt)
        if items and all(isinstance(m, dict | ChatMessage) for m in items):
            rendered = self.render(items, namespace)
            token_ids = rendered.token_ids
            modules = tuple(modules) or rendered.modules
        else:
            token_ids = self.tokenize(prompt)
        prompt_len = len(token_ids)
        modules = self._check_modules(tuple(modules), prompt_len, sampling.max_tokens)
        if prompt_len > self.max_model_len:
            raise ContextLengthError(
                f"prompt has {prompt_len} tokens; the context window is {self.max_model_len} tokens"
            )
        if prompt_len + sampling.max_tokens > self.max_model_len:
            raise ContextLengthError(
                f"prompt ({prompt_len} tokens) + max_tokens ({sampling.max_tokens}) = "
                f"{prompt_len + sampling.max_tokens} tokens exceeds the context window of {self.max_model_len} tokens"
            )
        pool_tokens = self.cache.num_pool_tokens
        if prompt_len + sampling.max_tokens > pool_tokens:
            raise ContextLengthError(
                f"prompt ({prompt_len} tokens) + max_tokens ({sampling.max_tokens}) needs more KV than the "
                f"pool holds ({pool_tokens} tokens); raise kv_cache_tokens"
            )
        module_tokens = sum(-(-m.num_tokens // self.cache.block_size) * self.cache.block_size for m in modules)
        if modules and prompt_len + sampling.max_tokens + module_tokens > pool_tokens:
            raise ContextLengthError(
                f"the prompt ({prompt_len} tokens) + max_tokens ({sampling.max_tokens}) + its {len(modules)} modules' "
                f"own blocks ({module_tokens} tokens) need more KV than the pool holds ({pool_tokens} tokens): use "
                "fewer or shorter modules, or raise kv_cache_tokens")
        decoder = self.tokenizer.incremental_decoder() if self.tokenizer is not None else _NoTextDecoder()
        constraint = self.compile_grammar(sampling.grammar).constraint() if sampling.grammar is not None else None
        with self._lock:
            rid = request_id or f"req-{next(self._ids)}"
            if "#" in rid:
                raise InvalidRequestError(f"request id {rid!r} may not contain '#' (it names samples of n > 1)")
            if rid in self._requests or rid in self._results or rid in self._groups:
                raise InvalidRequestError(f"request id {rid!r} is already in use")
            request = Request(
                request_id=rid, prompt_token_ids=token_ids, sampling=sampling, namespace=namespace,
                tenant=namespace if tenant is None else tenant,
                stop_checker=StopChecker(decoder, sampling.stop),
                eos_token_ids=frozenset() if sampling.ignore_eos else self.eos_token_ids,
                generator=make_generator(sampling.seed, self.model.device),
                on_update=on_update, want_prompt_logits=want_prompt_logits, detach=detach,
                cache_breakpoints=tuple((min(n, prompt_len), c) for n, c in cache_breakpoints),
                modules=modules if self.config.enable_prefix_caching else (), module_repair=repair,
                module_hashes=tuple(self.cache.module_hashes(token_ids[m.start:m.end], namespace) for m in modules)
                if self.config.enable_prefix_caching else (),
                constraint=constraint,
            )
            if sampling.n > 1:
                request.group = SampleGroup(rid, sampling.n, live={0: request})
                self._groups[rid] = request.group
            self._requests[rid] = request
            self._num_unfinished += 1
            self._unfinished_by_tenant[request.tenant] += 1
            if self._loader is not None:
                request.status = RequestStatus.LOADING
                self._num_loading += 1
                self._loader.submit(self._load_from_tiers, request)
            else:
                self.scheduler.add(request)
        self._wake.set()
        return rid

    def _check_modules(self, modules: tuple[ModuleSpan, ...], prompt_len: int, max_tokens: int
                       ) -> tuple[ModuleSpan, ...]:
        """Module spans in order, inside the prompt, not overlapping; the last prompt token (whose logits are
        needed) is in no module unless max_tokens == 0."""
        end = 0
        for m in modules:
            if not isinstance(m, ModuleSpan):
                raise InvalidRequestError(f"modules must be ModuleSpans, got {type(m).__name__}")
            if not end <= m.start < m.end <= prompt_len:
                raise InvalidRequestError(f"module span [{m.start}, {m.end}) is empty, overlaps another, is out of "
                                          f"order or lies outside the prompt of {prompt_len} tokens")
            self.check_module_len(m.num_tokens)
            end = m.end
        if modules and max_tokens > 0 and modules[-1].end == prompt_len:
            raise InvalidRequestError("a module may not end the prompt: the last prompt token is computed to "
                                      "sample from it (chat templates always add tokens after the last message)")
        return modules

    def abort(self, request_id: str) -> None:
        """Stop a request now and release its blocks (no-op if it already finished)."""
        with self._lock:
            request = self._requests.get(request_id)
            group = self._groups.get(request_id)
            if group is not None:
                for sample in list(group.live.values()):
                    self._finish(sample, "abort")
            elif request is not None:
                self._finish(request, "abort")

    def has_unfinished(self) -> bool:
        return self._num_unfinished > 0

    def num_unfinished(self, tenant: str | None = None) -> int:
        """Requests added and not yet finished (of one tenant, if given). Lock-free: cheap anywhere."""
        return self._num_unfinished if tenant is None else self._unfinished_by_tenant.get(tenant, 0)

    def _computing(self) -> bool:
        """Requests are being computed now (lock-free; for tier loads to yield to them)."""
        return bool(self.scheduler.running)

    def num_loading(self) -> int:
        """Requests whose prefix is being loaded from the tiers now. Lock-free."""
        return self._num_loading

    def unfinished_ids(self) -> set[str]:
        """Ids of unfinished requests (a request with n > 1 samples is one id)."""
        with self._lock:
            return {rid for rid, r in self._requests.items() if r.index == 0} | set(self._groups)

    def wake(self) -> None:
        """Make a wait_for_work() return now."""
        self._wake.set()

    def wait_for_work(self, timeout_s: float) -> None:
        """Block until a request is added, aborted or loaded (or timeout_s passes). For idle loops."""
        self._wake.wait(timeout_s)
        self._wake.clear()

    # -- loading from the tiers (loader thread) --------------------------------------------------
    def _load_from_tiers(self, request: Request) -> None:
        """Read the tier blocks of a request's prefix into reserved pool blocks, then queue the request.

        Only planning and publishing take the engine lock; existence checks, reads and verification run
        without it, so running requests keep decoding while a long prefix loads.
        """
        assert self.kv_store is not None
        try:
            with self._lock:
                plan = None if request.finished else self.cache.plan_load(request.token_ids, request.namespace)
            if plan is not None:
                num_present = self.kv_store.num_leading(list(plan.hashes[plan.start:]))
                if num_present:
                    self._load_planned(request, plan, num_present)
            if request.module_repair.strategy != "full":
                for hashes in dict.fromkeys(request.module_hashes):  # a module used twice loads once
                    self._load_module(request, hashes)
        except Exception:
            log.exception("loading the prefix of request %s from the tiers failed; it will be computed",
                          request.request_id)
        finally:
            with self._lock:
                self._num_loading -= 1
                if request.status is RequestStatus.LOADING:
                    request.status = RequestStatus.WAITING
                    self.scheduler.add(request)
            self._wake.set()

    def _load_module(self, request: Request, hashes: tuple[bytes, ...]) -> None:
        """Load a module's blocks from the tiers into the pool, if the tiers hold all of them."""
        assert self.kv_store is not None
        with self._lock:
            plan = None if request.finished else self.cache.plan_module_load(hashes)
        if plan is None:
            return
        num_missing = len(plan.hashes) - plan.start
        if self.kv_store.num_leading(list(plan.hashes[plan.start:])) < num_missing:
            return  # part of it is gone: it will be computed
        num_loaded, num_reserved = self._load_planned(request, plan, num_missing, module=True)
        if num_reserved and num_loaded == num_reserved:
            with self._lock:
                self.cache.note_module(hashes)
                self._module_counts["num_tier_hits"] += 1

    def _load_planned(self, request: Request, plan: LoadPlan, num_blocks: int, *, module: bool = False
                      ) -> tuple[int, int]:
        """Reserve pool blocks for the next num_blocks of a plan, read them from the tiers without the lock,
        publish what was read. Returns (blocks read, blocks reserved); (0, 0) if nothing could be reserved."""
        assert self.kv_store is not None
        with self._lock:
            reservation = None if request.finished else self.cache.reserve_load(plan, num_blocks)
        if reservation is None:
            return 0, 0
        num_loaded = 0
        try:
            num_loaded = self.kv_store.load(reservation.items, busy=self._computing)
        finally:
            with self._lock:
                self.cache.finish_load(reservation, num_loaded, module=module)
        return num_loaded, len(reservation.items)

    # -- the step --------------------------------------------------------------------------------
    def step(self) -> list[RequestUpdate]:
        """Run one scheduling step; returns an update for every request that produced output or finished."""
        return list(self.run_step().updates)

    def run_step(self) -> StepResult:
        """One step. A failure finishes the requests it concerns with finish_reason "error"; it never raises
        for a request's sake and never leaves a request RUNNING without a way forward."""
        with self._lock:
            chunks = self.scheduler.schedule()
            if not chunks:
                return StepResult((), 0)
            tables = [list(self.cache.block_table(c.request.request_id)) for c in chunks]
            try:
                for chunk in chunks:
                    if chunk.fills:
                        for fill in chunk.fills:
                            self._fill(chunk.request, fill)
                        self.cache.release_held(chunk.request.request_id)
                started = time.perf_counter()
                out = self.runner.run(chunks, tables)
                self._note_prefill_rate(chunks, time.perf_counter() - started)
            except Exception as exc:  # keep the engine usable: the step's requests fail, nothing leaks
                log.exception("model step failed; finishing its %d requests with an error", len(chunks))
                updates = [self._finish(c.request, "error", error=_describe(exc, "the model step failed"))
                           for c in chunks if not c.request.finished]
                return StepResult(tuple(updates), len(chunks))
            self._num_steps += 1
            updates: list[RequestUpdate] = []
            now = time.perf_counter()
            for i, (chunk, rows) in enumerate(zip(chunks, out.rows, strict=True)):
                request = chunk.request
                if request.status is not RequestStatus.RUNNING:
                    continue
                try:
                    updates.extend(self._post_process(chunk, out, rows, now, out.kept[i]))
                except Exception as exc:
                    log.exception("post-processing request %s failed; finishing it with an error", request.request_id)
                    if not request.finished:
                        updates.append(self._finish(request, "error", error=_describe(exc, "post-processing failed")))
            return StepResult(tuple(updates), len(chunks))

    def _note_prefill_rate(self, chunks: Sequence[ScheduledChunk], elapsed_s: float) -> None:
        """Feed the measured prefill speed to the cache (the tlru policy's TTFT target in tokens): steps
        that are mostly prefill (>= 64 prompt tokens), moving average over about ten of them."""
        num_prefill = sum(c.num_tokens for c in chunks if c.num_tokens > 1)
        if num_prefill < 64 or elapsed_s <= 0:
            return
        rate = num_prefill / elapsed_s
        self._prefill_rate = rate if self._prefill_rate is None else 0.9 * self._prefill_rate + 0.1 * rate
        self.cache.set_prefill_rate(self._prefill_rate)

    def _post_process(self, chunk: ScheduledChunk, out: StepLogits, rows: slice, now: float,
                      kept: torch.Tensor | None = None) -> list[RequestUpdate]:
        """Everything after the forward pass, for one request: commit its blocks, protect its breakpoints,
        keep prompt logits, fork its other samples (n > 1), sample, check stops, and emit updates."""
        request = chunk.request
        if chunk.kind == "compute":
            self._num_computed_prompt_tokens += max(0, min(chunk.end, request.prompt_len) - chunk.start)
            end = chunk.end
        else:
            end = self._advance_assembly(chunk, kept)
        request.num_computed = end
        self.cache.commit(request.request_id, request.token_ids, end)
        if request.cache_breakpoints and request.cache_write is None and end >= request.prompt_len:
            request.cache_write = self.cache.protect(request.request_id, request.cache_breakpoints)
        if request.want_prompt_logits:
            request.prompt_logits.append(out.logits[rows])
            request.prompt_logit_positions.append(out.positions[rows])
        if end < len(request.token_ids):
            return []  # more of the prompt to compute
        logits = out.logits[rows.stop - 1] if rows.stop > rows.start else None  # None: no row (max_tokens == 0)
        samples = [request]
        if request.group is not None and not request.group.forked:
            samples += self._fork(request)
        updates = []
        for one in samples:
            try:
                updates.append(self._sample_next(one, logits, now))
            except Exception as exc:
                if one is request:
                    raise
                log.exception("sampling request %s failed; finishing it with an error", one.request_id)
                if not one.finished:
                    updates.append(self._finish(one, "error", error=_describe(exc, "sampling failed")))
        return updates

    def _sample_next(self, request: Request, logits: torch.Tensor | None, now: float) -> RequestUpdate:
        """Choose the request's next token from its last position's logits [V], check stops, emit an update."""
        params = request.sampling
        if request.num_output_tokens >= params.max_tokens:  # max_tokens == 0: prefill only
            request.first_token_time = request.first_token_time or now
            return self._finish(request, "length")
        assert logits is not None
        allowed = request.constraint.allowed() if request.constraint is not None else None
        if allowed is not None and not bool(allowed.any()):
            return self._finish(request, "error", error="the grammar allows no next token")
        token = sample(request.sampler.process(logits, allowed), params, request.generator)
        request.token_ids.append(token)
        request.sampler.note(token)
        new_logprobs = (request.sampler.record_logprobs(logits, token),) if params.logprobs is not None else ()
        self._num_generated_tokens += 1
        if request.first_token_time is None:
            request.first_token_time = now
        reason = None
        if token in request.eos_token_ids or token in params.stop_token_ids:
            reason = "stop"
        else:
            if request.constraint is not None:
                request.constraint.accept(token)
            if request.stop_checker.push(token) or (request.constraint is not None and request.constraint.finished):
                reason = "stop"
            elif request.num_output_tokens >= params.max_tokens or len(request.token_ids) >= self.max_model_len:
                reason = "length"
        if reason is not None:
            return self._finish(request, reason, new_token=token, new_logprobs=new_logprobs)
        usage = None if request.sent_usage else self._usage(request)
        request.sent_usage = True
        update = RequestUpdate(request.request_id if request.group is None else request.group.request_id, (token,),
                               request.stop_checker.take(final=False), False, None, usage=usage,
                               index=request.index, new_logprobs=new_logprobs)
        self._emit(request, update)
        return update

    def _fork(self, request: Request) -> list[Request]:
        """The other n - 1 samples of a request whose prompt is computed: each shares its blocks (a partial
        last block is copied) and gets its own sampler, grammar state, stop checker and generator. A sample
        the pool has no room for finishes with an error."""
        group = request.group
        assert group is not None
        group.forked = True
        children = []
        for i in range(1, group.n):
            child_id = f"{group.request_id}#{i}"
            seed = None if request.sampling.seed is None else request.sampling.seed + i
            decoder = self.tokenizer.incremental_decoder() if self.tokenizer is not None else _NoTextDecoder()
            child = Request(
                request_id=child_id, prompt_token_ids=request.prompt_token_ids, sampling=request.sampling,
                namespace=request.namespace, tenant=request.tenant,
                stop_checker=StopChecker(decoder, request.sampling.stop), eos_token_ids=request.eos_token_ids,
                generator=make_generator(seed, self.model.device), on_update=request.on_update,
                detach=request.detach, cache_breakpoints=(), modules=request.modules,
                module_repair=request.module_repair,
                constraint=request.constraint.fork() if request.constraint is not None else None,
                index=i, group=group,
            )
            child.sampler = request.sampler.fork()
            child.num_cached_tokens = request.prompt_len  # computed once, by sample 0
            child.module_usage = (0, 0, 0, 0) if request.modules else None
            child.arrival_time = request.arrival_time
            child.sent_usage = True  # usage is the group's: sample 0 reports it
            group.live[i] = child
            self._requests[child_id] = child
            result = self.cache.fork(request.request_id, child_id, request.prompt_len)
            if result is None:
                self._finish(child, "error", error="the KV pool has no room for this sample")
                continue
            if result.copy is not None:
                src, dst = result.copy
                bs = self.cache.block_size
                self.kv.k[:, dst * bs:(dst + 1) * bs] = self.kv.k[:, src * bs:(src + 1) * bs]
                self.kv.v[:, dst * bs:(dst + 1) * bs] = self.kv.v[:, src * bs:(src + 1) * bs]
            child.num_computed = request.prompt_len
            self.scheduler.adopt(child)
            children.append(child)
        return children

    # -- module assembly (see engine/assembly.py) -----------------------------------------------------
    def _module_slots(self, block_ids: Sequence[int], start: int, end: int) -> torch.Tensor:
        """Pool slots of positions start..end-1 of a block table."""
        bs = self.cache.block_size
        positions = torch.arange(start, end, device=self.model.device)
        table = torch.tensor(list(block_ids), dtype=torch.long, device=self.model.device)
        return table[positions // bs] * bs + positions % bs

    def _fill(self, request: Request, fill: Fill) -> None:
        """Copy a cached module's K/V into the request's blocks at its position, keys moved there."""
        span = fill.work.span
        src = self._module_slots(fill.block_ids, 0, span.num_tokens)
        dst = self._module_slots(self.cache.block_table(request.request_id), span.start, span.end)
        keys = self.kv.k.index_select(1, src)  # [layers, n, H_kv, D]
        self.kv.k.index_copy_(1, dst, self.model.move_keys(keys, span.start) if span.start else keys)
        self.kv.v.index_copy_(1, dst, self.kv.v.index_select(1, src))

    def _store_module(self, request: Request, work: ModuleWork) -> None:
        """A module computed alone (positions from 0) in the request's blocks: copy it to blocks of its own,
        publish them under the module's hashes, then move the request's keys to the module's position."""
        span = work.span
        here = self._module_slots(self.cache.block_table(request.request_id), span.start, span.end)
        block_ids = self.cache.allocate_module(len(work.hashes))
        if block_ids is None:
            self._module_counts["num_store_refused"] += 1
        else:
            there = self._module_slots(block_ids, 0, span.num_tokens)
            self.kv.k.index_copy_(1, there, self.kv.k.index_select(1, here))
            self.kv.v.index_copy_(1, there, self.kv.v.index_select(1, here))
            self.cache.publish_module(work.hashes, block_ids, span.ttl_class)
            self._module_counts["num_stored"] += 1
        if span.start:
            self.kv.k.index_copy_(1, here, self.model.move_keys(self.kv.k.index_select(1, here), span.start))
        work.filled = True

    def _advance_assembly(self, chunk: ScheduledChunk, kept: torch.Tensor | None) -> int:
        """Account for an encode or assemble chunk; returns the request's num_computed afterwards."""
        request = chunk.request
        assembly = request.assembly
        assert assembly is not None
        if chunk.kind == "encode":
            assert chunk.work is not None
            chunk.work.num_encoded += len(chunk.rows)
            self._num_computed_prompt_tokens += len(chunk.rows)
            if chunk.work.num_encoded >= chunk.work.span.num_tokens:
                self._store_module(request, chunk.work)
        else:
            kept_rows = kept.tolist() if kept is not None else [True] * len(chunk.rows)
            for module, was_kept in zip(chunk.row_module or (-1,) * len(chunk.rows), kept_rows, strict=True):
                if was_kept:
                    self._num_computed_prompt_tokens += 1
                    if module >= 0:
                        assembly.works[module].num_recomputed += 1
            assembly.next_row += len(chunk.rows)
        if not assembly.done:
            return request.num_computed
        works = assembly.works
        num_hits = sum(w.hit for w in works)
        request.module_usage = (len(works), num_hits, assembly.num_reused, assembly.num_recomputed)
        counts = self._module_counts
        counts["num_lookups"] += len(works)
        counts["num_hits"] += num_hits
        counts["num_reused_tokens"] += assembly.num_reused
        counts["num_recomputed_tokens"] += assembly.num_recomputed
        return request.prompt_len

    def _finish(self, request: Request, reason: str, new_token: int | None = None,
                error: str | None = None, new_logprobs: tuple[TokenLogprob, ...] = ()) -> RequestUpdate:
        """The one way a request (or one of its samples) ends: release its blocks, forget it, emit its last
        update. A sample of a group whose other samples go on emits an update with finished=False."""
        self.scheduler.finish(request)
        request.finish_reason = reason
        request.error = error
        request.finish_time = time.perf_counter()
        del self._requests[request.request_id]
        if reason == "error":
            self._num_errors += 1
        new_tokens = () if new_token is None else (new_token,)
        try:
            request.stop_checker.flush()
        except Exception:  # a decoder that fails here must not keep the request alive
            log.exception("flushing the text of request %s failed", request.request_id)
        completion = self._completion(request)
        text = request.stop_checker.take(final=True)
        group = request.group
        if group is not None:
            group.live.pop(request.index, None)
            group.done[request.index] = completion
            if group.live:  # the others go on
                update = RequestUpdate(group.request_id, new_tokens, text, False, None, index=request.index,
                                       sample_finish_reason=reason, new_logprobs=new_logprobs)
                self._emit(request, update)
                return update
            self._groups.pop(group.request_id, None)
            completion = self._group_completion(group)
        self._num_unfinished -= 1
        self._unfinished_by_tenant[request.tenant] -= 1
        if not self._unfinished_by_tenant[request.tenant]:
            del self._unfinished_by_tenant[request.tenant]
        if not request.detach:
            self._results[completion.request_id] = completion
        update = RequestUpdate(completion.request_id, new_tokens, text, True, completion.finish_reason,
                               usage=completion.usage, completion=completion, index=request.index,
                               sample_finish_reason=reason, new_logprobs=new_logprobs)
        self._emit(request, update)
        return update

    @staticmethod
    def _group_completion(group: SampleGroup) -> Completion:
        """The completion of all samples: sample 0's fields, every sample in choices, and usage counting the
        prompt once (sample 0's reuse and writes) and every sample's output tokens."""
        samples = tuple(group.done[i] for i in sorted(group.done))
        first = samples[0]
        usage = _replace(first.usage, completion_tokens=sum(c.usage.completion_tokens for c in samples))
        reasons = {c.finish_reason for c in samples}
        reason = next((r for r in ("error", "abort") if r in reasons), first.finish_reason)
        error = next((c.error for c in samples if c.error), None)
        return _replace(first, request_id=group.request_id, usage=usage, choices=samples, finish_reason=reason,
                        error=error)

    @staticmethod
    def _emit(request: Request, update: RequestUpdate) -> None:
        if request.on_update is None:
            return
        try:
            request.on_update(update)
        except Exception:  # e.g. the server's event loop has closed: the request goes on without a listener
            log.exception("delivering an update of request %s failed", request.request_id)

    # -- results ---------------------------------------------------------------------------------
    def _completion(self, request: Request) -> Completion:
        end = request.finish_time or time.perf_counter()
        first = request.first_token_time or end
        return Completion(
            request_id=request.request_id,
            text=request.stop_checker.text,
            token_ids=tuple(request.output_token_ids),
            finish_reason=request.finish_reason or "abort",
            usage=self._usage(request),
            timings=Timings(ttft_s=first - request.arrival_time, total_s=end - request.arrival_time),
            stop_sequence=request.stop_checker.matched,
            prompt_token_ids=tuple(request.prompt_token_ids),
            namespace=request.namespace,
            tenant=request.tenant,
            error=request.error,
            logprobs=tuple(request.sampler.logprobs) if request.sampling.logprobs is not None else None,
            index=request.index,
        )

    def completion(self, request_id: str) -> Completion:
        """The result of a finished request (forgets it). Not for detached requests."""
        with self._lock:
            if request_id in self._requests or request_id in self._groups:
                raise InvalidRequestError(f"request {request_id!r} has not finished")
            try:
                return self._results.pop(request_id)
            except KeyError:
                raise InvalidRequestError(f"no finished request {request_id!r}") from None

    def usage(self, request_id: str) -> Usage:
        """Usage of a request so far (cached tokens are known once it is admitted)."""
        with self._lock:
            request = self._requests.get(request_id)
            group = self._groups.get(request_id)
            if request is None and group is not None:
                return group.done[0].usage if 0 in group.done else self._usage(next(iter(group.live.values())))
            if request is None:
                return self._results[request_id].usage
            return self._usage(request)

    def _usage(self, request: Request) -> Usage:
        num_cached = request.num_cached_tokens or 0
        written: dict[str, int] = {}
        write = request.cache_write
        if write is not None:
            bs = self.cache.block_size
            for j, ttl_class in enumerate(write.block_classes):
                if j * bs >= num_cached:  # computed here, not read
                    written[ttl_class] = written.get(ttl_class, 0) + bs
        num_modules, num_hits, num_reused, num_recomputed = request.module_usage or (
            sum(m.start >= num_cached for m in request.modules), 0, 0, 0)
        return Usage(request.prompt_len, num_cached + num_reused, request.num_output_tokens, written,
                     write is not None and write.refused, module_cached_tokens=num_reused,
                     recomputed_tokens=num_recomputed, num_modules=num_modules, num_module_hits=num_hits,
                     module_repair=request.module_repair.label if request.modules else None)

    def run_until_done(self, request_ids: Sequence[str]) -> list[Completion]:
        pending = set(request_ids)
        while pending:
            if not self.run_step().num_scheduled:
                self.wait_for_work(0.01)  # e.g. a request whose prefix is loading from a tier
            with self._lock:
                pending = {r for r in pending if r in self._requests or r in self._groups}
        return [self.completion(r) for r in request_ids]

    def generate(self, prompt: Prompt, *, namespace: str = DEFAULT_NAMESPACE,
                 on_update: Callable[[RequestUpdate], None] | None = None, module_repair: str | None = None,
                 **sampling: Any) -> Completion:
        """Generate for one prompt; `on_update` receives each streamed piece. sampling: SamplingParams fields;
        module_repair: for prompts with modules (see add_request)."""
        rid = self.add_request(prompt, _sampling(sampling), namespace=namespace, on_update=on_update,
                               module_repair=module_repair)
        return self.run_until_done([rid])[0]

    def generate_many(self, prompts: Sequence[Prompt], *, namespace: str = DEFAULT_NAMESPACE,
                      module_repair: str | None = None, **sampling: Any) -> list[Completion]:
        """Submit all prompts together (continuous batching) and return their completions in order."""
        params = _sampling(sampling)
        ids = [self.add_request(p, params, namespace=namespace, module_repair=module_repair) for p in prompts]
        return self.run_until_done(ids)

    def stream(self, prompt: Prompt, *, namespace: str = DEFAULT_NAMESPACE, module_repair: str | None = None,
               **sampling: Any) -> Iterator[RequestUpdate]:
        """Yield updates as tokens are generated; the last one has finished=True. Closing the iterator aborts."""
        rid = self.add_request(prompt, _sampling(sampling), namespace=namespace, detach=True,
                               module_repair=module_repair)
        try:
            while True:
                result = self.run_step()
                for update in result.updates:
                    if update.request_id == rid:
                        yield update
                        if update.finished:
                            return
                if not result.num_scheduled:
                    self.wait_for_work(0.01)
        finally:
            self.abort(rid)

    def prompt_logits(self, prompt: Prompt, *, namespace: str = DEFAULT_NAMESPACE, modules: Sequence[ModuleSpan] = (),
                      module_repair: str | ModuleRepair | None = None) -> PromptLogits:
        """Prefill a prompt (reusing the cache) and return the logits of every computed position.

        With modules, the rows are those of the text computed in full context (module tokens give none);
        `positions` says which prompt position each row is."""
        rid = self.add_request(prompt, SamplingParams(max_tokens=0), namespace=namespace, want_prompt_logits=True,
                               modules=modules, module_repair=module_repair)
        with self._lock:
            request = self._requests[rid]
        completion = self.run_until_done([rid])[0]
        if completion.finish_reason == "error":
            raise RuntimeError(f"prefill failed: {completion.error}")
        return PromptLogits(torch.cat(request.prompt_logits), completion.usage.cached_tokens,
                            torch.cat(request.prompt_logit_positions), completion.usage)

    def stats(self) -> EngineStats:
        with self._lock:
            sched = self.scheduler
            stats = EngineStats(
                num_prompt_tokens=sched.num_query_tokens,
                num_cached_tokens=sched.num_hit_tokens + self._module_counts["num_reused_tokens"],
                num_computed_prompt_tokens=self._num_computed_prompt_tokens,
                num_generated_tokens=self._num_generated_tokens,
                num_steps=self._num_steps,
                num_preemptions=sched.num_preemptions,
                cache=self.cache.stats(),
                num_waiting=len(sched.waiting),
                num_loading=self._num_loading,
                num_running=len(sched.running),
                num_errors=self._num_errors,
                modules=self._module_stats(),
            )
        if self.kv_store is None:
            return stats
        store = self.kv_store
        return _replace(stats, tiers=tuple(store.stats()), num_dropped_tier_writes=store.num_dropped_writes)

    def _module_stats(self) -> ModuleStats:
        num_cached, num_blocks = self.cache.module_block_counts()
        c = self._module_counts
        return ModuleStats(num_lookups=c["num_lookups"], num_hits=c["num_hits"], num_tier_hits=c["num_tier_hits"],
                           num_reused_tokens=c["num_reused_tokens"], num_recomputed_tokens=c["num_recomputed_tokens"],
                           num_stored=c["num_stored"], num_cached=num_cached, num_blocks=num_blocks,
                           num_bytes=num_blocks * self.cache.block_size * self.kv.bytes_per_token,
                           num_registered=len(self.modules))

    def locate_prefix(self, token_ids: Sequence[int], namespace: str = DEFAULT_NAMESPACE) -> tuple[str | None,
                                                                                                  str | None]:
        """Where a prefix's blocks are now ("pool", "tier" or None) and its TTL class, if protected.
        Tier existence checks run without the engine lock."""
        with self._lock:
            loc = self.cache.locate(token_ids, namespace)
        if loc.where is None and loc.block_hash is not None and self.kv_store is not None:
            if self.kv_store.num_leading([loc.block_hash]):
                return "tier", None
        return loc.where, loc.ttl_class

    def set_kv_events(self, sink: Any) -> None:
        """Publish KV events (cache/events.py KVEventSink) for every block stored in / removed from the pool."""
        with self._lock:
            self.cache.set_event_sink(sink)

    def kv_blocks_summary(self, replica: str, full: bool = False) -> Any:
        """The pool's stored block hashes as a cache.events.Summary (seq 0 when no event sink is attached)."""
        from promptstash.cache.events import Summary, digest

        with self._lock:
            if self.cache.events is not None:
                return self.cache.events.summary(full)
            stored = [h for h, _ in self.cache.index.items()]
        hashes = tuple(sorted(h.hex() for h in stored)) if full else None
        return Summary(replica, len(stored), digest(stored), 0, hashes)

    def check_integrity(self) -> None:
        with self._lock:
            self.cache.check_integrity()


def _text_chars(content: Any) -> int:
    """Characters of a chat message's content (a string or a list of text parts)."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p.get("text", "")) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


def _describe(exc: BaseException, what: str) -> str:
    return f"{what}: {type(exc).__name__}: {exc}"


def _sampling(options: dict[str, Any]) -> SamplingParams:
    stop = options.get("stop")
    if isinstance(stop, str):
        options = {**options, "stop": (stop,)}
    elif stop is not None:
        options = {**options, "stop": tuple(stop)}
    bias = options.get("logit_bias")
    if isinstance(bias, dict):
        options = {**options, "logit_bias": tuple((int(t), float(b)) for t, b in bias.items())}
    if options.get("stop_token_ids") is not None:
        options = {**options, "stop_token_ids": tuple(options["stop_token_ids"])}
    try:
        return SamplingParams(**options)
    except TypeError as exc:
        raise InvalidRequestError(f"unknown sampling option: {exc}") from None
