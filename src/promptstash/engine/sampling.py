"""Sampling parameters and the sampler (greedy, temperature, top-k, top-p, per-request seed).

NOTE: a temperature below MIN_TEMPERATURE samples greedily. Dividing logits by a tiny temperature (1e-45,
5e-324) overflows to inf and softmax then gives NaN; long before that the distribution is already one-hot
(logit gaps of 1e-3 become 100 at T = 1e-5), so greedy is the same choice without the arithmetic.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from promptstash.engine.grammar import GrammarSpec
from promptstash.engine.results import TokenLogprob
from promptstash.errors import InvalidRequestError

MIN_TEMPERATURE = 1e-5
MAX_N = 16
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1  # samples of one prompt: the prompt is computed once, then each sample decodes on its own
    logprobs: int | None = None  # None: off; k >= 0: each output token's log-probability and the top k
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    presence_penalty: float = 0.0  # subtracted once from the logit of every token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and output (divides positive logits)
    min_p: float = 0.0  # drop tokens whose probability is below min_p times the top token's
    grammar: GrammarSpec | None = None  # constrained decoding (engine/grammar.py)

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 0:
            raise InvalidRequestError(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        if not 0.0 <= float(self.temperature) <= 100.0:
            raise InvalidRequestError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty strings")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or not 1 <= self.n <= MAX_N:
            raise InvalidRequestError(f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InvalidRequestError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= float(getattr(self, name)) <= 2.0:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not 0.01 <= float(self.repetition_penalty) <= 2.0:  # a tiny one would divide logits into inf
            raise InvalidRequestError(f"repetition_penalty must be in [0.01, 2], got {self.repetition_penalty!r}")
        if not 0.0 <= float(self.min_p) <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for token_id, bias in self.logit_bias:
            if not -100.0 <= float(bias) <= 100.0:
                raise InvalidRequestError(f"logit_bias for token {token_id} must be in [-100, 100], got {bias!r}")

    @property
    def processes_logits(self) -> bool:
        """Anything changes the logits before the choice (penalties, bias, min_p)."""
        return bool(self.logit_bias) or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or (
            self.repetition_penalty != 1.0) or self.min_p > 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


class SamplerState:
    """What one sequence's sampler needs beyond its params: the tokens it has seen (penalties) and the log-
    probabilities it reports. Order of processing, as in vLLM: penalties, logit_bias, the grammar's mask,
    then temperature, min_p, top_k, top_p.

    NOTE: logprobs are of the raw logits (the model's own distribution), before any processing."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int]) -> None:
        self.params = params
        self._prompt_ids = prompt_ids if params.repetition_penalty != 1.0 else ()
        self._prompt_unique: torch.Tensor | None = None
        self.counts: Counter[int] = Counter()  # output token -> occurrences
        self.logprobs: list[TokenLogprob] = []

    def fork(self) -> SamplerState:
        child = SamplerState(self.params, self._prompt_ids)
        child._prompt_unique = self._prompt_unique
        child.counts = Counter(self.counts)
        child.logprobs = list(self.logprobs)
        return child

    def note(self, token_id: int) -> None:
        self.counts[token_id] += 1

    def process(self, logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        """Penalties, bias and the grammar mask applied to one row of float32 logits [V] (a new tensor when
        anything changes)."""
        params = self.params
        if not params.processes_logits and allowed is None:
            return logits
        logits = logits.clone()
        device = logits.device
        if self.counts and (params.presence_penalty or params.frequency_penalty):
            ids = torch.tensor(list(self.counts), device=device)
            counts = torch.tensor(list(self.counts.values()), dtype=logits.dtype, device=device)
            logits[ids] -= params.frequency_penalty * counts + params.presence_penalty
        if params.repetition_penalty != 1.0:
            if self._prompt_unique is None:
                self._prompt_unique = torch.unique(torch.tensor(list(self._prompt_ids), dtype=torch.long))
            ids = self._prompt_unique.to(device)
            if self.counts:
                ids = torch.unique(torch.cat([ids, torch.tensor(list(self.counts), device=device)]))
            ids = ids[ids < logits.shape[-1]]
            seen = logits[ids]
            logits[ids] = torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
        if params.logit_bias:
            vocab = logits.shape[-1]
            for token_id, bias in params.logit_bias:
                if 0 <= token_id < vocab:
                    logits[token_id] += bias
        if allowed is not None:
            logits.masked_fill_(~allowed.to(device, non_blocking=True), float("-inf"))
        return logits

    def record_logprobs(self, raw_logits: torch.Tensor, token_id: int) -> TokenLogprob:
        """Note the chosen token's log-probability (and the top k) under the raw logits."""
        logprobs = torch.log_softmax(raw_logits.float(), dim=-1)
        k = self.params.logprobs or 0
        top: tuple[tuple[int, float], ...] = ()
        if k:
            values, ids = torch.topk(logprobs, k)
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        entry = TokenLogprob(token_id, float(logprobs[token_id]), top)
        self.logprobs.append(entry)
        return entry


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from one row of float32 logits [V] (already processed: see SamplerState)."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / float(params.temperature)
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest set whose mass reaches top_p (always at least the top token)
        mass = params.top_p * float(sorted_probs.sum()) if params.min_p > 0.0 else params.top_p
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= mass
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
