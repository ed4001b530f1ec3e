"""Constrained decoding: what the model may output, as a grammar the sampler enforces token by token.

CONTRACT
- GrammarSpec says what is wanted (a JSON schema, any JSON object, a regex, one of fixed strings, tool calls);
  its `key` (a hash of the canonical spec) names its compiled grammar in the cache.
- compile_grammar(spec, tokenizer, vocab_size) -> CompiledGrammar, cached by key; raises InvalidRequestError
  naming what could not be compiled (an invalid schema, a feature the grammar library does not support).
- CompiledGrammar.constraint() -> a fresh Constraint for one generated sequence.
- Constraint, used by the engine at each decode step of one sequence:
    allowed() -> bool tensor [vocab_size] of tokens allowed next, or None when any token is (free text)
    accept(token_id)  -- advance past the sampled token (it was allowed)
    finished          -- True once the output is complete: the engine ends generation ("stop")
    fork()            -- an independent copy in the same state (n > 1 samples share a prompt)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Protocol

import torch

GRAMMAR_KINDS = ("json_schema", "regex", "choice", "tool_calls")
TOOL_MODES = ("auto", "required", "named")


@dataclass(frozen=True)
class GrammarSpec:
    kind: str  # one of GRAMMAR_KINDS
    source: str  # canonical JSON of the schema ("" = any JSON object) / the regex / JSON list of choices /
    #              for tool_calls: canonical JSON list of {"name", "parameters"}
    tool_mode: str = "auto"  # tool_calls: auto (text or calls) | required (at least one call) | named
    tool_name: str | None = None  # tool_calls, mode "named": the one function to call
    parallel: bool = True  # tool_calls: more than one call allowed

    @property
    def key(self) -> str:
        text = json.dumps([self.kind, self.source, self.tool_mode, self.tool_name, self.parallel])
        return hashlib.sha256(text.encode()).hexdigest()

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | None) -> GrammarSpec:
        """A JSON value matching `schema`; None: any JSON object (OpenAI json_object)."""
        return cls("json_schema", "" if schema is None else json.dumps(schema, sort_keys=True))

    @classmethod
    def regex(cls, pattern: str) -> GrammarSpec:
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices: list[str]) -> GrammarSpec:
        return cls("choice", json.dumps(list(choices)))

    @classmethod
    def tool_calls(cls, tools: list[Any], mode: str = "auto", name: str | None = None,
                   parallel: bool = True) -> GrammarSpec:
        """tools: ToolDefs (promptstash.tools)."""
        source = json.dumps([{"name": t.name, "parameters": t.parameters} for t in tools], sort_keys=True)
        return cls("tool_calls", source, mode, name, parallel)


class Constraint(Protocol):
    def allowed(self) -> torch.Tensor | None: ...
    def accept(self, token_id: int) -> None: ...
    @property
    def finished(self) -> bool: ...
    def fork(self) -> Constraint: ...


class CompiledGrammar(Protocol):
    spec: GrammarSpec

    def constraint(self) -> Constraint: ...


def compile_grammar(spec: GrammarSpec, tokenizer: Any, vocab_size: int) -> CompiledGrammar:
    raise NotImplementedError  # implemented with llguidance
