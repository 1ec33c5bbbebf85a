"""Query vectors without users: item mixtures.

A build with no users dataset still needs queries (to tune and gate the index, to compare with the
live build). Each query is the normalised mean of 1..max_items random items' vectors, a user who
liked those items, never one item's own vector (each is its own nearest neighbour, which makes recall
look better than it is). The same item positions mix in each build's own space, so two builds are
asked the same question.
"""

from __future__ import annotations

import numpy as np


def mix_positions(n_items: int, n: int, seed: int, max_items: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(item positions (sum of lengths,), per-query offsets (n,)), seeded."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_items + 1, size=n)
    offsets = np.zeros(n, np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    return rng.integers(0, n_items, size=int(lengths.sum())), offsets


def mix(vectors: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(sum of lengths, D) item vectors and per-query offsets -> (n, D) unit-norm means."""
    x = np.add.reduceat(np.asarray(vectors, np.float32), offsets, axis=0)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
