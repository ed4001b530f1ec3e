"""Weight formats (models/quant.py, models/gguf.py): the quantizers, the kernels, Q4_K read exactly, format
choice and errors, and batch invariance: a request's result does not depend on the requests beside it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import LOGIT_TOLERANCE, WEIGHT_FORMATS, tiny_engine

from promptstash.config import EngineConfig
from promptstash.engine.engine import Engine
from promptstash.errors import InvalidRequestError, UnsupportedFormatError
from promptstash.models.quant import (
    QuantLinear,
    check_format,
    quantize_int4,
    quantize_int8,
    supported_formats,
)

CPU = torch.device("cpu")


def _weight(rows: int = 128, cols: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def test_int8_rounds_each_weight_to_half_a_step_of_its_row_scale() -> None:
    w = _weight()
    q = quantize_int8(w)
    assert q.values.dtype == torch.int8 and q.scale.shape == (128,)
    err = (q.dequantize() - w).abs()
    assert (err <= q.scale[:, None] / 2 + 1e-6).all()


def test_int4_rounds_each_weight_to_half_a_step_of_its_group_scale() -> None:
    w = _weight()
    q = quantize_int4(w)
    assert int(q.values.max()) <= 15 and q.scale.shape == (128, 96 // 32)
    err = (q.dequantize() - w).abs().view(128, 3, 32)
    assert (err <= q.scale[..., None] / 2 + 1e-5).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_and_dense_paths_agree_to_bfloat16_rounding(bits: int) -> None:
    w = _weight()
    q = quantize_int8(w) if bits == 8 else quantize_int4(w)
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1))
    kernel = QuantLinear(q, None, CPU, dense_min_rows=1 << 30)(x)
    dense = QuantLinear(q, None, CPU, dense_min_rows=1)(x)
    reference = x @ q.dequantize().t()
    scale = reference.abs().max().item()
    assert (kernel - reference).abs().max().item() <= 0.02 * scale
    assert (dense - reference).abs().max().item() <= 0.02 * scale


def test_int4_unpacks_to_the_values_it_packed() -> None:
    q = quantize_int4(_weight())
    layer = QuantLinear(q, None, CPU, dense_min_rows=1)
    scale_zero = layer.scale_zero.float()
    expected = (q.values.float().view(128, 3, 32) - 8) * scale_zero[..., 0].t()[..., None] \
        + scale_zero[..., 1].t()[..., None]
    assert torch.equal(layer.dequantize(torch.float32), expected.view(128, 96))


def test_quantized_kernel_rows_do_not_depend_on_the_batch() -> None:
    x = torch.randn(12, 96, generator=torch.Generator().manual_seed(2))
    for q in (quantize_int8(_weight()), quantize_int4(_weight())):
        layer = QuantLinear(q, None, CPU, dense_min_rows=1 << 30)
        together = layer(x)
        assert all(torch.equal(together[i:i + 1], layer(x[i:i + 1])) for i in range(12))


def _q4k_blocks(rows: int, blocks: int, seed: int) -> np.ndarray:
    """Random Q4_K super-blocks with finite scales: d, dmin f16 | 12 scale bytes | 128 nibble bytes."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, blocks, 144), dtype=np.uint8)
    raw[..., 0:2] = np.float16(0.01 * rng.random()).reshape(1).view(np.uint8)
    raw[..., 2:4] = np.float16(0.02 * rng.random()).reshape(1).view(np.uint8)
    return raw.reshape(rows, blocks * 144)


def test_q4_k_is_read_into_int4_exactly() -> None:
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize

    from promptstash.models.gguf import q4k_to_int4

    raw = _q4k_blocks(rows=8, blocks=2, seed=3)
    reference = dequantize(raw, gguf.GGMLQuantizationType.Q4_K)
    converted = q4k_to_int4(raw)
    assert converted.values.shape == (8, 512) and converted.group_size == 32
    assert np.abs(converted.dequantize().numpy() - reference).max() <= 1e-6 * max(1.0, np.abs(reference).max())


def test_unknown_weight_format_is_a_clear_error() -> None:
    with pytest.raises(InvalidRequestError, match="weights must be 'auto' or one of .*int4"):
        EngineConfig(weights="int3")
    with pytest.raises(InvalidRequestError, match="run in their own dtype"):
        EngineConfig(weights="bfloat16", dtype="float32")


