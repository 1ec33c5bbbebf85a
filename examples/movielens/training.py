"""Training the MovieLens two towers (in-batch sampled softmax with logQ correction) and held-out
evaluation (Recall@K and HR@K over all catalog items, the user's train items masked).

Each training example is (user, item at time t) with the user's items strictly BEFORE t as history,
so the model never sees the target (or the future) in its input.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.nn import functional as F

from examples.movielens.features import FeatureSchema
from examples.movielens.model import (
    ModelConfig,
    TwoTower,
    item_inputs_from_arrow,
    item_vectors,
    user_inputs_from_lists,
    user_vectors,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = 8
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 0.0
    seed: int = 0
    ranker_weight: float = 0.2
    threads: int = 2


def _examples(train: pa.Table, history_len: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    order = pc.sort_indices(
        train, sort_keys=[("user_id", "ascending"), ("timestamp", "ascending"), ("item_id", "ascending")]
    )
    t = train.take(order)
    uid, iid = t["user_id"].to_numpy(), t["item_id"].to_numpy()
    start = np.searchsorted(uid, uid, side="left")  # first row of each row's user
    hist = [iid[max(s, p - history_len) : p] for p, s in enumerate(start)]
    return uid, iid, hist


def item_embeddings(model: TwoTower, catalog: pa.Table) -> torch.Tensor:
    """(N, D) item vectors of the catalog, from the eager item tower."""
    return torch.from_numpy(item_vectors(model.item_tower, catalog, model.schema))


def user_embeddings(model: TwoTower, users: pa.Table) -> torch.Tensor:
    """(U, D) user vectors from the users table's ids and histories (the tower keeps the last
    `history_len` items of each)."""
    return torch.from_numpy(
        user_vectors(model.user_tower, users["user_id"].to_numpy(), users["history"], model.schema)
    )


def popularity_scores(item_counts: np.ndarray, n_users: int) -> torch.Tensor:
    """The same popularity ranking for every user: (U, N)."""
    return torch.from_numpy(item_counts.astype(np.float32))[None, :].expand(n_users, -1)


def evaluate_topk(
    scores: torch.Tensor, users: pa.Table, item_ids: np.ndarray, eval_split: pa.Table, k: int = 10
) -> dict:
    """scores: (U, N) for users in `users` order and items in `item_ids` order.

    Only users with train items (`seen_item_ids`: all of them, not just the tower's `history`) and at
    least one held-out item they had not seen in train count (cold users are a different problem).
    Items seen in train are masked from the ranking."""
    row_of = {int(x): r for r, x in enumerate(item_ids)}
    user_row = {int(u): r for r, u in enumerate(users["user_id"].to_numpy())}
    seen_col = "seen_item_ids" if "seen_item_ids" in users.column_names else "history"
    seen_items = users[seen_col].to_pylist()
    relevant: dict[int, set[int]] = {}
    for u, i in zip(eval_split["user_id"].to_numpy(), eval_split["item_id"].to_numpy(), strict=True):
        relevant.setdefault(int(u), set()).add(row_of[int(i)])
    recalls, hits = [], []
    for u, rel in relevant.items():
        r = user_row[u]
        seen = {row_of[int(i)] for i in seen_items[r]}
        rel = rel - seen
        if not seen_items[r] or not rel:
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


def train(
    catalog: pa.Table,
    users: pa.Table,
    train_split: pa.Table,
    eval_split: pa.Table,
    schema: FeatureSchema,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    progress=print,
    init_state: dict | None = None,
) -> tuple[TwoTower, dict]:
    """`init_state` warm-starts from an earlier checkpoint's weights: the usual way a family's next
    version is trained, and what keeps its embedding space close enough to pass a skew check."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    model = TwoTower(schema, model_cfg)
    if init_state is not None:
        model.load_state_dict(init_state)
    # fused: one kernel per step over all parameters (the per-tensor loop was ~40% of a CPU epoch)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)

    uid, iid, hist = _examples(train_split, schema.history_len)
    item_ids = catalog["item_id"].to_numpy()
    row_of = {int(x): r for r, x in enumerate(item_ids)}
    item_rows = np.array([row_of[int(x)] for x in iid], dtype=np.int64)
    # logQ correction: in-batch negatives are drawn with probability ~ item frequency.
    freq = np.bincount(item_rows, minlength=len(item_ids)).astype(np.float64)
    log_q = torch.from_numpy(np.log(freq / freq.sum() + 1e-12).astype(np.float32))

    t0, n = time.perf_counter(), len(uid)
    for epoch in range(cfg.epochs):
        perm, total = rng.permutation(n), 0.0
        model.train()
        for s in range(0, n, cfg.batch_size):
            b = perm[s : s + cfg.batch_size]
            u = model.user_tower(user_inputs_from_lists(uid[b], [hist[j] for j in b], schema))  # (B, D)
            rows = item_rows[b]
            i = model.item_tower(item_inputs_from_arrow(catalog.take(pa.array(rows)), schema))  # (B, D)
            logits = u @ i.T * model.scorer.inv_temperature - log_q[rows][None, :]  # (B, B)
            same = torch.from_numpy(rows[:, None] == rows[None, :]) & ~torch.eye(len(b), dtype=torch.bool)
            loss = F.cross_entropy(logits.masked_fill(same, -1e9), torch.arange(len(b)))
            # Ranking head: positives vs a shuffled in-batch item as negative.
            neg = torch.roll(torch.arange(len(b)), 1)
            pos_s, neg_s = model.scorer(u, i), model.scorer(u, i[neg])
            rank_loss = F.binary_cross_entropy_with_logits(
                torch.cat([pos_s, neg_s]), torch.cat([torch.ones(len(b)), torch.zeros(len(b))])
            )
            opt.zero_grad()
            (loss + cfg.ranker_weight * rank_loss).backward()
            opt.step()
            total += loss.item() * len(b)
        progress(f"epoch {epoch + 1}/{cfg.epochs}: loss {total / n:.4f} ({time.perf_counter() - t0:.1f}s)")
    model.eval()

    item_emb = item_embeddings(model, catalog)
    user_emb = user_embeddings(model, users)
    metrics = evaluate_topk(user_emb @ item_emb.T, users, item_ids, eval_split, k=10)
    pop = evaluate_topk(popularity_scores(freq, users.num_rows), users, item_ids, eval_split, k=10)
    metrics = {
        "k": 10,
        "recall_at_10": metrics["recall"],
        "hr_at_10": metrics["hr"],
        "popularity_recall_at_10": pop["recall"],
        "popularity_hr_at_10": pop["hr"],
        "eval_users": metrics["users"],
        "train_seconds": round(time.perf_counter() - t0, 1),
        "train_examples": int(n),
    }
    return model, metrics
