"""Regression tests for the engine-side defects of the hardening issue: each is named after the defect it
proves fixed (a tiny temperature hung a request, errors while sampling stalled it, the loop spun, in-flight
slots leaked on disconnects, tier loads ran under the engine lock, one tenant could take every slot)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from conftest import our_model, tiny_engine, tiny_hf_model

from promptstash.cache.tiers.disk import DiskTier
from promptstash.config import EngineConfig
from promptstash.engine import engine as engine_module
from promptstash.engine.engine import Engine, StepResult
from promptstash.engine.sampling import MIN_TEMPERATURE, SamplingParams
from promptstash.server.loop import EngineLoop, TenantQueueFullError

pytestmark = pytest.mark.timeout(60)


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("temperature", [1e-300, 1e-45, 1e-39, 5e-324, MIN_TEMPERATURE / 2])
def test_tiny_temperature_is_greedy_instead_of_hanging_the_request(temperature: float) -> None:
    engine = tiny_engine()
    prompt = _tokens(40, 1)
    out = engine.generate(prompt, max_tokens=6, temperature=temperature, seed=3, ignore_eos=True)
    greedy = engine.generate(prompt, max_tokens=6, temperature=0.0, ignore_eos=True)
    assert out.finish_reason == "length" and out.token_ids == greedy.token_ids
    assert not engine.has_unfinished()


def test_an_exception_while_sampling_finishes_the_request_with_an_error_and_the_engine_keeps_serving(
        monkeypatch) -> None:
    engine = tiny_engine()
    updates = []
    rid = engine.add_request(_tokens(30, 2), SamplingParams(max_tokens=5), on_update=updates.append)

    def broken(*args, **kwargs):
        raise RuntimeError("probability tensor contains inf")

    with monkeypatch.context() as m:
        m.setattr(engine_module, "sample", broken)
        result = engine.run_step()
    assert result.num_scheduled == 1
    done = engine.completion(rid)
    assert done.finish_reason == "error" and "probability tensor contains inf" in done.error
    assert updates[-1].finished and updates[-1].completion == done
    assert not engine.has_unfinished() and engine.stats().num_errors == 1
    assert engine.stats().cache.usage.num_in_use == 0
    engine.check_integrity()
    assert engine.generate(_tokens(30, 2), max_tokens=3, ignore_eos=True).finish_reason == "length"


def test_a_failing_model_step_finishes_its_requests_with_an_error_instead_of_raising(monkeypatch) -> None:
    engine = tiny_engine()
    rid = engine.add_request(_tokens(30, 3), SamplingParams(max_tokens=5))

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine.runner, "run", broken)
    engine.run_step()
    assert engine.completion(rid).finish_reason == "error"
    assert engine.stats().cache.usage.num_in_use == 0 and not engine.has_unfinished()


def test_engine_loop_sleeps_instead_of_spinning_when_a_step_schedules_nothing(monkeypatch) -> None:
    engine = tiny_engine()
    calls = []

    def nothing_to_do() -> StepResult:
        calls.append(time.monotonic())
        return StepResult((), 0)

    monkeypatch.setattr(engine, "run_step", nothing_to_do)
    engine.add_request(_tokens(10, 4), SamplingParams(max_tokens=1))  # unfinished, but never scheduled
    loop = EngineLoop(engine, 16)
    cpu0 = time.thread_time()
    loop.start()
    time.sleep(1.5)
    loop.stop()
    assert len(calls) <= 5, f"{len(calls)} steps in 1.5 s: the loop spins"
    assert time.thread_time() - cpu0 < 0.5


def test_engine_loop_wakes_at_once_when_a_request_arrives() -> None:
    engine = tiny_engine()
    loop = EngineLoop(engine, 16)
    loop.start()
    try:
        time.sleep(0.3)  # idle: waiting for work
        start = time.monotonic()
        rid = engine.add_request(_tokens(10, 5), SamplingParams(max_tokens=2, ignore_eos=True))
        while engine.has_unfinished():
            assert time.monotonic() - start < 5
            time.sleep(0.005)
        assert time.monotonic() - start < 0.4  # not one IDLE_WAIT_S late
        assert engine.completion(rid).finish_reason == "length"
    finally:
        loop.stop()


def test_in_flight_count_is_the_engines_and_drops_when_an_unread_submission_finishes() -> None:
    """The leak: a streaming response whose body never started (client gone) never released its slot."""
    engine = tiny_engine()

    async def scenario() -> tuple[int, int]:
        loop = EngineLoop(engine, 4)
        loop.start()
        try:
            for i in range(3):  # submitted, and nobody ever reads them
                await loop.submit(_tokens(20, 10 + i), SamplingParams(max_tokens=4, ignore_eos=True),
                                  namespace="t", tenant="t")
            during = loop.num_active
            deadline = time.monotonic() + 10
            while loop.num_active:
                assert time.monotonic() < deadline, "in-flight count leaked"
                await asyncio.sleep(0.02)
            return during, loop.num_active
        finally:
            loop.stop()

    during, after = asyncio.run(scenario())
    assert during >= 1 and after == 0
    assert engine.stats().cache.usage.num_in_use == 0


def test_stream_idle_timeout_aborts_a_request_whose_reader_never_reads() -> None:
    engine = tiny_engine()

    async def scenario():
        loop = EngineLoop(engine, 4, stream_idle_timeout_s=0.3)
        loop.start()
        try:
            sub = await loop.submit(_tokens(20, 20), SamplingParams(max_tokens=2000, ignore_eos=True),
                                    namespace="t", tenant="t")
            deadline = time.monotonic() + 10
            while engine.has_unfinished():
                assert time.monotonic() < deadline, "the unread stream was not aborted"
                await asyncio.sleep(0.05)
            return loop.num_idle_aborts, await sub.completion()
        finally:
            loop.stop()

    num_aborts, completion = asyncio.run(scenario())
    assert num_aborts == 1 and completion.finish_reason == "abort"
    assert completion.usage.completion_tokens < 2000
    assert engine.stats().cache.usage.num_in_use == 0


def test_periodic_check_aborts_an_engine_request_that_no_submission_tracks() -> None:
    engine = tiny_engine()
    loop = EngineLoop(engine, 4)
    rid = engine.add_request(_tokens(20, 30), SamplingParams(max_tokens=1000, ignore_eos=True))
    loop.check()
    assert loop.num_reconciled == 1 and engine.completion(rid).finish_reason == "abort"


def test_tenant_max_queued_refuses_a_tenants_extra_requests_but_not_other_tenants() -> None:
    engine = tiny_engine()

    async def scenario():
        loop = EngineLoop(engine, 16, tenant_max_queued=2)  # not started: requests stay queued
        params = SamplingParams(max_tokens=1)
        for i in range(2):
            await loop.submit(_tokens(10, i), params, namespace="a", tenant="a")
        with pytest.raises(TenantQueueFullError, match="per-key limit 2"):
            await loop.submit(_tokens(10, 9), params, namespace="a", tenant="a")
        await loop.submit(_tokens(10, 9), params, namespace="b", tenant="b")
        return loop.num_active

    assert asyncio.run(scenario()) == 3


def test_tenant_max_running_lets_other_tenants_requests_go_first() -> None:
    engine = tiny_engine(max_num_seqs=4, tenant_max_running=1)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    hog = [engine.add_request(_tokens(20, i), params, namespace="hog") for i in range(3)]
    other = engine.add_request(_tokens(20, 99), params, namespace="other")
    engine.step()
    running = {r.request_id for r in engine.scheduler.running}
    assert running == {hog[0], other}  # one of the hog's, and the other tenant's despite arriving last
    engine.run_until_done(hog + [other])


class SlowDiskTier(DiskTier):
    """A disk tier whose reads wait for `gate` (a slow network store), then take `delay_s` each."""

    delay_s = 0.0
    gate: threading.Event | None = None

    def get(self, block_hash: bytes) -> bytes | None:
        if self.gate is not None:
            self.gate.wait(30)
        time.sleep(self.delay_s)
        return super().get(block_hash)

    def contains(self, block_hash: bytes) -> bool:
        time.sleep(self.delay_s)
        return super().contains(block_hash)


def test_a_request_loading_from_a_slow_tier_does_not_stall_running_requests(tmp_path) -> None:
    weights = our_model(tiny_hf_model("qwen2"))
    config = EngineConfig(dtype="float32", max_prefill_tokens=64, kv_cache_tokens=2048, kv_disk_dir=str(tmp_path))
    writer = Engine(weights, None, config, model_id="tiny@slow")
    long_prompt = _tokens(400, 40)
    writer.generate(long_prompt, max_tokens=1)
    writer.close()

    engine = Engine(weights, None, config, model_id="tiny@slow")
    runner_done = threading.Event()
    runner = engine.add_request(_tokens(20, 41), SamplingParams(max_tokens=30, ignore_eos=True),
                                on_update=lambda u: u.finished and runner_done.set())
    while engine.stats().num_loading:  # the runner itself goes through the (empty) tier lookup first
        engine.wait_for_work(0.05)
    tier = engine.kv_store.chain.tiers[0]
    tier.__class__ = SlowDiskTier
    tier.gate = threading.Event()  # every tier read blocks until the runner is done
    loader = engine.add_request(long_prompt + [1, 2, 3], SamplingParams(max_tokens=1))
    while not engine.stats().num_loading:
        time.sleep(0.001)
    num_steps = 0
    while not runner_done.is_set():
        assert engine.stats().num_loading == 1, "the load finished although its reads are blocked"
        num_steps += engine.run_step().num_scheduled
    assert num_steps >= 29  # the runner decoded all its tokens while the loader's reads were blocked
    tier.gate.set()
    done = engine.run_until_done([runner, loader])
    assert done[0].usage.completion_tokens == 30
    assert done[1].usage.cached_tokens == 400 // 16 * 16
    engine.check_integrity()
    engine.close()


def test_locating_a_prefix_in_a_slow_tier_does_not_hold_the_engine_lock(tmp_path) -> None:
    weights = our_model(tiny_hf_model("qwen2"))
    config = EngineConfig(dtype="float32", max_prefill_tokens=64, kv_cache_tokens=2048, kv_disk_dir=str(tmp_path))
    engine = Engine(weights, None, config, model_id="tiny@locate")
    tier = engine.kv_store.chain.tiers[0]
    tier.__class__ = SlowDiskTier
    tier.delay_s = 1.0
    thread = threading.Thread(target=engine.locate_prefix, args=(_tokens(64, 50),))
    thread.start()
    time.sleep(0.1)  # locate_prefix is now waiting on the tier
    start = time.monotonic()
    engine.stats()  # takes the engine lock
    assert time.monotonic() - start < 0.5
    thread.join()
    engine.close()
