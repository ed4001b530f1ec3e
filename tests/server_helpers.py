"""A live server on a free loopback port (real uvicorn, real HTTP), and a tiny chat model to put behind it."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from conftest import our_model, tiny_hf_model
from test_tokenizer import build_tokenizer_dir

from promptstash.config import EngineConfig, ServerConfig
from promptstash.engine.engine import Engine
from promptstash.models.tokenizer import Tokenizer
from promptstash.server.app import create_app


class FakeClock:
    """An injectable monotonic clock: tests move time forward instead of sleeping."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def tiny_chat_engine(tmp_dir: Path, clock=time.monotonic, **options) -> Engine:
    """A random-weight qwen2 model with a real (tiny BPE, ChatML) tokenizer: fast, and chat-capable."""
    tokenizer = Tokenizer.from_dir(build_tokenizer_dir(tmp_dir))
    options.setdefault("kv_cache_tokens", 8192)
    options.setdefault("max_prefill_tokens", 128)
    config = EngineConfig(dtype="float32", **options)
    model = our_model(tiny_hf_model("qwen2", vocab_size=tokenizer.vocab_size))
    return Engine(model, tokenizer, config, model_id="tiny-chat@test", clock=clock)


def twin_engine(engine: Engine) -> Engine:
    """An engine on the same weights and tokenizer with a pool of its own (and no tiers): where a test computes a
    reference in-process. NOTE: not the served engine itself: a server's loop owns the engine it serves and aborts
    every running request none of its clients submitted, so a reference run on it can lose its request."""
    config = dataclasses.replace(engine.config, kv_disk_dir=None, redis_url=None)
    return Engine(engine.model, engine.tokenizer, config, model_id=engine.model_id)


class LiveServer:
    """Serve an engine over HTTP from a background thread; `url` is http://127.0.0.1:PORT."""

    def __init__(self, engine: Engine, config: ServerConfig | None = None) -> None:
        self.engine = engine
        self.app = create_app(engine, config)
        self.state = self.app.state.promptstash
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                                     access_log=False))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


class ErrorRecords(logging.Handler):
    """Collects ERROR records."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def no_errors_logged(*logger_names: str) -> Iterator[ErrorRecords]:
    """Fail unless nothing logs an ERROR on these loggers inside the block (a 500, a failed step...)."""
    handler = ErrorRecords()
    loggers = [logging.getLogger(name) for name in logger_names]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert not handler.records, [r.getMessage() for r in handler.records]
