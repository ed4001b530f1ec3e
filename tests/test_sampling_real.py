"""Sampling features on the real default model, float32: n > 1 computes the prompt once, and logprobs match a
recomputation. (Constrained output and tool calls identical with caching on and off: through the APIs, in
test_server_openai_real.py, test_server_anthropic_tools_real.py and test_server_responses_real_model.py.)"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.timeout(600)]

from real_model_helpers import engines  # noqa: E402


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
