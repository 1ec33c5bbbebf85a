"""Scatter/gather of a scoring batch over the shards of a sharded build, Ray-free.

The ingress does the user side once per batch, as the merged path does (core.serving.broadcast): each
unique user is looked up (or embedded from its features) once and the scorer's user-only part runs
once per unique user. Each candidate row goes to the shard whose id range holds its item, with only the
user vectors its rows need; the shard gathers its items and runs the pair part (ShardBuild.score), and
answers scores, never vectors. `gather_scores` puts them back in request order; a request with an
unknown user or item gets its own 404 and never fails its batch neighbours.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from core.serving.broadcast import (
    BatchStats,
    ScoreRequest,
    ScoreResult,
    _first_appearance_unique,
    _history_users,
    _Users,
)
from core.serving.shard_build import ShardedLiveBuild, shard_of


@dataclasses.dataclass
class ShardCall:
    """One shard's part of a batch: (U_s, D) user vectors, their (U_s, H) user-only part (None: the
    per-row path), each row's user slot and item id, and where its rows go in the batch."""

    users: np.ndarray
    pre: np.ndarray | None
    slots: np.ndarray
    item_ids: np.ndarray
    rows: np.ndarray
    per_row: bool


@dataclasses.dataclass
class ScorePlan:
    results: list[ScoreResult | None]  # decided at the ingress (404s); None: answered by the shards
    spans: list[tuple[int, int, int]]  # (request, first row, end row) of the answered requests
    item_ids: np.ndarray  # (R,) every answered row's item
    calls: dict[int, ShardCall]
    stats: BatchStats


def plan_scores(build: ShardedLiveBuild, requests: list[ScoreRequest], broadcast: bool) -> ScorePlan:
    stats = BatchStats()
    results: list[ScoreResult | None] = [None] * len(requests)
    valid: list[tuple[int, np.ndarray, np.ndarray]] = []
    for k, req in enumerate(requests):
        if req.features is not None:
            u_rows, u_bad = np.zeros(len(req.item_ids), np.int64), np.zeros(len(req.item_ids), bool)
        else:
            u_rows, u_bad = build.user_rows(req.user_ids)
        i_bad = shard_of(build.shard_edges, req.item_ids) < 0  # outside every shard's range
        if u_bad.any() or i_bad.any():
            results[k] = ScoreResult(status=404, error=_unknown(build, req, u_bad, i_bad))
        else:
            valid.append((k, u_rows, req.item_ids))
    virtual, extra = _history_users(build, requests, [v[0] for v in valid], stats)
    if virtual:
        valid = [(k, np.full(len(i), virtual[k], np.int64) if k in virtual else u, i) for k, u, i in valid]
    spans, calls = [], {}
    if not valid:
        return ScorePlan(results, spans, np.zeros(0, np.int64), calls, stats)
    ends = np.cumsum([len(v[1]) for v in valid])
    spans = [(k, int(e - len(u)), int(e)) for (k, u, _), e in zip(valid, ends, strict=True)]
    user_rows = np.concatenate([v[1] for v in valid])
    item_ids = np.concatenate([v[2] for v in valid]).astype(np.int64)
    users = _Users(build.user_emb, extra)
    stats.rows = len(user_rows)
    shard = shard_of(build.shard_edges, item_ids)
    m = build.model
    if broadcast:
        uniq, inv = _first_appearance_unique(user_rows)
        u_all = users.take(uniq)  # one lookup per unique user
        stats.user_lookups += len(uniq)
        stats.unique_users += len(uniq)
        with torch.inference_mode():
            pre_all = m.user_side(torch.from_numpy(u_all)).numpy() if m.has_user_side else None
    else:
        inv = np.arange(len(user_rows))
        u_all, pre_all = users.take(user_rows), None  # one lookup per row; the shard runs the rest per row
        stats.user_lookups += len(user_rows)
    for s in np.unique(shard):
        rows = np.flatnonzero(shard == s)
        need, slots = np.unique(inv[rows], return_inverse=True)  # only the users these rows name
        calls[int(s)] = ShardCall(
            users=np.ascontiguousarray(u_all[need]),
            pre=None if pre_all is None else np.ascontiguousarray(pre_all[need]),
            slots=slots.astype(np.int64).reshape(-1),
            item_ids=item_ids[rows],
            rows=rows,
            per_row=not broadcast,
        )
    stats.item_lookups += len(item_ids)
    return ScorePlan(results, spans, item_ids, calls, stats)


def gather_scores(
    build: ShardedLiveBuild, plan: ScorePlan, answers: dict[int, tuple[np.ndarray, np.ndarray]]
) -> list[ScoreResult]:
    """Every request's result from the shards' (scores, unknown) answers, in request order."""
    n = len(plan.item_ids)
    scores, unknown = np.empty(n, np.float32), np.zeros(n, bool)
    for s, call in plan.calls.items():
        got, bad = answers[s]
        scores[call.rows], unknown[call.rows] = got, bad
    out = list(plan.results)
    for k, a, b in plan.spans:
        if unknown[a:b].any():
            ids = np.unique(plan.item_ids[a:b][unknown[a:b]])[:5].tolist()
            out[k] = ScoreResult(status=404, error=f"unknown item_id(s) {ids} in build {build.build_id}")
        else:
            out[k] = ScoreResult(scores=scores[a:b].copy())
    return out  # type: ignore[return-value]


def _unknown(build, req: ScoreRequest, u_bad: np.ndarray, i_bad: np.ndarray) -> str:
    msg = []
    if u_bad.any():
        msg.append(f"unknown user_id(s) {np.unique(req.user_ids[u_bad])[:5].tolist()}")
    if i_bad.any():
        msg.append(f"unknown item_id(s) {np.unique(req.item_ids[i_bad])[:5].tolist()}")
    return "; ".join(msg) + f" in build {build.build_id}"
