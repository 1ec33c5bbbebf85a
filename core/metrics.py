"""Held-out retrieval metrics: Recall@K and HR@K over all catalog items, train items masked."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch


def popularity_scores(item_counts: np.ndarray, n_users: int) -> torch.Tensor:
    """The same popularity ranking for every user: (U, N)."""
    return torch.from_numpy(item_counts.astype(np.float32))[None, :].expand(n_users, -1)


def evaluate_topk(
    scores: torch.Tensor, users: pa.Table, item_ids: np.ndarray, eval_split: pa.Table, k: int = 10
) -> dict:
    """scores: (U, N) for users in `users` order and items in `item_ids` order.

    Only users with a non-empty train history and at least one held-out item they had not seen in
    train count (cold users are a different problem). Items seen in train are masked from the ranking.
    """
    row_of = {int(x): r for r, x in enumerate(item_ids)}
    user_row = {int(u): r for r, u in enumerate(users["user_id"].to_numpy())}
    histories = users["history"].to_pylist()
    relevant: dict[int, set[int]] = {}
    for u, i in zip(eval_split["user_id"].to_numpy(), eval_split["item_id"].to_numpy(), strict=True):
        relevant.setdefault(int(u), set()).add(row_of[int(i)])
    recalls, hits = [], []
    for u, rel in relevant.items():
        r = user_row[u]
        seen = {row_of[int(i)] for i in histories[r]}
        rel = rel - seen
        if not histories[r] or not rel:
            continue
        s = scores[r].clone()
        if seen:
            s[torch.tensor(sorted(seen))] = -torch.inf
        top = set(torch.topk(s, k).indices.tolist())
        n_hit = len(top & rel)
        recalls.append(n_hit / len(rel))
        hits.append(float(n_hit > 0))
    return {
        "recall": float(np.mean(recalls)) if recalls else 0.0,
        "hr": float(np.mean(hits)) if hits else 0.0,
        "users": len(recalls),
    }
