"""Semantic cache: serve an earlier response to a paraphrased last user message.

A request whose context (system prompt, tools, earlier turns, model, output-changing sampling parameters)
is identical to an earlier one, and whose last user message is a paraphrase of the earlier one, gets the
earlier response without running the model. "Paraphrase" means: cosine similarity of the two messages'
sentence embeddings (``embedding.load_embedder``) at least the threshold, AND no guard
(``guards.refusal``) refuses the pair (negation, numbers, named entities, quoted code, units, comparisons, and
minimal edits that swap a content word: ``slot``).

Public contract (used by ``promptstash bench semantic``; keep the names stable):
    from promptstash.semantic import DEFAULT_THRESHOLD
    from promptstash.semantic.embedding import load_embedder     # load_embedder().embed(texts) -> (n, 384)
    from promptstash.semantic.guards import refusal, GUARDS      # refusal(earlier, later) -> guard | None
"""

from __future__ import annotations

# NOTE: the benchmark (`promptstash bench semantic`) chooses this value; change it only with its figures.
DEFAULT_THRESHOLD: float = 0.99

__all__ = ["DEFAULT_THRESHOLD"]
