"""Shared fixtures: tiny random-weight Qwen2 / Llama models built with transformers (reference only)."""

from __future__ import annotations

import os

import pytest
import torch

from promptstash.config import DTYPES, EngineConfig
from promptstash.engine.engine import Engine
from promptstash.models.config import ModelConfig
from promptstash.models.llama import LlamaModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6)


def tiny_hf_model(family: str, seed: int = 0, **overrides):
    """A transformers model with random weights: the reference implementation for parity tests."""
    import transformers

    torch.manual_seed(seed)
    if family == "qwen2":
        config = transformers.Qwen2Config(**{**TINY, **overrides}, tie_word_embeddings=False, rope_theta=10000.0)
        model = transformers.Qwen2ForCausalLM(config)
    elif family == "llama":
        config = transformers.LlamaConfig(
            **TINY, tie_word_embeddings=True,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 256},
            rope_theta=500000.0)
        model = transformers.LlamaForCausalLM(config)
    else:
        raise ValueError(family)
    # random init leaves norms at 1 and biases at 0: perturb them so parity checks cover them
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval().float()


def our_model(hf_model, dtype: torch.dtype = torch.float32, device: str = "cpu", weights: str | None = None,
              dense_min_rows: int = 64) -> LlamaModel:
    cfg = hf_model.config.to_dict()
    cfg["architectures"] = [type(hf_model).__name__]
    config = ModelConfig.from_dict(cfg)
    return LlamaModel(config, dict(hf_model.state_dict()), dtype, torch.device(device), weights, dense_min_rows)


# Weight formats of the tiny models, and the tolerance each is held to where two computations of the same
# logits are compared (cache hit vs recomputed, alone vs in a batch). Quantized formats round activations to
# bfloat16 for their kernels, so their logits agree to bfloat16 rounding (relative to the largest logit).
# Half-precision formats hold weights, activations and KV in that dtype: also bfloat16 rounding.
WEIGHT_FORMATS = ("float32", "bfloat16", "float16", "int8", "int4")
LOGIT_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.02, "float16": 0.02, "int8": 0.02, "int4": 0.02}  # times max|logit|


def tiny_engine(family: str = "qwen2", weights: str = "float32", dense_min_rows: int = 64, **options) -> Engine:
    options.setdefault("kv_cache_tokens", 4096)
    options.setdefault("max_prefill_tokens", 64)
    dtype = weights if weights in ("bfloat16", "float16") else "float32"
    config = EngineConfig(dtype=dtype, **options)
    model = our_model(tiny_hf_model(family), dtype=DTYPES[dtype], weights=weights, dense_min_rows=dense_min_rows)
    return Engine(model, None, config, model_id=f"tiny-{family}")


@pytest.fixture(params=["qwen2", "llama"])
def family(request) -> str:
    return request.param


# -- running under pytest-xdist (`make test` runs `pytest -n 2 --dist loadgroup`) ---------------------------------
# Two workers on a 2-core machine. The real-model tests are compute-bound (torch on both cores runs them ~1.75x
# faster than on one), so the float32 ones run in one group, in one worker, on 2 torch threads, after the
# three-replica cluster test (server subprocesses: no engine of the worker's own is loaded meanwhile, so the
# replicas' weights and the worker's never add up). The other formats' engines run in a second group on 1 thread;
# every other test runs on 1 thread (tiny models, servers, subprocesses), in the worker that is free.
# Each group's engines are loaded once (tests/real_model_helpers.py `engines` caches them per process) and freed
# when its worker moves on, so the two workers' real-model weights stay within the machine's memory.
_FLOAT32 = {"test_bench_peers", "test_server_real_model", "test_sampling_real", "test_semantic_real",
            "test_server_openai_real", "test_server_anthropic_tools_real", "test_server_responses_real_model",
            "test_modules_real", "test_server_modules_real"}
HEAVY = "real-float32"  # with test_cluster
_FIRST = (HEAVY, "real-quantized")  # the scheduler hands out groups in collection order: the long ones first
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")


def _xdist_group(item: pytest.Item) -> str:
    """The group of a test: a real-model group, else its module (a module-scoped fixture such as a server or a
    Redis is then set up in one worker only)."""
    module = item.nodeid.partition("::")[0].rpartition("/")[2].removesuffix(".py")
    params = item.callspec.params if hasattr(item, "callspec") else {}
    if module == "test_real_model":  # "default" (int4), bfloat16, int8 and int4 in the quantized group
        return HEAVY if params.get("weights", params.get("dtype")) == "float32" else "real-quantized"
    if module == "test_bench_peers":  # only its llama.cpp comparison runs the shared float32 engine
        return HEAVY if item.name.startswith("test_float32_") else module
    if module in _FLOAT32 or module == "test_cluster":
        return HEAVY
    if module == "test_frameworks":  # engines("default")
        return "real-quantized"
    return module


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _WORKER:
        return
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_xdist_group(item)))
    rank = {name: i for i, name in enumerate(_FIRST)}
    # the cluster test first in its group; otherwise file order (a stable sort)
    items.sort(key=lambda item: (rank.get(_xdist_group(item), len(_FIRST)), "test_cluster.py" not in item.nodeid))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if _WORKER:
        torch.set_num_threads(2 if _xdist_group(item) == HEAVY else 1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    """Under xdist, a worker done with a real-model group frees its engines (after the group's module fixtures,
    servers included, are torn down)."""
    yield
    if _WORKER and _xdist_group(item).startswith("real-") and (
            nextitem is None or _xdist_group(nextitem) != _xdist_group(item)):
        from real_model_helpers import release_engines

        release_engines()
