"""Compare a build with another (a new build with the live one, or any two): is it safe to cut over?

    health(vectors)            embedding health of one build's item vectors, on a sample: norms, mean
                               cosine of random pairs, share of near-duplicates, effective rank
    compare(base, new, users)  top-k overlap of the two builds' retrieval for the same users (each build
                               with its own query side) and, given held-out interactions, Recall@k of
                               each on them
    judge(result, limits)      the verdict: which limits the numbers break, in words that name them
    quality_floor(new, users, popularity)
                               held-out Recall@k of one build next to two baselines over the same catalog
                               and users, a popularity ranking and a random one; judge_floor says whether
                               it clears the floor (needs no live build: a first build is judged too)

Both builds are `LiveBuild`s loaded with memory-mapped tables and index, so what this holds grows with
the samples (users, vectors), not with the catalog. No Ray here: the rebuild gate, `jobs.registry diff`
and unit tests call it directly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.rebuild.queries import mix, mix_positions
from core.serving.live_build import LiveBuild
from core.storage.datasets import SEEN_COLUMN, parquet_file, partition_files, read_part

# Two vectors at cosine >= this are the same point for retrieval: their scores against any unit
# query differ by at most sqrt(2 * (1 - 0.99)) ~= 0.14 of the score range.
NEAR_DUP_COSINE = 0.99


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a new build must meet to replace the live one (defaults measured on the example model and
    its 610-user dataset: benchmarks/README.md)."""

    max_pair_cosine: float = 0.8  # mean cosine of random item pairs
    max_near_duplicates: float = 0.05  # share of sampled items with a near-duplicate among the others
    min_effective_rank: float = 8.0  # exp(entropy of the normalised singular values)
    min_overlap: float = 0.3  # mean top-k overlap with the live build, each with its own query side
    max_quality_drop: float = 0.15  # relative Recall@k drop on held-out interactions vs the live build
    # The quality floor, live build or not: held-out Recall@k at least these multiples of a popularity
    # ranking's and of a random ranking's. The example's Recall@10 (610 users): trained 1.58x popularity and
    # 52x random (one epoch: 1.02x, 34x); untrained 0.08x/2.7x and 0.01x/0.3x (two seeds), weights
    # shuffled 0.03x/1.1x. Popularity is a strong baseline there, so its floor sits well under it; the
    # random floor guards data whose popularity is flat (popularity itself is 33x random there).
    min_lift_over_popularity: float = 0.5
    min_lift_over_random: float = 10.0


@dataclasses.dataclass(frozen=True)
class EvalUsers:
    """The users both builds are asked about: ids, their features (the user tower's declared columns,
    for a build that has no table row for them), the items masked from their top-k (the users
    dataset's `seen_item_ids`, if it has one), and held-out relevant items (None without held-out data).
    Without a users dataset they are item mixtures: each query mixes the same items in each build."""

    user_ids: np.ndarray  # (U,) int64
    features: pa.Table | None
    seen: list[np.ndarray]
    relevant: list[set[int]] | None
    source: dict
    mixtures: tuple[np.ndarray, np.ndarray] | None = None  # (item ids, per-query offsets)


