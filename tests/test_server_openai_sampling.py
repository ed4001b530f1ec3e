"""OpenAI sampling fields and cache controls over a live server (tiny random-weight chat model), through the
official openai SDK: n, logprobs / top_logprobs (chat) and logprobs (completions), logit_bias, penalties,
repetition_penalty, min_p; prompt_cache_breakpoint / prompt_cache_options. Every bad value is a 400 naming
its field."""

from __future__ import annotations

import openai
import pytest
import torch
from server_helpers import LiveServer, no_errors_logged, tiny_chat_engine, twin_engine

from promptstash.config import ServerConfig
from promptstash.prompts import chat_messages

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]
LONG = "The quick brown fox jumps over the lazy dog. " * 12  # well over MIN_CACHEABLE tokens


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine = tiny_chat_engine(tmp_path_factory.mktemp("tok"), max_model_len=1024, block_size=16)
    with LiveServer(engine, ServerConfig(min_cacheable_tokens=32)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def _chat(server, client, **kwargs):
    kwargs.setdefault("messages", MESSAGES)
    kwargs.setdefault("max_tokens", 6)
    return client.chat.completions.create(model=server.state.model_name, **kwargs)


def _bad(call, *mentions: str, param: str | None = None) -> str:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    error = info.value.body
    for text in mentions:
        assert text in error["message"], error
    if param is not None:
        assert error["param"] == param, error
    return error["message"]


# -- n ---------------------------------------------------------------------------------------------------------

def test_n_returns_n_choices_and_counts_the_prompt_once(server, client) -> None:
    with no_errors_logged("promptstash"):
        one = _chat(server, client, temperature=0, extra_body={"ignore_eos": True})
        four = _chat(server, client, n=4, temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in four.choices] == [0, 1, 2, 3]
    assert all(c.message.content == one.choices[0].message.content for c in four.choices)  # greedy: all alike
    assert all(c.finish_reason == "length" for c in four.choices)
    assert four.usage.prompt_tokens == one.usage.prompt_tokens
    assert four.usage.completion_tokens == 4 * one.usage.completion_tokens
    text = client.completions.create(model=server.state.model_name, prompt="Once upon", n=3, max_tokens=4,
                                     temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    assert [c.index for c in text.choices] == [0, 1, 2]
    assert text.usage.completion_tokens == 12


def test_n_streamed_choices_reassemble_to_the_unstreamed_ones(server, client) -> None:
    kwargs = dict(n=3, temperature=1.0, seed=11, max_tokens=8, extra_body={"ignore_eos": True})
    whole = _chat(server, client, **kwargs)
    texts, reasons = {}, {}
    for chunk in _chat(server, client, stream=True, stream_options={"include_usage": True}, **kwargs):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason is not None:
                assert c.index not in reasons, "a choice finished twice"
                reasons[c.index] = c.finish_reason
        if chunk.usage is not None:
            assert chunk.usage.completion_tokens == whole.usage.completion_tokens
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert reasons == {0: "length", 1: "length", 2: "length"}


# -- logprobs --------------------------------------------------------------------------------------------------

def test_chat_logprobs_shape_and_values_match_recomputation(server, client) -> None:
    response = _chat(server, client, temperature=0, logprobs=True, top_logprobs=3, max_tokens=5,
                     extra_body={"ignore_eos": True})
    choice = response.choices[0]
    content = choice.logprobs.content
    assert len(content) == response.usage.completion_tokens == 5
    engine = twin_engine(server.engine)
    for entry in content:
        assert entry.logprob <= 0 and isinstance(entry.bytes, list)
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
        assert abs(entry.top_logprobs[0].logprob - entry.logprob) < 1e-6
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token or "\ufffd" in entry.token
    # the reported log-probabilities are the model's: recompute prompt + output in another namespace
    prompt = engine.render(chat_messages(MESSAGES)).token_ids
    output = list(engine.generate(prompt, max_tokens=5, ignore_eos=True, namespace="recompute").token_ids)
    assert [engine.tokenizer.decode([t], skip_special_tokens=False) for t in output] == [e.token for e in content]
    logits = engine.prompt_logits(prompt + output, namespace="recompute-logits").logits
    rows = torch.log_softmax(logits[len(prompt) - 1: len(prompt) - 1 + len(output)], dim=-1)
    for row, token_id, entry in zip(rows, output, content, strict=True):
        assert abs(float(row[token_id]) - entry.logprob) < 1e-4
        top = torch.topk(row, 3)
        assert [engine.tokenizer.decode([int(i)], skip_special_tokens=False) for i in top.indices] == \
            [t.token for t in entry.top_logprobs]


def test_chat_logprobs_streamed_equal_unstreamed(server, client) -> None:
    kwargs = dict(temperature=0, logprobs=True, top_logprobs=2, max_tokens=6, extra_body={"ignore_eos": True})
    whole = _chat(server, client, **kwargs).choices[0].logprobs.content
    streamed = []
    for chunk in _chat(server, client, stream=True, **kwargs):
        for c in chunk.choices:
            if c.logprobs is not None and c.logprobs.content:
                streamed.extend(c.logprobs.content)
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in whole]
    no_top = _chat(server, client, temperature=0, logprobs=True, max_tokens=2).choices[0].logprobs.content
    assert all(e.top_logprobs == [] for e in no_top)
    assert _chat(server, client, max_tokens=2).choices[0].logprobs is None


def test_completion_logprobs_shape(server, client) -> None:
    response = client.completions.create(model=server.state.model_name, prompt="Once upon a time", max_tokens=5,
                                         temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    lp = response.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(len(top) <= 2 and top for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert all(v <= 0 for v in lp.token_logprobs)
    streamed = []
    for chunk in client.completions.create(model=server.state.model_name, prompt="Once upon a time", max_tokens=5,
                                           temperature=0, logprobs=2, stream=True, extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed.extend(zip(chunk.choices[0].logprobs.tokens, chunk.choices[0].logprobs.text_offset,
                                strict=True))
    assert streamed == list(zip(lp.tokens, lp.text_offset, strict=True))


# -- logit_bias, penalties, min_p --------------------------------------------------------------------------------

def test_logit_bias_forces_and_forbids_tokens(server, client) -> None:
    engine = server.engine
    token = engine.tokenizer.encode(" fox")[0]
    forced = _chat(server, client, temperature=0, max_tokens=4, logit_bias={str(token): 100},
                   extra_body={"ignore_eos": True})
    assert engine.tokenizer.encode(forced.choices[0].message.content) == [token] * 4 or \
        forced.choices[0].message.content == engine.tokenizer.decode([token] * 4)
    free = _chat(server, client, temperature=0, max_tokens=4, logprobs=True, extra_body={"ignore_eos": True})
    first = engine.tokenizer.encode(free.choices[0].logprobs.content[0].token)[0]
    banned = _chat(server, client, temperature=0, max_tokens=4, logprobs=True, logit_bias={str(first): -100},
                   extra_body={"ignore_eos": True})
    assert banned.choices[0].logprobs.content[0].token != free.choices[0].logprobs.content[0].token


def test_penalties_and_min_p_are_served(server, client) -> None:
    base = dict(temperature=0.8, seed=5, max_tokens=8)
    for extra in ({"presence_penalty": 1.5}, {"frequency_penalty": -1.0}, {"extra_body": {"repetition_penalty": 1.3}},
                  {"extra_body": {"min_p": 0.2, "top_k": 20}}):
        response = _chat(server, client, **base, **extra)
        assert response.choices[0].finish_reason in ("stop", "length")
    text = client.completions.create(model=server.state.model_name, prompt="abc abc abc", max_tokens=4,
                                     presence_penalty=0.5, extra_body={"repetition_penalty": 1.2, "min_p": 0.1})
    assert text.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("kwargs, mentions, param", [
    ({"n": 0}, (">= 1",), "n"),
    ({"n": 17}, ("<= 16",), "n"),
    ({"logprobs": True, "top_logprobs": 21}, ("<= 20",), "top_logprobs"),
    ({"top_logprobs": 3}, ("requires logprobs",), "top_logprobs"),
    ({"logprobs": 2}, ("boolean",), "logprobs"),
    ({"logit_bias": {"abc": 5}}, ("token ids",), "logit_bias.abc"),
    ({"logit_bias": {"99999999": 5}}, ("outside the vocabulary",), "logit_bias.99999999"),
    ({"logit_bias": {"5": 101}}, ("<= 100",), "logit_bias.5"),
    ({"logit_bias": {"5": "x"}}, ("number",), "logit_bias.5"),
    ({"logit_bias": [1, 2]}, ("object",), "logit_bias"),
    ({"presence_penalty": 2.5}, ("<= 2",), "presence_penalty"),
    ({"frequency_penalty": -3}, (">= -2",), "frequency_penalty"),
    ({"extra_body": {"repetition_penalty": 0}}, (">= 0.01",), "repetition_penalty"),
    ({"extra_body": {"repetition_penalty": 5e-324}}, (">= 0.01",), "repetition_penalty"),
    ({"extra_body": {"repetition_penalty": 3}}, ("<= 2",), "repetition_penalty"),
    ({"extra_body": {"min_p": 1.5}}, ("<= 1",), "min_p"),
    ({"extra_body": {"functions": [{"name": "f"}]}}, ("use tools",), "functions"),
    ({"extra_body": {"function_call": "auto"}}, ("tool_choice",), "function_call"),
    ({"extra_body": {"guided_grammar": "root ::= \"a\""}}, ("not supported",), "guided_grammar"),
])
def test_bad_chat_sampling_values_are_400_naming_the_field(server, client, kwargs, mentions, param) -> None:
    _bad(lambda: _chat(server, client, **kwargs), param, *mentions, param=param)


@pytest.mark.parametrize("kwargs, mentions, param", [
    ({"logprobs": 6}, ("<= 5",), "logprobs"),
    ({"n": 17}, ("<= 16",), "n"),
    ({"extra_body": {"top_logprobs": 2}}, ("takes logprobs",), "top_logprobs"),
    ({"extra_body": {"tools": [{"type": "function", "function": {"name": "f"}}]}}, ("chat",), "tools"),
])
def test_bad_completion_sampling_values_are_400_naming_the_field(server, client, kwargs, mentions, param) -> None:
    _bad(lambda: client.completions.create(model=server.state.model_name, prompt="hi", max_tokens=2, **kwargs),
         param, *mentions, param=param)


# -- cache controls --------------------------------------------------------------------------------------------

def _long_messages(breakpoint_: dict | None, *, count: int = 1) -> list[dict]:
    parts = [{"type": "text", "text": f"Part {i}. " + LONG} for i in range(count)]
    if breakpoint_ is not None:
        for part in parts:
            part["prompt_cache_breakpoint"] = breakpoint_
    return [{"role": "system", "content": parts}, {"role": "user", "content": "Summarise."}]


def _protected(server) -> dict[str, int]:
    return server.engine.cache.protected_blocks()


def test_prompt_cache_breakpoint_protects_the_prefix_under_the_mapped_ttl(server, client) -> None:
    before = _protected(server)
    first = _chat(server, client, messages=_long_messages({"mode": "explicit", "ttl": "12h"}), max_tokens=1,
                  extra_body={"cache_salt": "bp-12h"})
    written = first.usage.prompt_tokens_details.cache_write_tokens
    assert written and written >= 64
    assert _protected(server)["24h"] > before["24h"]  # 12h -> our 24h class
    again = _chat(server, client, messages=_long_messages({"mode": "explicit", "ttl": "12h"}), max_tokens=1,
                  extra_body={"cache_salt": "bp-12h"})
    assert again.usage.prompt_tokens_details.cached_tokens >= written
    before = _protected(server)
    _chat(server, client, messages=_long_messages({"mode": "explicit"}), max_tokens=1,
          extra_body={"cache_salt": "bp-30m"})
    assert _protected(server)["1h"] > before["1h"]  # default 30m -> our 1h class


def test_prompt_cache_options_implicit_and_explicit(server, client) -> None:
    before = _protected(server)
    implicit = _chat(server, client, messages=_long_messages(None), max_tokens=1, prompt_cache_options={"ttl": "30m"},
                     extra_body={"cache_salt": "opt-implicit"})
    assert implicit.usage.prompt_tokens_details.cache_write_tokens > 0
    assert _protected(server)["1h"] > before["1h"]
    explicit = _chat(server, client, messages=_long_messages(None), max_tokens=1,
                     prompt_cache_options={"mode": "explicit"}, extra_body={"cache_salt": "opt-explicit"})
    assert explicit.usage.prompt_tokens_details.cache_write_tokens == 0
    marked = _chat(server, client, messages=_long_messages({"mode": "explicit"}), max_tokens=1,
                   prompt_cache_options={"mode": "explicit", "ttl": "12h"}, extra_body={"cache_salt": "opt-marked"})
    assert 0 < marked.usage.prompt_tokens_details.cache_write_tokens < marked.usage.prompt_tokens
    plain = _chat(server, client, messages=_long_messages(None), max_tokens=1, extra_body={"cache_salt": "opt-none"})
    assert plain.usage.prompt_tokens_details.cache_write_tokens == 0
    server.engine.check_integrity()


@pytest.mark.parametrize("kwargs, mentions, param", [
    ({"messages": _long_messages({"mode": "explicit"}, count=5)}, ("at most 4",), "messages"),
    ({"messages": _long_messages({"mode": "implicit"})}, ("'explicit'",),
     "messages[0].content[0].prompt_cache_breakpoint.mode"),
    ({"messages": _long_messages({"mode": "explicit", "ttl": "1h"})}, ("'30m', '12h'",),
     "messages[0].content[0].prompt_cache_breakpoint.ttl"),
    ({"messages": _long_messages(True)}, ("object",), "messages[0].content[0].prompt_cache_breakpoint"),
    ({"prompt_cache_options": {"mode": "auto"}}, ("'implicit', 'explicit'",), "prompt_cache_options.mode"),
    ({"prompt_cache_options": {"ttl": "24h"}}, ("'30m', '12h'",), "prompt_cache_options.ttl"),
    ({"prompt_cache_options": "explicit"}, ("object",), "prompt_cache_options"),
])
def test_bad_cache_controls_are_400_naming_the_field(server, client, kwargs, mentions, param) -> None:
    _bad(lambda: _chat(server, client, **kwargs), *mentions, param=param)
