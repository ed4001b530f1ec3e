"""HAProxy in front of promptstash replicas, routing requests that share a prompt start to the same replica.

A replica reuses K/V from its own pool far faster than from the shared tier (Redis), and far faster than
recomputing, so a load balancer should send requests that share a prefix to one replica. HAProxy (2.6 or newer)
does it with no code of ours: it buffers the request body, reads an affinity key from the JSON with
`json_query`, and hashes the key onto the replicas with consistent hashing:

    affinity key, the first that the body has:
      1. prompt_cache_key                       (OpenAI chat / completions / responses: the user's own routing key)
      2. user, metadata.user_id                 (OpenAI `user`; Anthropic's metadata.user_id)
      3. the first PREFIX_BYTES bytes of the system prompt or first message:
         system | system[0].text | instructions | messages[0].content | messages[0].content[0].text |
         input | input[0].content | input[0].content[0].text | prompt
      none of them (a GET, a body over tune.bufsize with no key in its first part): round robin

    key --hash (consistent: a replica that goes down moves only its own keys)--> replica

Health checks GET /health every second; two failures take a replica out, two successes put it back, and a
connection refused takes it out at once (observe layer4). A request whose connection fails, or that gets an empty
reply from a replica that died under it, is sent again to another replica (retry-on + redispatch): killing a
replica loses no request that had not started streaming. Streams pass through unbuffered.

`render(HAProxyConfig(...))` writes the whole file; deploy/haproxy.cfg in the repository is
`render(HAProxyConfig.example())` (a test keeps them equal), and `promptstash route` renders one for the replicas
it starts.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from promptstash.errors import PromptstashError

PREFIX_BYTES = 1024  # ~250 tokens: enough to tell system prompts apart, short enough to survive small edits later on
BODY_BUFFER_BYTES = 512 * 1024
KEY_PATHS = ("$.prompt_cache_key", "$.user", "$.metadata.user_id")
PREFIX_PATHS = ("$.system", "$.system[0].text", "$.instructions", "$.messages[0].content",
                "$.messages[0].content[0].text", "$.input", "$.input[0].content", "$.input[0].content[0].text",
                "$.prompt")


class HAProxyError(PromptstashError):
    """HAProxy is missing, or rejected a configuration."""


@dataclass(frozen=True)
class Replica:
    name: str  # the server name in HAProxy (and a good --replica-id)
    host: str
    port: int


@dataclass(frozen=True)
class HAProxyConfig:
    replicas: tuple[Replica, ...]
    bind: str = "127.0.0.1:8000"
    affinity: bool = True  # False: round robin (for comparisons)
    stats_bind: str | None = "127.0.0.1:8404"  # HAProxy's own status page; None = none
    check_interval_ms: int = 1000
    # bounded-load consistent hashing: no replica takes more than this % of the average load of in-flight
    # requests; a hot key spills to the next replica instead of queueing. None = pure hashing
    balance_factor: int | None = 150
    prefix_bytes: int = PREFIX_BYTES
    body_buffer_bytes: int = BODY_BUFFER_BYTES
    max_connections: int = 512
    extra_global: tuple[str, ...] = field(default=())

    @classmethod
    def example(cls) -> HAProxyConfig:
        """deploy/haproxy.cfg: three replicas on this machine, as `promptstash route --replicas 3` starts them."""
        return cls(tuple(Replica(f"replica{i}", "127.0.0.1", 8000 + i) for i in (1, 2, 3)))


def render(config: HAProxyConfig) -> str:
    """The haproxy.cfg text for `config`."""
    if not config.replicas:
        raise HAProxyError("an HAProxy configuration needs at least one replica")
    lines = [
        "# promptstash replicas behind HAProxy with cache-affinity routing (HAProxy 2.6+).",
        "# Written by promptstash.deploy.haproxy.render(); README \"Running several replicas\" explains it.",
        "# Edit the `server` lines for your replicas, then: haproxy -f haproxy.cfg",
        "",
        "global",
        f"    maxconn {config.max_connections}",
        "    # request bodies are buffered whole up to this size so that json_query can read them; a longer body is",
        "    # routed by what its first part holds (put prompt_cache_key early, or keep bodies under it)",
        f"    tune.bufsize {config.body_buffer_bytes}",
        *(f"    {line}" for line in config.extra_global),
        "",
        "defaults",
        "    mode http",
        "    option http-buffer-request",
        "    option forwardfor",
        "    timeout connect 2s",
        "    timeout client 10m",
        "    timeout server 10m  # a long generation, or a stream between two tokens",
        "    timeout http-request 60s",
        "    timeout queue 60s",
        "    # a connection refused, or a replica that died before answering: send the request to another one",
        "    retries 3",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response",
        "",
        "frontend promptstash",
        f"    bind {config.bind}",
    ]
    if config.affinity:
        lines.append("    # affinity key: prompt_cache_key, else user, else the system prompt / 1st message start")
        first = True
        for path in KEY_PATHS:
            lines.append(_set_key(f"req.body,json_query('{path}')", first))
            first = False
        for path in PREFIX_PATHS:
            lines.append(_set_key(f"req.body,json_query('{path}'),bytes(0,{config.prefix_bytes})", first))
    lines += ["    default_backend replicas", "", "backend replicas"]
    if config.affinity:
        lines += ["    balance hash var(txn.affinity)  # no key found: round robin",
                  "    hash-type consistent"]
        if config.balance_factor is not None:
            lines.append(f"    hash-balance-factor {config.balance_factor}")
    else:
        lines.append("    balance roundrobin")
    lines += [
        "    option httpchk GET /health",
        "    http-check expect status 200",
        f"    default-server check inter {config.check_interval_ms}ms fall 2 rise 2 "
        "observe layer4 error-limit 1 on-error mark-down",
        *(f"    server {r.name} {r.host}:{r.port}" for r in config.replicas),
    ]
    if config.stats_bind is not None:
        lines += ["", "listen stats", f"    bind {config.stats_bind}", "    stats enable", "    stats uri /",
                  "    stats refresh 5s"]
    return "\n".join(lines) + "\n"


def _set_key(sample: str, first: bool) -> str:
    line = f"    http-request set-var(txn.affinity) {sample}"
    return line if first else line + " unless { var(txn.affinity) -m found }"


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if Path(p).exists()), None)


def check(path: Path) -> None:
    """`haproxy -c`: raises HAProxyError with HAProxy's own words when the file is not valid."""
    binary = haproxy_binary()
    if binary is None:
        raise HAProxyError("haproxy is not installed (Debian: apt-get install haproxy; `make cluster` installs it)")
    out = subprocess.run([binary, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise HAProxyError(f"haproxy rejected {path}:\n{(out.stdout + out.stderr).strip()}")
