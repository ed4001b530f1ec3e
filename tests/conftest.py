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
