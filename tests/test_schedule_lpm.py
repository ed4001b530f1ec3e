"""Cache-aware admission (engine/scheduler.py, schedule="lpm"): the longest cached prefix goes first, no
request is passed over beyond max_wait_s, and a shared uncomputed prefix is still computed once. The real
Scheduler and CacheManager run on a simulated clock: one step = one second."""

from __future__ import annotations

import pytest

from promptstash.cache.manager import CacheManager
from promptstash.engine.request import Request, RequestStatus, StopChecker
from promptstash.engine.sampling import SamplingParams
from promptstash.engine.scheduler import Scheduler

BS = 4


class Sim:
    def __init__(self, schedule: str, max_num_seqs: int = 1, max_wait_s: float = 5.0,
                 max_prefill_tokens: int = 64) -> None:
        self.now = 0.0
        self.cache = CacheManager(256, BS, "m", "bs4/float32")
        self.sched = Scheduler(self.cache, max_num_seqs, max_prefill_tokens, schedule=schedule,
                               max_wait_s=max_wait_s, clock=lambda: self.now)
        self.admitted_at: dict[str, float] = {}
        self.num_prompt_tokens_computed = 0
        self._next = 0

    def add(self, prompt: list[int], max_tokens: int = 2) -> Request:
        self._next += 1
        request = Request(f"r{self._next}", prompt, SamplingParams(max_tokens=max_tokens), "t", "t",
                          StopChecker(None, ()), frozenset(), arrival_time=self.now)
        self.sched.add(request)
        return request

    def step(self) -> None:
        """Like Engine.run_step: commit each chunk; a chunk reaching the end samples a token (or finishes)."""
        for chunk in self.sched.schedule():
            request = chunk.request
            self.admitted_at.setdefault(request.request_id, self.now)
            self.num_prompt_tokens_computed += max(0, min(chunk.end, request.prompt_len) - chunk.start)
            request.num_computed = chunk.end
            self.cache.commit(request.request_id, request.token_ids, chunk.end)
            if chunk.end == len(request.token_ids):
                if request.num_output_tokens + 1 >= request.sampling.max_tokens:
                    self.sched.finish(request)
                else:
                    request.token_ids.append(7)
        self.cache.check_integrity()
        self.now += 1.0


PREFIX = list(range(100, 132))  # 8 blocks


def _warm(sim: Sim) -> None:
    sim.add(PREFIX + [1])
    while sim.sched.has_unfinished():
        sim.step()


@pytest.mark.parametrize(("schedule", "first"), [("lpm", "hot"), ("fcfs", "cold")])
def test_lpm_admits_the_longest_cached_prefix_first_and_fcfs_the_oldest(schedule: str, first: str) -> None:
    sim = Sim(schedule)
    _warm(sim)
    cold = sim.add(list(range(500, 540)))
    sim.now += 0.5
    hot = sim.add(PREFIX + [2, 3])
    sim.step()
    running = {r.request_id for r in sim.sched.running}
    assert running == {(hot if first == "hot" else cold).request_id}
    assert hot.num_cached_tokens == (32 if first == "hot" else None)


def _starvation_run(max_wait_s: float, num_steps: int = 60) -> tuple[Request, Sim]:
    """A cold request arrives among a steady stream of requests that hit the cache (one slot)."""
    sim = Sim("lpm", max_wait_s=max_wait_s)
    _warm(sim)
    for i in range(3):
        sim.add(PREFIX + [10 + i])
    cold = sim.add(list(range(600, 640)))
    for i in range(num_steps):
        if i % 2 == 0:  # a new hot request every 2 steps: the queue never runs dry of better matches
            sim.add(PREFIX + [20 + i])
        sim.step()
    return cold, sim


def test_a_request_is_never_delayed_beyond_the_maximum_wait() -> None:
    unbounded, _ = _starvation_run(max_wait_s=1e9)
    assert unbounded.status is RequestStatus.WAITING  # without the bound it starves: the test can fail
    max_wait_s, service_s = 5.0, 2.0  # a hot request holds the only slot 2 steps
    cold, sim = _starvation_run(max_wait_s)
    waited = sim.admitted_at[cold.request_id] - cold.arrival_time
    assert waited <= max_wait_s + service_s, f"waited {waited} s"
    assert cold.finished


def test_no_request_is_admitted_while_an_overdue_one_is_passed_over() -> None:
    """The invariant behind the bound: in any step where a request past max_wait_s stays waiting, nothing
    that is not overdue was admitted ahead of it."""
    sim = Sim("lpm", max_num_seqs=2, max_wait_s=3.0)
    _warm(sim)
    checked = 0
    for i in range(80):
        if i % 3 == 0:
            sim.add(list(range(1000 + 50 * i, 1030 + 50 * i)))  # cold
        sim.add(PREFIX + [30 + i])  # hot: arrivals outpace the two slots, so requests queue up
        before = {r.request_id: r for r in sim.sched.waiting}
        sim.step()
        admitted = [r for rid, r in before.items() if rid in sim.admitted_at and r.status is not RequestStatus.WAITING]
        overdue_left = [r for r in sim.sched.waiting if r.request_id in before
                        and sim.now - 1.0 - r.arrival_time >= sim.sched.max_wait_s]
        if overdue_left:
            checked += 1
            assert all(sim.now - 1.0 - r.arrival_time >= sim.sched.max_wait_s for r in admitted)
    assert checked > 10


def test_requests_sharing_an_uncomputed_prefix_compute_it_once_under_lpm() -> None:
    sim = Sim("lpm", max_num_seqs=4, max_prefill_tokens=8)
    shared = list(range(300, 364))  # 16 blocks, nowhere in the cache yet
    a, b = sim.add(shared + [1, 2]), sim.add(shared + [3, 4])
    while sim.sched.has_unfinished():
        sim.step()
    assert b.num_cached_tokens is not None and a.num_cached_tokens is not None
    assert sim.num_prompt_tokens_computed < len(shared) + 2 * 8  # the shared part once, two short tails
    assert max(a.num_cached_tokens, b.num_cached_tokens) >= len(shared) - BS  # one of them reused it
