"""Version-skew sensitivity check: how much retrieval degrades when the query tower's version differs
from the index's version, for every pair of packages of one family.

cell (q, i) = users embedded by package q's user tower, items by package i's item tower.
Recall@K is measured on held-out interactions; overlap@K against the matched-version retrieval (i, i).
A family passes when every off-diagonal cell's relative recall drop stays within a threshold. Results
live in the registry (`skew/<family>/<check_id>.json`, written by `core.quality.skew_gate`) and gate publishing
and serving; serving only reads verdicts through `core.quality.skew_gate`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from core.contract.towers import ModelPackage
from core.storage.datasets import SEEN_COLUMN


def _seen_rows(users: pa.Table, row_of: dict[int, int]) -> list[list[int]]:
    """Per user, the catalog rows of the items they have seen (masked from their ranking)."""
    if SEEN_COLUMN not in users.column_names:
        return [[] for _ in range(users.num_rows)]
    return [[row_of[int(i)] for i in h if int(i) in row_of] for h in users[SEEN_COLUMN].to_pylist()]


def _masked_topk(scores: torch.Tensor, seen: list[list[int]], k: int) -> np.ndarray:
    s = scores.clone()
    for r, rows in enumerate(seen):
        if rows:
            s[r, rows] = -torch.inf
    return torch.topk(s, k, dim=1).indices.numpy()  # (U, k) catalog rows


def _relevant(users: pa.Table, user_id: str, eval_split: pa.Table, row_of: dict[int, int], seen) -> dict:
    """User row -> held-out catalog rows they had not seen (users without any are not evaluated)."""
    user_row = {int(u): r for r, u in enumerate(users[user_id].to_numpy())}
    rel: dict[int, set[int]] = {}
    for u, i in zip(eval_split["user_id"].to_numpy(), eval_split["item_id"].to_numpy(), strict=True):
        if int(u) in user_row and int(i) in row_of:
            rel.setdefault(user_row[int(u)], set()).add(row_of[int(i)])
    return {r: items - set(seen[r]) for r, items in rel.items() if items - set(seen[r])}


def recall_at_k(top: np.ndarray, relevant: dict[int, set[int]]) -> float:
    vals = [len(set(top[r].tolist()) & rel) / len(rel) for r, rel in relevant.items()]
    return float(np.mean(vals)) if vals else 0.0


def skew_matrix(
    packages: list[ModelPackage], catalog: pa.Table, users: pa.Table, eval_split: pa.Table, k: int = 10
) -> dict:
    families = {c.family for c in packages}
    if len(families) != 1:
        raise ValueError(
            f"a skew check compares versions of ONE model family; got families {sorted(families)}"
        )
    versions = [c.version for c in packages]
    if len(set(versions)) != len(versions):
        raise ValueError(f"package versions must be distinct; got {versions}")
    m0 = packages[0].manifest
    item_ids = catalog[m0.item_id].to_numpy()
    row_of = {int(x): r for r, x in enumerate(item_ids)}
    seen = _seen_rows(users, row_of)
    relevant = _relevant(users, m0.user_id, eval_split, row_of, seen)
    items = [torch.from_numpy(c.item_vectors(catalog)) for c in packages]  # per version: (N, D)
    queries = [torch.from_numpy(c.user_vectors(users)) for c in packages]  # per version: (U, D)
    n = len(packages)
    recall = np.zeros((n, n))
    tops = {}
    for q in range(n):
        for i in range(n):
            tops[q, i] = _masked_topk(queries[q] @ items[i].T, seen, k)  # (U, N) scores -> (U, k)
            recall[q, i] = recall_at_k(tops[q, i], relevant)
    overlap = np.zeros((n, n))
    for q in range(n):
        for i in range(n):
            a, b = tops[q, i], tops[i, i]
            overlap[q, i] = np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)])
    return {"family": families.pop(), "versions": versions, "k": k, "recall": recall.tolist(),
            "overlap": overlap.tolist(), "users_evaluated": len(relevant)}  # fmt: skip
