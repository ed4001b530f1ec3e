"""deploy/haproxy.cfg's routing, with a real HAProxy in front of three live tiny-model servers: requests sharing
a prompt_cache_key, a user or a system prompt land on one replica, whatever the API shape; streams pass through;
a replica that goes away is taken out by the health check without a failed request. (The same with the real model,
Redis Cluster and `promptstash serve` processes: tests/test_cluster.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from server_helpers import LiveServer, tiny_chat_engine

from promptstash.config import ServerConfig
from promptstash.deploy.haproxy import HAProxyConfig, Replica, check, haproxy_binary, render
from promptstash.deploy.local import HAProxyProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
REPLICA_HEADER = "x-promptstash-replica"

pytestmark = pytest.mark.skipif(haproxy_binary() is None,
                                reason="haproxy is not installed; `make test` installs it (apt-get install haproxy)")


def test_the_shipped_haproxy_cfg_is_what_render_writes_and_haproxy_accepts_it(tmp_path) -> None:
    shipped = (ROOT / "deploy" / "haproxy.cfg").read_text()
    assert shipped == render(HAProxyConfig.example()), "deploy/haproxy.cfg is stale: write render(example()) to it"
    for affinity in (True, False):
        path = tmp_path / f"{affinity}.cfg"
        path.write_text(render(HAProxyConfig(HAProxyConfig.example().replicas, affinity=affinity)))
        check(path)  # raises with HAProxy's own words


class Fleet:
    """Three tiny live servers behind one HAProxy."""

    def __init__(self, tmp_path: Path, affinity: bool = True) -> None:
        self.servers = [LiveServer(tiny_chat_engine(tmp_path / f"tok{i}"), ServerConfig(replica_id=f"replica{i}"))
                        for i in range(3)]
        for server in self.servers:
            server.__enter__()
        replicas = tuple(Replica(f"replica{i}", "127.0.0.1", int(s.url.rsplit(":", 1)[1]))
                         for i, s in enumerate(self.servers))
        port, stats = free_port(), free_port()
        self.proxy = HAProxyProcess(HAProxyConfig(replicas, bind=f"127.0.0.1:{port}", affinity=affinity,
                                                  stats_bind=f"127.0.0.1:{stats}", check_interval_ms=200),
                                    tmp_path / "haproxy")
        self.proxy.start()
        self.proxy.wait_up({r.name for r in replicas})
        self.client = httpx.Client(base_url=self.proxy.url, timeout=60)

    def post(self, path: str, body: dict) -> tuple[int, str]:
        r = self.client.post(path, json=body)
        return r.status_code, r.headers.get(REPLICA_HEADER, "")

    def close(self) -> None:
        self.client.close()
        self.proxy.stop()
        for server in self.servers:
            server.__exit__()


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path)
    yield f
    f.close()


def chat(content: str, system: str | None = None, **extra) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return {"model": "default", "messages": messages, "max_tokens": 1, **extra}


def landed(fleet: Fleet, path: str, bodies: list[dict]) -> list[str]:
    out = []
    for body in bodies:
        status, replica = fleet.post(path, body)
        assert status == 200, (path, body)
        out.append(replica)
    return out


@pytest.mark.slow
def test_requests_sharing_a_key_user_or_system_prompt_land_on_one_replica_and_different_ones_spread(fleet) -> None:
    # prompt_cache_key wins over everything else, wherever it is in the body
    same_key = landed(fleet, "/v1/chat/completions",
                      [chat(f"question {i}", system=f"system {i}", prompt_cache_key="team-a") for i in range(6)])
    assert len(set(same_key)) == 1 and same_key[0]
    keys = landed(fleet, "/v1/chat/completions", [chat("q", prompt_cache_key=f"key-{i}") for i in range(12)])
    assert len(set(keys)) >= 2, keys
    # then `user`
    users = landed(fleet, "/v1/chat/completions", [chat(f"q{i}", system=f"s{i}", user="alice") for i in range(4)])
    assert len(set(users)) == 1
    # then the system prompt's start (OpenAI chat; Anthropic system as string and as blocks; Responses instructions)
    system = "You are the support assistant of ACME. " * 10
    by_system = landed(fleet, "/v1/chat/completions", [chat(f"question {i}", system=system) for i in range(4)])
    by_system += landed(fleet, "/v1/messages", [{"model": "default", "max_tokens": 1, "system": system,
                                                 "messages": [{"role": "user", "content": f"q{i}"}]}
                                                for i in range(2)])
    by_system += landed(fleet, "/v1/messages", [{"model": "default", "max_tokens": 1,
                                                 "system": [{"type": "text", "text": system}],
                                                 "messages": [{"role": "user", "content": "q"}]}])
    by_system += landed(fleet, "/v1/responses", [{"model": "default", "max_output_tokens": 16,
                                                  "instructions": system, "input": f"q{i}"} for i in range(2)])
    assert len(set(by_system)) == 1, by_system
    systems = landed(fleet, "/v1/chat/completions", [chat("q", system=f"Prompt number {i}.") for i in range(12)])
    assert len(set(systems)) >= 2, systems
    # only the first PREFIX_BYTES count: a long document that differs after them stays on its replica
    doc = "d" * 1024
    tails = landed(fleet, "/v1/chat/completions", [chat(doc + f" part {i}") for i in range(4)])
    assert len(set(tails)) == 1


@pytest.mark.slow
def test_round_robin_spreads_one_key_over_every_replica(tmp_path) -> None:
    fleet = Fleet(tmp_path, affinity=False)
    try:
        got = landed(fleet, "/v1/chat/completions", [chat("q", prompt_cache_key="team-a") for _ in range(6)])
        assert set(got) == {"replica0", "replica1", "replica2"}
    finally:
        fleet.close()


@pytest.mark.slow
def test_a_stream_passes_through_haproxy_event_by_event(fleet) -> None:
    body = chat("tell me a story", prompt_cache_key="s", stream=True, max_tokens=8)
    with fleet.client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert len(chunks) >= 3  # the role, at least one token, the finish


@pytest.mark.slow
def test_a_replica_that_goes_away_is_taken_out_and_its_keys_are_served_by_the_others(fleet) -> None:
    keys = [f"key-{i}" for i in range(12)]
    before = dict(zip(keys, landed(fleet, "/v1/chat/completions", [chat("q", prompt_cache_key=k) for k in keys]),
                      strict=True))
    victim = before["key-0"]
    index = int(victim.removeprefix("replica"))
    fleet.servers[index].__exit__()
    # right away (before any health check noticed): a refused connection is retried on another replica
    after = dict(zip(keys, landed(fleet, "/v1/chat/completions", [chat("q", prompt_cache_key=k) for k in keys]),
                     strict=True))
    assert victim not in after.values()
    assert fleet.proxy.wait_down(victim, timeout_s=10) < 10
    # consistent hashing: only the victim's keys moved
    assert all(after[k] == before[k] for k in keys if before[k] != victim)
