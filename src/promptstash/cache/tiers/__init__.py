"""Slower stores of KV blocks keyed by block hash: local disk, Redis. They know nothing of the model:
they store and return opaque entries (see entry.py), and never raise on a backend failure."""
