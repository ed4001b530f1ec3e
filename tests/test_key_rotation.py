"""Keys move between positions by one RoPE rotation (groundwork for position-independent modules): a chunk
computed in isolation at position 0 and moved to position p equals the same chunk computed in isolation at p."""

from __future__ import annotations

import pytest
import torch
from conftest import our_model, tiny_hf_model

from promptstash.models.llama import KVCache, LlamaModel, SeqAttention, StepBatch

pytestmark = pytest.mark.timeout(60)


def isolated_kv(model: LlamaModel, token_ids: list[int], start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of every layer for token_ids computed alone (attending only to themselves) at start..start+n-1."""
    n = len(token_ids)
    kv = KVCache(model.config, 1, n, model.dtype, model.device)
    slots = torch.arange(n)
    batch = StepBatch(input_ids=torch.tensor(token_ids), positions=torch.arange(start, start + n),
                      slot_mapping=slots, seqs=(SeqAttention(0, n, slots, 0, None, causal=True),),
                      logits_indices=torch.tensor([n - 1]))
    model.forward(batch, kv)
    return kv.k.clone(), kv.v.clone()  # [layers, n, H_kv, D]


@pytest.mark.parametrize("shift", [1, 15, 16, 37, 500, 3000])
def test_a_chunk_computed_at_0_and_moved_to_p_equals_the_chunk_computed_at_p(family: str, shift: int) -> None:
    model = our_model(tiny_hf_model(family))  # llama: llama3 RoPE scaling; qwen2: plain RoPE with q/k/v bias
    token_ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(shift)).tolist()
    k0, v0 = isolated_kv(model, token_ids, 0)
    kp, vp = isolated_kv(model, token_ids, shift)
    torch.testing.assert_close(model.move_keys(k0, shift), kp, atol=1e-4, rtol=0)
    torch.testing.assert_close(v0, vp, atol=1e-4, rtol=0)
    assert not torch.allclose(k0, kp, atol=1e-3)  # the keys did need moving


def test_moving_keys_there_and_back_is_the_identity(family: str) -> None:
    model = our_model(tiny_hf_model(family))
    k, _ = isolated_kv(model, list(range(20)), 0)
    torch.testing.assert_close(model.move_keys(model.move_keys(k, 1234), -1234), k, atol=1e-5, rtol=0)
