"""One generation request: its tokens, progress, output text and timings."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from promptstash.cache.manager import ProtectResult
from promptstash.cache.modules import ModuleRepair, ModuleSpan
from promptstash.engine.assembly import Assembly
from promptstash.engine.grammar import Constraint
from promptstash.engine.results import Completion, RequestUpdate
from promptstash.engine.sampling import SamplerState, SamplingParams

__all__ = ["Request", "RequestStatus", "RequestUpdate", "StopChecker"]


class RequestStatus(enum.Enum):
    """LOADING -> WAITING -> RUNNING -> FINISHED; LOADING only when tiers may hold its prefix; a preempted
    request goes back from RUNNING to WAITING."""

    LOADING = "loading"  # its prefix's blocks are being read from the tiers (off the engine lock)
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class StopChecker:
    """Turns sampled tokens into text, cuts it at the first stop string, and holds back a tail that
    could still turn into a stop string (so streamed text never has to be taken back)."""

    def __init__(self, decoder, stop: tuple[str, ...]) -> None:
        self._decoder = decoder
        self._stop = stop
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self._emitted = 0
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended generation

    def push(self, token_id: int) -> bool:
        """Add a token's text; True if a stop string appeared (text is then cut before it)."""
        piece = self._decoder.push(token_id)
        if not piece:
            return False
        start = max(0, len(self.text) - self._holdback)
        self.text += piece
        for s in self._stop:
            at = self.text.find(s, start)
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True
                self.matched = s
                return True
        return False

    def flush(self) -> None:
        """At the end of generation: keep the bytes of an unfinished character (as U+FFFD), like decode()."""
        flush = getattr(self._decoder, "flush", None)
        if not self.stopped and flush is not None:
            self.text += flush()

    def take(self, final: bool) -> str:
        """Text not yet handed out; all of it when final, else all but the held-back tail."""
        end = len(self.text) if final else max(self._emitted, len(self.text) - self._holdback)
        new = self.text[self._emitted:end]
        self._emitted = end
        return new


@dataclass(eq=False)
class SampleGroup:
    """The n samples of one prompt (SamplingParams.n > 1). Sample 0 is the request that computes the prompt;
    when its prompt is done the others fork from it (sharing its blocks) and each decodes on its own. The
    group counts as one unfinished request and finishes when its last sample does.

    NOTE: the group's id is sample 0's request id; sample i > 0 has id f"{group id}#{i}"."""

    request_id: str
    n: int
    live: dict[int, Request] = field(default_factory=dict)  # index -> unfinished sample
    done: dict[int, Completion] = field(default_factory=dict)  # index -> finished sample's completion
    forked: bool = False


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    namespace: str
    tenant: str
    stop_checker: StopChecker
    eos_token_ids: frozenset[int]
    generator: torch.Generator | None = None
    on_update: Callable[[RequestUpdate], None] | None = None
    want_prompt_logits: bool = False
    detach: bool = False  # its completion goes to its last update only
    cache_breakpoints: tuple[tuple[int, str], ...] = ()  # (prefix_len, ttl_class): protect once computed
    modules: tuple[ModuleSpan, ...] = ()  # spans of prompt tokens that are modules (see cache/modules.py)
    module_repair: ModuleRepair = ModuleRepair()
    module_hashes: tuple[tuple[bytes, ...], ...] = ()  # per module, its block hashes in this namespace

    token_ids: list[int] = field(init=False)  # prompt then output; K/V exist for token_ids[:num_computed]
    status: RequestStatus = RequestStatus.WAITING
    num_computed: int = 0
    num_cached_tokens: int | None = None  # prompt tokens reused from the cache, known at first admission
    finish_reason: str | None = None
    error: str | None = None  # why it finished with finish_reason "error"
    sent_usage: bool = False  # its first update (which carries usage) has been handed out
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    prompt_logits: list[torch.Tensor] = field(default_factory=list)
    prompt_logit_positions: list[torch.Tensor] = field(default_factory=list)
    num_preemptions: int = 0
    cache_write: ProtectResult | None = None  # what protecting the breakpoints did, once the prompt is computed
    assembly: Assembly | None = None  # module assembly in progress (reset when preempted)
    module_usage: tuple[int, int, int, int] | None = None  # (modules, hits, reused, recomputed) once assembled
    constraint: Constraint | None = None  # the grammar this sequence's output must follow (engine/grammar.py)
    sampler: SamplerState = field(init=False)  # penalties' token counts, logprobs
    index: int = 0  # which sample of its prompt (SamplingParams.n)
    group: SampleGroup | None = None  # n > 1: the samples of one prompt

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.sampler = SamplerState(self.sampling, self.prompt_token_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
