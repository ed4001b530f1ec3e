"""Bad input gets a clear error naming the problem and the limit; the engine stays usable."""

from __future__ import annotations

import pytest
from conftest import tiny_engine

from promptstash.config import EngineConfig
from promptstash.engine.engine import Engine
from promptstash.errors import ContextLengthError, InvalidRequestError


@pytest.fixture(scope="module")
def engine():
    return tiny_engine(kv_cache_tokens=2048, max_model_len=1024)


def _still_works(engine) -> None:
    out = engine.generate([1, 2, 3, 4], max_tokens=2, ignore_eos=True)
    assert len(out.token_ids) == 2
    engine.check_integrity()
    assert not engine.has_unfinished()


@pytest.mark.parametrize("prompt", ["", []])
def test_empty_prompt_is_rejected(engine, prompt) -> None:
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        engine.generate(prompt)
    _still_works(engine)


def test_prompt_longer_than_context_window_names_both_numbers(engine) -> None:
    with pytest.raises(ContextLengthError, match=r"prompt has 1500 tokens; the context window is 1024 tokens"):
        engine.generate([5] * 1500)
    _still_works(engine)


def test_prompt_plus_max_tokens_over_the_window_is_rejected(engine) -> None:
    with pytest.raises(ContextLengthError, match=r"1000 tokens.*max_tokens \(100\).*1024"):
        engine.generate([5] * 1000, max_tokens=100)
    _still_works(engine)


def test_negative_max_tokens_is_rejected(engine) -> None:
    with pytest.raises(InvalidRequestError, match=r"max_tokens must be an integer >= 0, got -1"):
        engine.generate([1, 2, 3], max_tokens=-1)
    _still_works(engine)


def test_token_id_outside_vocabulary_is_rejected(engine) -> None:
    with pytest.raises(InvalidRequestError, match=r"token id 999 is outside the vocabulary \[0, 256\)"):
        engine.generate([1, 999])
    _still_works(engine)


def test_text_prompt_without_tokenizer_is_a_clear_error(engine) -> None:
    with pytest.raises(InvalidRequestError, match="no tokenizer"):
        engine.generate("hello")
    _still_works(engine)


def test_unknown_sampling_option_is_rejected(engine) -> None:
    with pytest.raises(InvalidRequestError, match="unknown sampling option"):
        engine.generate([1, 2], temprature=0.5)
    _still_works(engine)


def test_unknown_engine_option_and_bad_values_are_rejected() -> None:
    with pytest.raises(InvalidRequestError, match="unknown engine option"):
        EngineConfig.from_options(None, blok_size=16)
    with pytest.raises(InvalidRequestError, match="dtype"):
        EngineConfig(dtype="float8")
    with pytest.raises(InvalidRequestError, match="multiple of block_size"):
        EngineConfig(block_size=16, max_prefill_tokens=100)


def test_prompt_larger_than_the_kv_pool_is_rejected() -> None:
    small = tiny_engine(kv_cache_tokens=256)
    with pytest.raises(ContextLengthError, match=r"pool holds \(256 tokens\)"):
        small.generate([3] * 300, max_tokens=1)
    _still_works(small)


def test_unknown_model_path_is_a_clear_error(tmp_path) -> None:
    from promptstash.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="nope"):
        Engine.from_pretrained(str(tmp_path / "nope"))


def test_abort_frees_blocks_at_once(engine) -> None:
    from promptstash.engine.sampling import SamplingParams

    rid = engine.add_request(list(range(200)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.stats().cache.usage.num_in_use > 0
    engine.abort(rid)
    assert engine.stats().cache.usage.num_in_use == 0
    assert engine.completion(rid).finish_reason == "abort"
    _still_works(engine)
