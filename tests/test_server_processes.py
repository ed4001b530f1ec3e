"""Real `promptstash serve` processes: a restart on the same cache directory serves a cached prefix from
disk, and two servers on one Redis share prefixes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from redis_helpers import free_port
from test_hf_directory import _save_tiny_checkpoint

pytestmark = pytest.mark.slow  # server subprocesses

PROMPT = "hello world, this is a tiny corpus. " * 40


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-model")
    _save_tiny_checkpoint("qwen2", path)
    return path


class ServerProcess:
    def __init__(self, model_dir: Path, cache_dir: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "promptstash.cli", "serve", "--model", str(model_dir), "--port", str(self.port),
               "--dtype", "float32", "--kv-cache-tokens", "4096", "--cache-dir", str(cache_dir), *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, f"server exited: {self.proc.stdout.read()}"
            assert time.monotonic() < deadline, "server did not start in 60 s"
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)

    def complete(self, prompt: str = PROMPT, **extra) -> dict:
        body = {"model": "default", "prompt": prompt, "max_tokens": 8, "temperature": 0, **extra}
        response = httpx.post(self.url + "/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    def stats(self) -> dict:
        return httpx.get(self.url + "/v1/cache/stats").json()

    def stop(self) -> int:
        """SIGTERM, as a service manager would; returns the exit code (uvicorn shuts down gracefully, then
        re-raises the signal, so -SIGTERM is a clean exit)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self.proc.stdout.close()


def test_restart_on_the_same_cache_dir_serves_the_prefix_from_disk(model_dir, tmp_path) -> None:
    first = ServerProcess(model_dir, tmp_path / "kv")
    try:
        cold = first.complete()
    finally:
        assert first.stop() in (0, -signal.SIGTERM)
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    second = ServerProcess(model_dir, tmp_path / "kv")
    try:
        warm = second.complete()
        stats = second.stats()
        metrics = httpx.get(second.url + "/metrics").text
    finally:
        second.stop()
    prompt_len = warm["usage"]["prompt_tokens"]
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == (prompt_len - 1) // 16 * 16
    assert warm["choices"][0]["text"] == cold["choices"][0]["text"]
    disk = next(t for t in stats["tiers"] if t["name"] == "disk")
    assert disk["num_hits"] >= 1 and disk["num_loaded_blocks"] == (prompt_len - 1) // 16
    assert stats["cached_tokens"] == warm["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert f'promptstash_tier_loaded_blocks_total{{tier="disk"}} {float((prompt_len - 1) // 16)}' in metrics
    assert 'promptstash_tier_entries{tier="disk"}' in metrics and "promptstash_tier_load_seconds_total" in metrics