def health(emb: np.ndarray, sample: int = 2000, seed: int = 0) -> dict:
    """Health of (N, D) item vectors (memory-mapped is fine: only `sample` rows are read)."""
    n, d = emb.shape
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    x = np.asarray(emb[rows], np.float64)
    finite = np.isfinite(x).all(axis=1)
    x = x[finite]
    norms = np.linalg.norm(x, axis=1)
    u = x / np.maximum(norms, 1e-12)[:, None]
    m = len(u)
    i, j = rng.integers(0, m, size=(2, 4 * m))
    keep = i != j
    pair_cos = np.einsum("ij,ij->i", u[i[keep]], u[j[keep]])
    g = (u @ u.T).astype(np.float32)
    np.fill_diagonal(g, -np.inf)
    near_dup = g.max(axis=1) >= NEAR_DUP_COSINE if m > 1 else np.zeros(m, bool)
    s = np.linalg.svd(u, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return {
        "sample": int(len(rows)),
        "dim": int(d),
        "non_finite_rows": int((~finite).sum()),
        "norm_mean": round(float(norms.mean()), 4),
        "norm_min": round(float(norms.min()), 4),
        "norm_max": round(float(norms.max()), 4),
        "mean_pair_cosine": round(float(pair_cos.mean()), 4),
        "near_duplicate_share": round(float(near_dup.mean()), 4),
        "effective_rank": round(float(np.exp(-(p * np.log(p)).sum())), 2),
    }


def _sample_rows(files: list[Path], columns: list[str], n: int, seed: int) -> pa.Table:
    """About `n` rows from the partitions in a seeded random order, reading only as many partitions
    as it takes (a 10^8-user dataset is not read whole)."""
    order = np.random.default_rng(seed).permutation(len(files))
    got, rows = [], 0
    for f in order:
        t = read_part(files[f], columns)
        got.append(t)
        rows += t.num_rows
        if rows >= n:
            break
    t = pa.concat_tables(got)
    if t.num_rows > n:
        t = t.take(np.sort(np.random.default_rng(seed).choice(t.num_rows, n, replace=False)))
    return t


def eval_users(users: Path, holdout: Path | None, feature_columns: list[str], user_id: str = "user_id",
               n: int = 2000, seed: int = 0) -> EvalUsers:  # fmt: skip
    """Up to `n` users of a users dataset, with their held-out items (user_id, item_id rows) if given."""
    files = partition_files(users)
    has_seen = SEEN_COLUMN in parquet_file(files[0]).schema_arrow.names
    cols = list(dict.fromkeys([user_id, *feature_columns, *([SEEN_COLUMN] if has_seen else [])]))
    t = _sample_rows(files, cols, n, seed)
    ids = t[user_id].to_numpy()
    seen = ([np.asarray(h, np.int64) for h in t[SEEN_COLUMN].to_pylist()] if has_seen
            else [np.zeros(0, np.int64)] * len(ids))  # fmt: skip
    relevant = None
    if holdout is not None:
        want = pa.array(ids)
        rel: dict[int, set[int]] = {}
        for f in partition_files(holdout):
            part = read_part(f, ["user_id", "item_id"])
            part = part.filter(pc.is_in(part["user_id"], value_set=want))
            for u, i in zip(part["user_id"].to_numpy(), part["item_id"].to_numpy(), strict=True):
                rel.setdefault(int(u), set()).add(int(i))
        relevant = [rel.get(int(u), set()) for u in ids]
    source = {"users": str(users), "holdout": None if holdout is None else str(holdout), "sampled": len(ids)}
    return EvalUsers(ids, t.select(list(feature_columns)), seen, relevant, source)


def mixture_users(item_ids: np.ndarray, n: int, seed: int) -> EvalUsers:
    """Queries without users: each mixes a few items, the same items in every build compared."""
    positions, offsets = mix_positions(len(item_ids), n, seed)
    empty = [np.zeros(0, np.int64)] * n
    return EvalUsers(np.zeros(n, np.int64), None, empty, None, {"users": "item_mixtures"},
                     (np.asarray(item_ids[positions], np.int64), offsets))  # fmt: skip


def query_vectors(build: LiveBuild, users: EvalUsers) -> np.ndarray:
    """Each user as this build serves them: its user-table row, else its own user tower over the
    user's features, as serving does; item mixtures from this build's own item vectors."""
    if users.mixtures is not None:
        ids, offsets = users.mixtures
        rows, _ = build.item_rows(ids)
        return mix(build.item_emb[rows], offsets)
    xq = np.zeros((len(users.user_ids), build.dim), np.float32)
    rows, unknown = build.user_rows(users.user_ids)
    xq[~unknown] = build.user_emb[rows[~unknown]]
    by_features = np.flatnonzero(unknown)
    if len(by_features):
        xq[by_features] = build.feature_vectors(users.features.take(by_features))
    return xq


def top_k(build: LiveBuild, users: EvalUsers, k: int) -> np.ndarray:
    """(U, k) item ids each user is served by this build, their seen items left out (-1 pad)."""
    xq = query_vectors(build, users)
    depth = min(build.index.ntotal, k + max((len(h) for h in users.seen), default=0))
    ids, _ = build.search(xq, depth)
    out = np.full((len(xq), k), -1, np.int64)
    for q, row in enumerate(ids):
        kept = row[(row >= 0) & ~np.isin(row, users.seen[q])][:k]
        out[q, : len(kept)] = kept
    return out


def overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mean share of the top-k two builds have in common, over users."""
    return float(np.mean([len(set(x[x >= 0]) & set(y[y >= 0])) / k for x, y in zip(a, b, strict=True)]))


def _evaluable(users: EvalUsers):
    """(row, held-out items the user had not seen) of each user with such items: the users Recall@k
    is measured over."""
    for q, rel in enumerate(users.relevant or []):
        rel = rel - set(users.seen[q].tolist())
        if rel:
            yield q, rel


def recall(top: np.ndarray, users: EvalUsers) -> tuple[float, int]:
    """Recall@k on held-out items the user had not seen, over users with such items."""
    vals = [len(set(top[q].tolist()) & rel) / len(rel) for q, rel in _evaluable(users)]
    return (float(np.mean(vals)) if vals else float("nan")), len(vals)


# Users whose train histories count towards the popularity baseline: enough to rank the head of the
# catalog stably, few enough that a 10^8-user dataset is not read whole (as `eval_users`).
POPULARITY_USERS = 100_000


def item_popularity(
    users: Path, n: int = POPULARITY_USERS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray] | None:
    """(item ids ascending, how often each occurs) over the seen items of up to `n` users; None when
    the users dataset does not say what its users have seen (no `seen_item_ids` column)."""
    files = partition_files(users)
    if SEEN_COLUMN not in parquet_file(files[0]).schema_arrow.names:
        return None
    t = _sample_rows(files, [SEEN_COLUMN], n, seed)
    # flatten(), not .values: a sliced or taken list array's values run past its own rows
    flat = [c.flatten().to_numpy() for c in t[SEEN_COLUMN].chunks]
    ids, counts = np.unique(np.concatenate(flat) if flat else np.zeros(0, np.int64), return_counts=True)
    return ids.astype(np.int64), counts.astype(np.int64)


def _in_catalog(item_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Which of `ids` are in the build's id-sorted `item_ids`."""
    pos = np.minimum(np.searchsorted(item_ids, ids), max(len(item_ids) - 1, 0))
    return item_ids[pos] == ids if len(item_ids) else np.zeros(len(ids), bool)


def popularity_top_k(item_ids: np.ndarray, popularity: tuple[np.ndarray, np.ndarray], users: EvalUsers,
                     k: int) -> np.ndarray:  # fmt: skip
    """(U, k) the catalog's most popular items each user has not seen (ties by id, -1 pad): the ranking
    a model that learnt nothing about users but item frequency serves, history masked as `top_k`."""
    pop_ids, counts = popularity
    known = _in_catalog(item_ids, pop_ids)
    ranked = pop_ids[known][np.lexsort((pop_ids[known], -counts[known]))]
    # then items no history holds, by id: only as many as a user with the longest history can reach,
    # so a 10^8-item catalog is neither read whole nor sorted
    need = min(len(item_ids), len(ranked) + k + max((len(h) for h in users.seen), default=0))
    rest = np.asarray(item_ids[:need])
    order = np.concatenate([ranked, rest[~np.isin(rest, ranked)]])
    out = np.full((len(users.seen), k), -1, np.int64)
    for q, seen in enumerate(users.seen):
        head = order[: k + len(seen)]
        kept = head[~np.isin(head, seen)][:k]
        out[q, : len(kept)] = kept
    return out


def random_recall(item_ids: np.ndarray, users: EvalUsers, k: int) -> float:
    """Expected Recall@k of a uniformly random ranking of the C catalog items a user has not seen, over
    the users `recall` counts: each relevant item in the catalog is among the k drawn with p = k / C.
    Exact, so the floor does not move with an rng's luck."""
    vals = []
    for q, rel in _evaluable(users):
        unseen = len(item_ids) - int(_in_catalog(item_ids, np.unique(users.seen[q])).sum())
        rel_in = int(_in_catalog(item_ids, np.fromiter(rel, np.int64, len(rel))).sum())
        vals.append(min(k, unseen) / unseen * rel_in / len(rel) if unseen else 0.0)
    return float(np.mean(vals)) if vals else float("nan")


def quality_floor(new: LiveBuild, users: EvalUsers, popularity: tuple[np.ndarray, np.ndarray] | None,
                  k: int = 10) -> dict:  # fmt: skip
    """Held-out Recall@k of `new` and of two rankings any model must beat, over the same users and
    catalog with the same history masking: the most popular items (`popularity`: `item_popularity`) and
    a random ranking. Needs held-out data, not a live build; without it says why it checked nothing."""
    if users.relevant is None:
        return {"checked": False, "why": "no held-out data"}
    top_new = top_k(new, users, k)
    rn, n_eval = recall(top_new, users)
    if not n_eval:
        return {"checked": False, "why": f"none of the {len(users.user_ids)} sampled users has held-out "
                "items outside their history"}  # fmt: skip
    # without seen items to count, popularity is unknown: only the random ranking is a baseline
    top_pop = popularity_top_k(new.item_ids, popularity, users, k) if popularity is not None else None
    rp = recall(top_pop, users)[0] if top_pop is not None else 0.0
    rr = random_recall(new.item_ids, users, k)
    return {
        "checked": True,
        "k": k,
        "users": n_eval,
        "recall_at_k": round(rn, 4),
        "popularity_recall_at_k": round(rp, 4),
        "random_recall_at_k": round(rr, 6),
        # None: the baseline found nothing, so any recall clears that multiple of it
        "lift_over_popularity": round(rn / rp, 3) if rp > 0 else None,
        "lift_over_random": round(rn / rr, 2) if rr > 0 else None,
        # not judged: how much of the top-k is the popularity ranking's (near 1: the model ignores the user)
        "overlap_with_popularity": None if top_pop is None else round(overlap(top_new, top_pop, k), 4),
        # what the popularity ranking was counted from: distinct items, seen entries
        "popularity_counts": None
        if popularity is None
        else {"items": int(len(popularity[0])), "interactions": int(popularity[1].sum())},
    }


def judge_floor(floor: dict, limits: Limits) -> list[str]:
    """The quality floor's verdict on `floor` (from `quality_floor`): empty if it passes or was not
    checked (`floor_line` says which), else one reason naming every multiple it falls short of."""
    f, short = floor, []
    if not f.get("checked"):
        return []
    lp, lr = f["lift_over_popularity"], f["lift_over_random"]
    if lp is not None and lp < limits.min_lift_over_popularity:
        short.append(f"{lp}x the popularity ranking's {f['popularity_recall_at_k']} "
                     f"(floor {limits.min_lift_over_popularity}x)")  # fmt: skip
    if lr is not None and lr < limits.min_lift_over_random:
        short.append(
            f"{lr}x a random ranking's {f['random_recall_at_k']} (floor {limits.min_lift_over_random}x)"
        )
    if not short:
        return []
    return [f"quality floor: held-out Recall@{f['k']} {f['recall_at_k']} over {f['users']} users is "
            + " and ".join(short)]  # fmt: skip


def floor_line(floor: dict) -> str:
    """One line for the job's output: what the floor measured, or that (and why) it checked nothing."""
    f = floor
    if not f.get("checked"):
        return f"quality floor: not checked, {f['why']}"
    if f.get("popularity_counts") is None:
        pop = "popularity not counted (the users dataset has no seen_item_ids)"
    else:
        pop = f"popularity {f['popularity_recall_at_k']} ({f['lift_over_popularity']}x)"
    return (f"quality floor: held-out Recall@{f['k']} {f['recall_at_k']} vs {pop}, random "
            f"{f['random_recall_at_k']} ({f['lift_over_random']}x) over {f['users']} users")  # fmt: skip


def compare(base: LiveBuild, new: LiveBuild, users: EvalUsers, k: int = 10, sample: int = 2000) -> dict:
    """Every number of the cut-over comparison between `base` (the live build) and `new`."""
    top_base, top_new = top_k(base, users, k), top_k(new, users, k)
    out = {
        "base": {"build_id": base.build_id, "checkpoint_version": base.checkpoint_version,
                 "health": health(base.item_emb, sample)},
        "new": {"build_id": new.build_id, "checkpoint_version": new.checkpoint_version,
                "health": health(new.item_emb, sample)},
        "k": k,
        "users": {**users.source, "compared": len(users.user_ids)},
        "overlap_at_k": round(overlap(top_base, top_new, k), 4),
    }  # fmt: skip
    if users.relevant is not None:
        (rb, n_eval), (rn, _) = recall(top_base, users), recall(top_new, users)
        drop = (rb - rn) / rb if rb > 0 else 0.0
        out["quality"] = {
            "recall_at_k_base": round(rb, 4),
            "recall_at_k_new": round(rn, 4),
            "relative_drop": round(drop, 4),
            "users": n_eval,
        }
    return out


def judge(result: dict, limits: Limits) -> list[str]:
    """The limits the new build breaks, each naming the measured number and the limit (empty: passes)."""
    h, lim, why = result["new"]["health"], limits, []
    if h["non_finite_rows"]:
        why.append(f"{h['non_finite_rows']} of {h['sample']} sampled item vectors are not finite")
    if h["mean_pair_cosine"] > lim.max_pair_cosine:
        why.append(
            f"mean cosine of random item pairs {h['mean_pair_cosine']} > {lim.max_pair_cosine} (collapsed)"
        )
    if h["near_duplicate_share"] > lim.max_near_duplicates:
        why.append(f"near-duplicate items (cosine >= {NEAR_DUP_COSINE}) {h['near_duplicate_share']:.1%} of "
                   f"the sample > {lim.max_near_duplicates:.1%}")  # fmt: skip
    if h["effective_rank"] < lim.min_effective_rank:
        why.append(
            f"effective rank {h['effective_rank']} of {h['dim']} dimensions < {lim.min_effective_rank}"
        )
    if result["overlap_at_k"] < lim.min_overlap:
        why.append(f"top-{result['k']} overlap with live build {result['base']['build_id']} "
                   f"{result['overlap_at_k']} < {lim.min_overlap}")  # fmt: skip
    q = result.get("quality")
    if q and q["relative_drop"] > lim.max_quality_drop:
        why.append(f"held-out Recall@{result['k']} {q['recall_at_k_new']} vs live {q['recall_at_k_base']}: "
                   f"relative drop {q['relative_drop']:.1%} > {lim.max_quality_drop:.1%}")  # fmt: skip
    return why
