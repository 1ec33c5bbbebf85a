"""Shards: id ranges of the embedded catalog, each assembled by one worker into its slice of the build's
id-sorted tables and into one faiss index built from the ONE trained (empty) index.

Shard s holds the ids in [lo_s, hi_s); the ranges are disjoint and in id order, so shard s's rows are
rows [offset_s, offset_s + rows_s) of the build's global id-sorted tables, which every shard's worker
writes in place. Uniqueness across the catalog follows from uniqueness within each shard. The driver
only plans (ranges from the parts' records) and merges top-k lists; it never holds the vectors.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import faiss
import numpy as np

from core.ann import index as ann
from core.rebuild import parts as partmod
from core.rebuild.validate import ValidationError


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    shard: int
    lo: int  # ids in [lo, hi)
    hi: int
    rows: int
    offset: int  # first row in the global id-sorted tables
    part_dirs: tuple[str, ...]  # the committed parts that hold ids in the range


def disjoint(records: list[dict]) -> bool:
    recs = sorted((r for r in records if r["rows"]), key=lambda r: r["id_min"])
    return all(a["id_max"] < b["id_min"] for a, b in zip(recs, recs[1:], strict=False))


def plan_ranges(records: list[dict], n_shards: int) -> list[tuple[int, int]]:
    """Up to `n_shards` half-open id ranges covering every part's ids, about equal in rows. Partitions
    by id (disjoint ranges): cut at part edges, so each shard reads only its own parts. Otherwise cut
    at weighted quantiles of the parts' id samples (each shard then reads the slice of every part that
    falls in its range)."""
    recs = [r for r in records if r["rows"]]
    if not recs:
        return []
    lo_all = min(r["id_min"] for r in recs)
    hi_all = max(r["id_max"] for r in recs) + 1
    total = sum(r["rows"] for r in recs)
    if disjoint(recs):
        recs.sort(key=lambda r: r["id_min"])
        cum = np.cumsum([r["rows"] for r in recs])
        cuts = sorted({int(np.searchsorted(cum, total * s / n_shards)) + 1 for s in range(1, n_shards)})
        starts = [0] + [c for c in cuts if 0 < c < len(recs)]
        edges = [recs[i]["id_min"] for i in starts] + [hi_all]
    else:
        sample = np.concatenate([np.asarray(r["id_sample"], np.int64) for r in recs])
        weight = np.concatenate([np.full(len(r["id_sample"]), r["rows"] / len(r["id_sample"])) for r in recs])
        order = np.argsort(sample, kind="stable")
        sample, cw = sample[order], np.cumsum(weight[order])
        inner = [int(sample[np.searchsorted(cw, cw[-1] * s / n_shards)]) for s in range(1, n_shards)]
        edges = [lo_all] + sorted({e for e in inner if lo_all < e < hi_all}) + [hi_all]
    return list(zip(edges[:-1], edges[1:], strict=False))


def overlapping(records: list[dict], lo: int, hi: int) -> list[dict]:
    return [r for r in records if r["rows"] and r["id_min"] < hi and r["id_max"] >= lo]


def count_in_ranges(part: Path, ranges: list[tuple[int, int]]) -> list[int]:
    """Rows of one part in each range (a worker's job: it reads the part's ids only)."""
    ids, _ = partmod.open_part(part)
    edges = np.searchsorted(ids, np.array([r[0] for r in ranges] + [ranges[-1][1]], np.int64))
    return np.diff(edges).tolist()


def plan_shards(
    parts_dir: Path, records: list[dict], ranges: list[tuple[int, int]], counts
) -> list[ShardPlan]:
    """`counts[s]`: rows in range s (summed over the parts)."""
    out, offset = [], 0
    for s, ((lo, hi), n) in enumerate(zip(ranges, counts, strict=True)):
        dirs = tuple(str(Path(parts_dir) / r["key"]) for r in overlapping(records, lo, hi))
        out.append(ShardPlan(s, int(lo), int(hi), int(n), offset, dirs))
        offset += int(n)
    return out


def chunks(plan: ShardPlan, what: str, expected_version: str):
    """The shard's rows as id-sorted (ids, vectors) chunks. Parts whose slices of the range do not
    overlap (a catalog partitioned by id) are streamed slice by slice from their memory maps, so a
    worker never holds more of the shard than one part's slice besides the index it adds them to;
    otherwise the range is gathered and sorted in one chunk (`gather`)."""
    slices = []
    for d in plan.part_dirs:
        _check_part(Path(d), plan, what, expected_version)
        pid, pvec = partmod.open_part(Path(d))
        a, b = np.searchsorted(pid, [plan.lo, plan.hi])
        if b > a:
            slices.append((pid, pvec, int(a), int(b)))
    slices.sort(key=lambda s: int(s[0][s[2]]))
    if any(int(p[0][p[3] - 1]) >= int(q[0][q[2]]) for p, q in zip(slices, slices[1:], strict=False)):
        yield gather(plan, what, expected_version)
        return
    held = 0
    while slices:
        pid, pvec, a, b = slices.pop(0)  # dropped once copied: its mapped pages leave this process's RSS
        held += b - a
        chunk = np.array(pid[a:b]), np.array(pvec[a:b])
        del pid, pvec
        yield chunk
    if held != plan.rows:
        raise ValidationError(
            f"{what} shard {plan.shard}: planned {plan.rows:,} rows, its parts hold {held:,}"
        )


def _check_part(d: Path, plan: ShardPlan, what: str, expected_version: str) -> None:
    rec = partmod.read_record(d)
    if rec is None or rec.get("checkpoint_version") != expected_version:
        found = None if rec is None else rec.get("checkpoint_version")
        raise ValidationError(
            f"{what} shard {plan.shard}: part {d.name} must carry checkpoint version "
            f"{expected_version!r}; found {found!r}"
        )


def gather(plan: ShardPlan, what: str, expected_version: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of the shard's range, id-sorted, from its parts; refuses a part of another
    checkpoint version and an id held twice."""
    ids, vecs = [], []
    for d in plan.part_dirs:
        _check_part(Path(d), plan, what, expected_version)
        pid, pvec = partmod.open_part(Path(d))
        a, b = np.searchsorted(pid, [plan.lo, plan.hi])
        ids.append(pid[a:b])  # memory-mapped slices: the concatenation below is the one copy
        vecs.append(pvec[a:b])
    ids_a = np.asarray(np.concatenate(ids))
    x = np.asarray(np.concatenate(vecs))
    if len(plan.part_dirs) > 1:
        order = np.argsort(ids_a, kind="stable")
        ids_a, x = ids_a[order], x[order]
    dup = ids_a[1:][ids_a[1:] == ids_a[:-1]]
    if len(dup):
        id_name = "item_id" if what == "items" else "user_id"
        raise ValidationError(
            f"{what}: {id_name} must be unique; {len(dup):,} duplicates across partitions, e.g. "
            f"{np.unique(dup)[:5].tolist()}"
        )
    if len(ids_a) != plan.rows:
        raise ValidationError(
            f"{what} shard {plan.shard}: planned {plan.rows:,} rows, its parts hold {len(ids_a):,}"
        )
    return ids_a, x


