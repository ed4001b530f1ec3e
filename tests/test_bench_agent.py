"""`promptstash bench agent` on a tiny model: the agent loop over HTTP, caching on vs off, and its report."""

from __future__ import annotations

import dataclasses
import json

from conftest import our_model, tiny_hf_model
from test_tokenizer import build_tokenizer_dir

from promptstash.bench import agent
from promptstash.config import EngineConfig
from promptstash.engine.engine import Engine
from promptstash.models.tokenizer import Tokenizer


def tiny_long_context_engine(tmp_path) -> Engine:
    """The tests' tiny chat model with a 32k window: its tiny BPE spends ~3x the real tokenizer's tokens on the
    tool definitions."""
    tokenizer = Tokenizer.from_dir(build_tokenizer_dir(tmp_path))
    model = our_model(tiny_hf_model("qwen2", vocab_size=tokenizer.vocab_size, max_position_embeddings=32768))
    config = EngineConfig(dtype="float32", kv_cache_tokens=65536, max_prefill_tokens=2048)
    return Engine(model, tokenizer, config, model_id="tiny-chat@test")


def test_agent_loop_on_and_off_and_the_report(tmp_path) -> None:
    on = tiny_long_context_engine(tmp_path)
    off = Engine(on.model, on.tokenizer, dataclasses.replace(on.config, enable_prefix_caching=False), on.model_id)
    records_on, wall_on = agent.run_mode(on, "on", agents=2, steps=2, max_tokens=8, log=lambda m: None)
    records_off, wall_off = agent.run_mode(off, "off", agents=2, steps=2, max_tokens=8, log=lambda m: None)
    assert len(records_on) == len(records_off) == 4
    second = [r for r in records_on if r.step == 2]
    assert all(r.cached_tokens >= r.prompt_tokens // 2 for r in second)  # tools + history reused
    assert all(r.cached_tokens == 0 for r in records_off)
    assert all(r.ttft_s > 0 and r.e2e_s >= r.ttft_s for r in records_on + records_off)
    res = {"setup": {"agents": 2, "steps": 2, "max_tokens": 8, "num_tools": len(agent.TOOLS),
                     "tools_tokens": agent.tools_tokens(on), "model": on.model_id, "dtype": "float32",
                     "block_size": 16, "machine": "test", "python": "3"},
           "on": {**agent.summarize(records_on, 2), "wall_s": wall_on},
           "off": {**agent.summarize(records_off, 2), "wall_s": wall_off},
           "speedup_wall": wall_off / wall_on, "speedup_ttft_mean": 1.0, "identical_calls": 4, "num_requests": 4,
           "records": [dataclasses.asdict(r) for r in records_on + records_off]}
    js, md = agent.write(res, tmp_path / "out")
    assert json.loads(js.read_text())["on"]["per_step"][1]["cached_tokens"] > 0
    assert "| 2 |" in md.read_text() and "Speedup with caching" in md.read_text()


def test_tool_definitions_are_a_long_valid_list() -> None:
    names = [t["function"]["name"] for t in agent.TOOLS]
    assert len(names) == len(set(names)) >= 16
    for t in agent.TOOLS:
        params = t["function"]["parameters"]
        assert set(params["required"]) <= set(params["properties"])
    result = json.loads(agent.fake_result("get_order", '{"order_id": "ORD-1"}', 1, 2))
    assert result["result"]["matched"] == "ORD-1"
