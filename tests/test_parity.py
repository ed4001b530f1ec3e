"""Our forward pass against transformers' reference implementation (tiny random-weight models)."""

from __future__ import annotations

import pytest
import torch
from conftest import our_model, tiny_engine, tiny_hf_model

from promptstash.models.quant import quantize


def test_prefill_logits_match_transformers_in_float32(family: str) -> None:
    hf = tiny_hf_model(family)
    engine = tiny_engine(family)
    engine.model = our_model(hf)  # same weights as the reference
    engine.runner.model = engine.model
    ids = torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    ours = engine.prompt_logits(ids).logits
    assert ref.abs().max() > 0.05, "reference logits are degenerate"
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4


def test_greedy_decode_matches_transformers_generate(family: str) -> None:
    hf = tiny_hf_model(family)
    engine = tiny_engine(family)
    engine.model = engine.runner.model = our_model(hf)
    ids = torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, min_new_tokens=24)[0, 70:]
    out = engine.generate(ids, max_tokens=24, ignore_eos=True)
    assert list(out.token_ids) == ref.tolist()


def test_decode_logits_match_transformers_at_every_step(family: str) -> None:
    hf = tiny_hf_model(family)
    engine = tiny_engine(family)
    engine.model = engine.runner.model = our_model(hf)
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    out = engine.generate(ids, max_tokens=10, ignore_eos=True)
    full = ids + list(out.token_ids)
    with torch.no_grad():
        ref = hf(torch.tensor([full])).logits[0, 39:-1]
    ours = engine.prompt_logits(full[:-1]).logits  # second pass reuses the cache: only suffix rows
    cached = len(full) - 1 - ours.shape[0]
    assert (ours - ref[cached - 39:]).abs().max().item() <= 1e-4


def test_bfloat16_upcast_path_matches_native_bfloat16_within_rounding(family: str) -> None:
    hf = tiny_hf_model(family)
    ids = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(4)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    results = {}
    for upcast in (None, 32):
        engine = tiny_engine(family)
        engine.model = engine.runner.model = our_model(hf, dtype=torch.bfloat16)
        engine.kv.k, engine.kv.v = engine.kv.k.bfloat16(), engine.kv.v.bfloat16()
        engine.model.upcast_min_rows = upcast
        results[upcast] = engine.prompt_logits(ids).logits
    scale = ref.abs().max().item()
    for logits in results.values():
        assert (logits - ref).abs().max().item() <= 0.05 * scale  # bfloat16 rounding, not a wrong forward
    assert (results[None] - results[32]).abs().max().item() <= 0.05 * scale


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_prefill_logits_match_transformers_on_the_same_quantized_weights(weights: str) -> None:
    """Our quantized forward against transformers run on the dequantized weights (Qwen2: untied head).

    The embedding is int8 in both quantized formats; activations are rounded to bfloat16 for the kernels, so
    the logits agree within 2% of the largest one.
    """
    hf = tiny_hf_model("qwen2")
    ours = our_model(hf, weights=weights)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if param.dim() == 2:
                fmt = "int8" if name == "model.embed_tokens.weight" else weights
                param.copy_(quantize(param, fmt).dequantize())
    engine = tiny_engine("qwen2", weights)
    engine.model = engine.runner.model = ours
    ids = torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    logits = engine.prompt_logits(ids).logits
    assert (logits - ref).abs().max().item() <= 0.02 * ref.abs().max().item()