# ---- the build's global id-sorted tables, written in place by the shards' workers ----------------
def create_table(ids_path: Path, vec_path: Path, n: int, d: int) -> None:
    """Allocate both .npy files at their final size (sparse: nothing is written but the headers)."""
    np.lib.format.open_memmap(ids_path, mode="w+", dtype=np.int64, shape=(n,)).flush()
    np.lib.format.open_memmap(vec_path, mode="w+", dtype=np.float32, shape=(n, d)).flush()


def write_rows(ids_path: Path, vec_path: Path, offset: int, ids: np.ndarray, x: np.ndarray) -> None:
    for path, arr in ((ids_path, ids), (vec_path, x)):
        m = np.load(path, mmap_mode="r+")
        m[offset : offset + len(arr)] = arr
        m.flush()
        del m


# ---- indexes -------------------------------------------------------------------------------------
def train_empty(spec: ann.IndexSpec, d: int, sample: np.ndarray | None) -> bytes:
    """The trained, empty index every shard starts from (one coarse quantizer for all shards)."""
    index = ann.new_index(spec, d)
    if sample is not None and len(sample):
        index.train(np.ascontiguousarray(sample, np.float32))
    return faiss.serialize_index(index).tobytes()


def empty_index(empty: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(empty, dtype=np.uint8))


def add(index: faiss.Index, ids: np.ndarray, x: np.ndarray) -> None:
    index.add_with_ids(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(ids, np.int64))


def exact_topk(ids: np.ndarray, x: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k over one shard's rows: (scores (Q, k), ids (Q, k), -1 padded)."""
    D, rows = faiss.knn(np.ascontiguousarray(xq, np.float32), np.ascontiguousarray(x, np.float32), k,
                        metric=faiss.METRIC_INNER_PRODUCT)  # fmt: skip
    out = np.where(rows >= 0, np.asarray(ids)[rows.clip(min=0)], -1)
    return D, out


def recall_vs_exact(found_ids: np.ndarray, found_scores: np.ndarray, kth: np.ndarray, k: int) -> np.ndarray:
    """Tie-tolerant recall@k of each query (Q,), from scores alone: a returned id counts if its score reaches the exact k-th
    score (minus float slack). Valid for exact inner products: Flat codes, HNSW over Flat, IVF-Flat,
    refined PQ, and fp16 codes once the worker has rescored their hits (Worker.search)."""
    hits = (found_ids[:, :k] >= 0) & (found_scores[:, :k] >= kth[:, None] - 1e-5)
    return hits.sum(1) / k
