"""What a request hands back: streamed updates, and its completion with usage and timings."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_NAMESPACE = "default"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose K/V came from the cache
    completion_tokens: int
    # prompt tokens computed by this request and protected under a TTL class (its cache breakpoints)
    cache_write_tokens: dict[str, int] = field(default_factory=dict)
    cache_write_refused: bool = False  # breakpoints were asked for but protection would exceed the cap
    # modules (position-independent reuse); cached_tokens = prefix-reused + module_cached_tokens
    module_cached_tokens: int = 0  # module tokens whose K/V came from the module cache and were not recomputed
    recomputed_tokens: int = 0  # module tokens loaded from the cache but recomputed by the repair strategy
    num_modules: int = 0  # modules in the prompt (outside the reused prefix)
    num_module_hits: int = 0  # of those, found in the cache (pool or a tier)
    module_repair: str | None = None  # the repair strategy's label, when the prompt had modules

    @property
    def prefix_cached_tokens(self) -> int:
        """Tokens reused as an exact prefix."""
        return self.cached_tokens - self.module_cached_tokens

    @property
    def computed_tokens(self) -> int:
        """Prompt tokens run through the model for this request (recomputed module tokens included)."""
        return self.prompt_tokens - self.cached_tokens

    @property
    def num_cache_write_tokens(self) -> int:
        return sum(self.cache_write_tokens.values())


@dataclass(frozen=True)
class TokenLogprob:
    """One output token's log-probability under the model (raw logits, before penalties, bias or grammar),
    and the `top` most likely tokens at that position (as many as SamplingParams.logprobs asks)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Timings:
    ttft_s: float  # arrival -> first output token (or end of prefill when max_tokens == 0)
    total_s: float  # arrival -> finished


@dataclass(frozen=True)
class Completion:
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    usage: Usage
    timings: Timings
    stop_sequence: str | None = None  # the stop string that ended generation, if one did
    prompt_token_ids: tuple[int, ...] = ()
    namespace: str = DEFAULT_NAMESPACE
    tenant: str = DEFAULT_NAMESPACE
    error: str | None = None  # what went wrong, when finish_reason == "error"
    logprobs: tuple[TokenLogprob, ...] | None = None  # per output token, when SamplingParams.logprobs is set
    index: int = 0  # which sample of the prompt (0 .. n-1)
    # n > 1: every sample's completion, in index order (this one's fields are sample 0's, but usage counts the
    # prompt once and the output tokens of all samples)
    choices: tuple[Completion, ...] = ()

    @property
    def samples(self) -> tuple[Completion, ...]:
        """Every sample's completion (just this one when n == 1)."""
        return self.choices or (self,)


@dataclass(frozen=True)
class RequestUpdate:
    """What one engine step produced for one request (what a streaming client receives).

    usage is set on a request's first update (its cache reuse is known by then) and on its last one;
    completion is set on the last one (finished=True): the engine has forgotten the request by then.
    """

    request_id: str
    new_token_ids: tuple[int, ...]
    new_text: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" once finished
    usage: Usage | None = None
    completion: Completion | None = None
    index: int = 0  # which sample (n > 1); finished is True only on the last update of the whole request
    sample_finish_reason: str | None = None  # set on the last update of sample `index`
    new_logprobs: tuple[TokenLogprob, ...] = ()  # one per new token, when SamplingParams.logprobs is set
