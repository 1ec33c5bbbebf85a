"""Request-level user-embedding broadcast for ranking.

A batch holds many (user, candidate) rows but few unique users. The broadcast path looks each unique
user up ONCE (one gather from the memory-mapped user table) and runs the user-only part of the scorer
ONCE, then expands to rows through the inverse index. The per-row path does both for every row; its
scores are the reference the broadcast path must reproduce.

Two-sided: when a batch's rows share candidate items (one popular item scored for many users), the
broadcast path also gathers each unique item's vector once (`BroadcastConfig.dedup_items`), when unique
items are at most ITEM_SHARE_MAX of the rows.

The scorer is the build's model package: its user-only part once per unique user and its pair part per
row when it has that split, its one per-row program otherwise, or the towers' similarity.

Requests are validated one by one: a request with unknown ids gets its own error and never fails its
batch neighbours.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pyarrow as pa
import torch

from core.serving.live_build import LiveBuild

POLICIES = ("split", "reject", "fallback")
# Items are gathered once only when this share of rows or fewer are unique items: a batch with little
# to share then pays only the unique pass (benchmarks/dedup_items.py, "distinct").
ITEM_SHARE_MAX = 0.1


@dataclasses.dataclass(frozen=True)
class ScoreRequest:
    user_ids: np.ndarray  # (R,) int64, one per row
    item_ids: np.ndarray  # (R,) int64
    # The request's one user given by features (one row of the user tower's declared columns, validated)
    # instead of the user table: embedded by the build's own user tower, once per unique (user, features)
    # in the batch.
    features: pa.Table | None = None


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    scores: np.ndarray | None = None  # (R,) float32
    status: int = 200
    error: str | None = None


@dataclasses.dataclass
class BatchStats:
    rows: int = 0
    unique_users: int = 0
    user_lookups: int = 0  # rows gathered from the user table
    item_lookups: int = 0  # rows gathered from the item table
    history_users: int = 0  # unique users embedded from their features by the user tower
    cap_events: Counter = dataclasses.field(default_factory=Counter)


@dataclasses.dataclass(frozen=True)
class BroadcastConfig:
    enabled: bool = True
    max_unique_users: int = 1024
    policy: str = "split"  # what to do when a batch has more unique users than the cap
    # Gather shared candidate items once too (broadcast on only). Off by default: on a cache-resident
    # item table it saved nothing and cost 15% on a batch with 29% unique items (benchmarks/README.md).
    dedup_items: bool = False

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"cap policy must be one of {POLICIES}, got {self.policy!r}")
        if self.max_unique_users < 1:
            raise ValueError(f"max_unique_users must be >= 1, got {self.max_unique_users}")


def _first_appearance_unique(user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique users in order of first appearance and the inverse index (rows -> position)."""
    uniq, first, inv = np.unique(user_ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # rank by first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return uniq[order], rank[inv.reshape(-1)]


class _Users:
    """User vectors by row: rows below len(table) are the build's user table, rows above it are the
    batch's users embedded from their history (`extra`)."""

    def __init__(self, table: np.ndarray, extra: np.ndarray | None = None):
        self.table, self.extra, self.n = table, extra, len(table)

    def take(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if self.extra is None:
            return np.take(self.table, rows, axis=0, out=out)  # (R, D)
        res = out if out is not None else np.empty((len(rows), self.table.shape[1]), np.float32)
        virtual = rows >= self.n
        res[~virtual] = self.table[rows[~virtual]]
        res[virtual] = self.extra[rows[virtual] - self.n]
        return res


def _history_users(
    build: LiveBuild, requests: list[ScoreRequest], valid_idx: list[int], stats: BatchStats
) -> tuple[dict[int, int], np.ndarray | None]:
    """Request index -> virtual user row, and the (H, D) vectors of those rows: ONE user-tower pass
    over the batch's unique (user, features) pairs."""
    ks = [k for k in valid_idx if requests[k].features is not None]
    if not ks:
        return {}, None
    slots, vecs = build.unique_feature_vectors(
        [int(requests[k].user_ids[0]) for k in ks], [requests[k].features for k in ks]
    )
    stats.history_users += len(vecs)
    return {k: len(build.user_ids) + int(j) for k, j in zip(ks, slots, strict=True)}, vecs


@torch.inference_mode()
def _score_per_row(
    build: LiveBuild, users: _Users, user_rows: np.ndarray, item_rows: np.ndarray, stats: BatchStats
) -> np.ndarray:
    u = torch.from_numpy(np.ascontiguousarray(users.take(user_rows)))  # (R, D): one lookup per row
    i = torch.from_numpy(np.ascontiguousarray(build.item_emb[item_rows]))  # (R, D)
    stats.user_lookups += len(user_rows)
    stats.item_lookups += len(item_rows)
    return build.model.scores(u, i).numpy()  # the user-only part runs per row


def _items(build: LiveBuild, item_rows: np.ndarray, dedup: bool, stats: BatchStats) -> torch.Tensor:
    """(R, D) item vectors of the rows; gathered once per unique item when the rows share items."""
    if dedup:
        uniq, inv = np.unique(item_rows, return_inverse=True)
        if len(uniq) <= ITEM_SHARE_MAX * len(item_rows):
            stats.item_lookups += len(uniq)
            i_uniq = torch.from_numpy(np.ascontiguousarray(build.item_emb[uniq]))  # (I, D)
            return i_uniq[torch.from_numpy(inv.reshape(-1))]
    stats.item_lookups += len(item_rows)
    return torch.from_numpy(np.ascontiguousarray(build.item_emb[item_rows]))


@torch.inference_mode()
def _score_items_shared(
    build: LiveBuild, users: _Users, user_rows: np.ndarray, item_rows: np.ndarray, stats: BatchStats
) -> np.ndarray:
    """Every row its own user (nothing to share on the user side), shared items gathered once."""
    u = torch.from_numpy(np.ascontiguousarray(users.take(user_rows)))
    stats.user_lookups += len(user_rows)
    return build.model.scores(u, _items(build, item_rows, True, stats)).numpy()


@torch.inference_mode()
def _score_broadcast(
    build: LiveBuild,
    users: _Users,
    user_rows: np.ndarray,
    item_rows: np.ndarray,
    stats: BatchStats,
    buf: np.ndarray | None,
    dedup_items: bool = False,
) -> np.ndarray:
    uniq, inv = _first_appearance_unique(user_rows)
    n_u = len(uniq)
    out = buf[:n_u] if buf is not None and len(buf) >= n_u else None
    u_uniq = users.take(uniq, out=out)  # (U, D): one lookup per unique user
    stats.user_lookups += n_u
    stats.unique_users += n_u
    u_uniq = torch.from_numpy(u_uniq)
    m = build.model
    pre = m.user_side(u_uniq) if m.has_user_side else None  # (U, H): user-only compute once per user
    inv_t = torch.from_numpy(inv)
    i = _items(build, item_rows, dedup_items, stats)  # (R, D)
    return m.pair_scores(
        u_uniq[inv_t], None if pre is None else pre[inv_t], i
    ).numpy()  # broadcast via inverse


def score_batch(
    build: LiveBuild,
    requests: list[ScoreRequest],
    cfg: BroadcastConfig,
    user_buffer: np.ndarray | None = None,
) -> tuple[list[ScoreResult], BatchStats]:
    """Score every request of a batch; returns one result per request, in order."""
    stats = BatchStats()
    results: list[ScoreResult | None] = [None] * len(requests)
    valid: list[tuple[int, np.ndarray, np.ndarray]] = []
    for k, req in enumerate(requests):
        if req.features is not None:  # the user side comes from the features (rows assigned below)
            u_rows, u_bad = np.zeros(len(req.item_ids), np.int64), np.zeros(len(req.item_ids), bool)
        else:
            u_rows, u_bad = build.user_rows(req.user_ids)
        i_rows, i_bad = build.item_rows(req.item_ids)
        if u_bad.any() or i_bad.any():
            msg = []
            if u_bad.any():
                msg.append(f"unknown user_id(s) {np.unique(req.user_ids[u_bad])[:5].tolist()}")
            if i_bad.any():
                msg.append(f"unknown item_id(s) {np.unique(req.item_ids[i_bad])[:5].tolist()}")
            results[k] = ScoreResult(status=404, error="; ".join(msg) + f" in build {build.build_id}")
        else:
            valid.append((k, u_rows, i_rows))

    virtual, extra = _history_users(build, requests, [v[0] for v in valid], stats)
    if virtual:
        valid = [(k, np.full(len(i), virtual[k], np.int64) if k in virtual else u, i) for k, u, i in valid]
    users = _Users(build.user_emb, extra)

    if cfg.enabled and valid and cfg.policy == "reject":
        admitted, seen = [], set()
        for k, u_rows, i_rows in valid:
            new = seen | set(np.unique(u_rows).tolist())
            if len(new) > cfg.max_unique_users:
                stats.cap_events["reject"] += 1
                results[k] = ScoreResult(
                    status=429,
                    error=f"batch unique-user cap {cfg.max_unique_users} reached ({len(new)} with this request); retry",
                )
            else:
                seen = new
                admitted.append((k, u_rows, i_rows))
        valid = admitted

    if valid:
        user_rows = np.concatenate([v[1] for v in valid])
        item_rows = np.concatenate([v[2] for v in valid])
        stats.rows = len(user_rows)
        if not cfg.enabled:
            scores = _score_per_row(build, users, user_rows, item_rows, stats)
        else:
            scores = _score_capped(build, users, user_rows, item_rows, cfg, stats, user_buffer)
        ends = np.cumsum([len(v[1]) for v in valid])
        for (k, _, _), part in zip(valid, np.split(scores, ends[:-1]), strict=True):
            results[k] = ScoreResult(scores=part)
    return results, stats  # type: ignore[return-value]


def _score_capped(
    build, users: _Users, user_rows, item_rows, cfg: BroadcastConfig, stats: BatchStats, buf
) -> np.ndarray:
    n_unique = len(np.unique(user_rows))
    if n_unique == len(user_rows) <= cfg.max_unique_users:
        # Nothing to share (e.g. one candidate per request): the per-row path does the same lookups and
        # FLOPs without the unique/inverse pass and the two gathers back to rows, which cost 5-20% of a
        # batch of 1-candidate requests (one-off in-process check: 0.79 vs 0.66 ms for a batch of one).
        stats.unique_users += n_unique
        if cfg.dedup_items:
            return _score_items_shared(build, users, user_rows, item_rows, stats)
        return _score_per_row(build, users, user_rows, item_rows, stats)
    if n_unique <= cfg.max_unique_users:
        return _score_broadcast(build, users, user_rows, item_rows, stats, buf, cfg.dedup_items)
    if cfg.policy == "fallback":
        stats.cap_events["fallback"] += 1
        return _score_per_row(build, users, user_rows, item_rows, stats)
    # split: users ranked by first appearance go to chunk rank // cap; each chunk stays under the cap.
    stats.cap_events["split"] += 1
    _, inv = _first_appearance_unique(user_rows)
    chunk = inv // cfg.max_unique_users
    scores = np.empty(len(user_rows), dtype=np.float32)
    for c in range(int(chunk.max()) + 1):
        rows = np.flatnonzero(chunk == c)
        scores[rows] = _score_broadcast(
            build, users, user_rows[rows], item_rows[rows], stats, buf, cfg.dedup_items
        )
    return scores
