"""Agent features on the real default model, float32: constrained output and tools stay exact under the prefix
cache, n > 1 computes the prompt once, and logprobs match a recomputation."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.timeout(600)]

from real_model_helpers import SYSTEM, engines  # noqa: E402

SHORT_SYSTEM = "\n".join(SYSTEM.splitlines()[:9])  # ~200 tokens: enough to span several cached blocks

from promptstash.engine.grammar import GrammarSpec  # noqa: E402
from promptstash.tools import ToolDef, parse_tool_calls  # noqa: E402

SCHEMA = {"type": "object", "properties": {"language": {"type": "string", "enum": ["python", "rust", "go"]},
                                            "lines": {"type": "integer"}, "risky": {"type": "boolean"}},
          "required": ["language", "lines", "risky"], "additionalProperties": False}
TOOLS = [ToolDef("run_linter", "Run a linter on a file and report the findings.",
                 {"type": "object", "properties": {"path": {"type": "string"},
                                                   "strict": {"type": "boolean"}}, "required": ["path"]}),
         ToolDef("open_file", "Open a file of the repository.",
                 {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]})]


def _messages(question: str) -> list[dict]:
    return [{"role": "system", "content": SHORT_SYSTEM}, {"role": "user", "content": question}]


def _prompt(engine, question: str, tools=()) -> list[int]:
    return engine.render(_messages(question), tools=tools).token_ids


def test_schema_output_is_valid_and_identical_with_caching_on_and_off() -> None:
    on, off = engines("float32")
    grammar = GrammarSpec.json_schema(SCHEMA)
    warm = _prompt(on, "Describe: fn main() {}. Answer in JSON.")
    on.generate(warm, max_tokens=4, namespace="schema")  # the shared system prompt is now cached
    prompt = _prompt(on, "Describe: def f(x): return x * 2. Answer in JSON.")
    cached = on.generate(prompt, max_tokens=60, grammar=grammar, namespace="schema")
    fresh = off.generate(prompt, max_tokens=60, grammar=grammar)
    assert cached.usage.cached_tokens >= 160 and fresh.usage.cached_tokens == 0
    assert cached.token_ids == fresh.token_ids
    doc = json.loads(cached.text)
    assert set(doc) == {"language", "lines", "risky"} and doc["language"] in ("python", "rust", "go")
    assert isinstance(doc["lines"], int) and isinstance(doc["risky"], bool)


def test_tool_call_is_valid_and_identical_with_caching_on_and_off() -> None:
    on, off = engines("float32")
    grammar = GrammarSpec.tool_calls(TOOLS, mode="required", parallel=False)
    on.generate(_prompt(on, "Lint src/a.py", TOOLS), max_tokens=2, namespace="tools")
    prompt = _prompt(on, "Please lint the file src/server/app.py strictly.", TOOLS)
    cached = on.generate(prompt, max_tokens=60, grammar=grammar, namespace="tools")
    fresh = off.generate(prompt, max_tokens=60, grammar=grammar)
    assert cached.usage.cached_tokens >= 160
    assert cached.token_ids == fresh.token_ids
    content, calls = parse_tool_calls(cached.text)
    assert len(calls) == 1 and calls[0].name in ("run_linter", "open_file")
    assert isinstance(json.loads(calls[0].arguments)["path"], str)


def test_four_samples_compute_the_prompt_once_and_logprobs_match_recomputation() -> None:
    on, off = engines("float32")
    prompt = on.render([{"role": "user", "content": "Name a prime number between 10 and 30."}]).token_ids
    before = off.stats().num_computed_prompt_tokens
    group = off.generate(prompt, max_tokens=8, n=4, temperature=1.0, seed=11, logprobs=2)
    assert off.stats().num_computed_prompt_tokens - before == len(prompt)  # computed once, not four times
    assert len(group.samples) == 4 and group.usage.completion_tokens == sum(
        len(c.token_ids) for c in group.samples)
    import torch  # noqa: PLC0415

    for sample in group.samples[:1]:
        full = prompt + list(sample.token_ids[:-1])
        logits = off.prompt_logits(full).logits.float()
        reference = torch.log_softmax(logits, dim=-1)[len(prompt) - 1:]
        assert sample.logprobs is not None
        for i, entry in enumerate(sample.logprobs):
            assert abs(entry.logprob - float(reference[i, entry.token_id])) < 1e-4