def test_a_format_the_device_cannot_run_names_the_supported_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    from promptstash.models import quant

    monkeypatch.setattr(quant, "quantized_kernels_work", lambda device_type: False)
    assert supported_formats(CPU) == ("float32", "bfloat16", "float16")
    with pytest.raises(UnsupportedFormatError, match=r"'int4' is not supported on cpu.*supported here: float32"):
        check_format("int4", CPU)
    with pytest.raises(UnsupportedFormatError, match="supported here"):
        Engine.from_pretrained("/nonexistent-model", weights="int8", progress=False)


def test_quantized_formats_are_separate_cache_layouts() -> None:
    layouts = {w: tiny_engine(weights=w).cache.kv_layout for w in WEIGHT_FORMATS}
    assert layouts == {"float32": "bs16/float32", "bfloat16": "bs16/bfloat16", "float16": "bs16/float16",
                       "int8": "bs16/float32/int8", "int4": "bs16/float32/int4"}


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(40)
    return [torch.randint(0, 256, (int(n),), generator=gen).tolist() for n in (37, 5, 90, 16, 61, 23, 130, 8)]


@pytest.mark.parametrize("weights", WEIGHT_FORMATS)
def test_a_request_alone_and_in_a_batch_of_seven_others_gives_the_same_result(family: str, weights: str) -> None:
    prompts = _prompts()
    alone = tiny_engine(family, weights).generate(prompts[0], max_tokens=24, ignore_eos=True, logprobs=1)
    batched = tiny_engine(family, weights).generate_many(prompts, max_tokens=24, ignore_eos=True, logprobs=1)[0]
    assert batched.token_ids == alone.token_ids
    assert alone.logprobs is not None and batched.logprobs is not None
    diff = max(abs(a.logprob - b.logprob) for a, b in zip(alone.logprobs, batched.logprobs, strict=True))
    assert diff <= (1e-4 if weights == "float32" else LOGIT_TOLERANCE[weights])


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_batch_invariant_mode_is_bit_identical_alone_and_in_a_batch(weights: str) -> None:
    prompts = _prompts()
    engines = []
    for _ in range(2):  # what EngineConfig(batch_invariant=True) sets: every batch on the kernels, and
        engine = tiny_engine("qwen2", weights, 1 << 62)  # attention sequence by sequence
        engine.model.batch_invariant = True
        engines.append(engine)
    alone = engines[0].generate(prompts[0], max_tokens=24, ignore_eos=True, logprobs=3)
    batched = engines[1].generate_many(prompts, max_tokens=24, ignore_eos=True, logprobs=3)[0]
    assert batched.token_ids == alone.token_ids
    assert batched.logprobs == alone.logprobs


def test_fused_projections_of_mixed_widths_are_held_at_the_wider_one() -> None:
    from conftest import our_model, tiny_hf_model  # noqa: I001

    from promptstash.models.llama import LlamaModel

    hf = tiny_hf_model("qwen2")
    reference = our_model(hf, weights="int8")
    weights = dict(hf.state_dict())
    p = "model.layers.0.self_attn."
    weights[p + "q_proj.weight"] = quantize_int4(weights[p + "q_proj.weight"])  # a 4-bit tensor in the file
    weights[p + "v_proj.weight"] = quantize_int8(weights[p + "v_proj.weight"])  # beside an 8-bit one
    model = LlamaModel(reference.config, weights, torch.float32, CPU, "int4")
    assert model.layers[0].qkv.bits == 8
    assert model.layers[1].qkv.bits == 4


def test_bfloat16_on_a_cpu_without_bf16_instructions_upcasts_by_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import our_model, tiny_hf_model

    from promptstash.models import llama

    monkeypatch.setattr(llama, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(llama, "choose_upcast_min_rows", lambda *shape: 1)  # converted measured faster
    assert our_model(tiny_hf_model("qwen2"), dtype=torch.bfloat16).upcast_min_rows == 1  # decode included
    monkeypatch.setattr(llama, "choose_upcast_min_rows", lambda *shape: llama.UPCAST_MIN_ROWS)
    assert our_model(tiny_hf_model("qwen2"), dtype=torch.bfloat16).upcast_min_rows == 32
    monkeypatch.undo()  # the measurement itself runs on any CPU
    assert llama.choose_upcast_min_rows(64, 128, torch.bfloat16) in (1, llama.UPCAST_MIN_ROWS)
