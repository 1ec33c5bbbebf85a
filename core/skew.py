"""Version-skew sensitivity check: how much retrieval degrades when the query tower's version differs
from the index's version, for every pair of checkpoints of one family.

cell (q, i) = users embedded by checkpoint q's user tower, items by checkpoint i's item tower.
Recall@K is measured on held-out interactions; overlap@K against the matched-version retrieval (i, i).
A family passes when every off-diagonal cell's relative recall drop stays within a threshold. Results
live in the registry (`skew/<family>/<check_id>.json`, written by `core.skew_gate`) and gate publishing
and serving. This module runs the evaluation (and so imports training); serving only reads verdicts
through `core.skew_gate`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from core.checkpoint import Checkpoint
from core.metrics import evaluate_topk
from core.train import item_embeddings, user_embeddings


def _masked_topk(scores: torch.Tensor, users: pa.Table, row_of: dict[int, int], k: int) -> np.ndarray:
    s = scores.clone()
    for r, hist in enumerate(users["history"].to_pylist()):
        if hist:
            s[r, [row_of[int(i)] for i in hist]] = -torch.inf
    return torch.topk(s, k, dim=1).indices.numpy()  # (U, k)


def skew_matrix(
    checkpoints: list[Checkpoint], catalog: pa.Table, users: pa.Table, eval_split: pa.Table, k: int = 10
) -> dict:
    families = {c.family for c in checkpoints}
    if len(families) != 1:
        raise ValueError(
            f"a skew check compares versions of ONE model family; got families {sorted(families)}"
        )
    versions = [c.version for c in checkpoints]
    if len(set(versions)) != len(versions):
        raise ValueError(f"checkpoint versions must be distinct; got {versions}")
    item_ids = catalog["item_id"].to_numpy()
    row_of = {int(x): r for r, x in enumerate(item_ids)}
    items = [item_embeddings(c.model, catalog) for c in checkpoints]  # per version: (N, D)
    queries = [user_embeddings(c.model, users) for c in checkpoints]  # per version: (U, D)
    n = len(checkpoints)
    recall = np.zeros((n, n))
    tops = {}
    for q in range(n):
        for i in range(n):
            scores = queries[q] @ items[i].T  # (U, N)
            recall[q, i] = evaluate_topk(scores, users, item_ids, eval_split, k)["recall"]
            tops[q, i] = _masked_topk(scores, users, row_of, k)
    overlap = np.zeros((n, n))
    for q in range(n):
        for i in range(n):
            a, b = tops[q, i], tops[i, i]
            overlap[q, i] = np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)])
    return {
        "family": families.pop(),
        "versions": versions,
        "k": k,
        "recall": recall.tolist(),
        "overlap": overlap.tolist(),
    }
