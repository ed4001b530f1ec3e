"""A real, throwaway redis-server (or Redis Cluster) for tests: loopback only, free ports, no persistence.

    server = RedisServer(tmp_path / "redis")   # started; server.url == "redis://127.0.0.1:PORT/0"
    server.stop(); server.start()              # Redis going away and coming back on the same port
    cluster = RedisClusterServers(tmp_path / "cluster")   # cluster.url == "redis+cluster://127.0.0.1:P,..."

They are promptstash.deploy.local's (what `promptstash route` starts), except that a missing redis-server or
redis-cli skips the test instead of raising (`make test` installs them).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from promptstash.deploy import local
from promptstash.deploy.local import free_port

__all__ = ["RedisClusterServers", "RedisServer", "free_port"]

SKIP_MESSAGE = ("redis-server is not installed, so the Redis tier tests are skipped; `make test` installs it "
                "(or: apt-get install redis-server)")


class RedisServer(local.RedisServer):
    def __init__(self, directory: str | Path | None = None, port: int | None = None, start: bool = True) -> None:
        if local.redis_server_binary() is None:
            pytest.skip(SKIP_MESSAGE)
        super().__init__(directory, port, start)


class RedisClusterServers(local.RedisClusterServers):
    def __init__(self, directory: str | Path, masters: int = 3, create: bool = True, node_timeout_ms: int = 1000,
                 timeout_s: float = 20.0) -> None:
        if local.redis_server_binary() is None or local.redis_cli_binary() is None:
            pytest.skip("redis-server / redis-cli are not installed, so the Redis Cluster tests are skipped; "
                        "`make redis` installs them (or: apt-get install redis-server redis-tools)")
        super().__init__(directory, masters, create, node_timeout_ms, timeout_s)
