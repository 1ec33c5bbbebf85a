"""faiss index construction, search-parameter tuning by measured recall, save and load.

Vectors are unit-norm, so inner product == cosine. Search parameters are chosen by MEASURED
recall@k against exact search on a tuning query set and then re-measured on a disjoint held-out set;
the held-out number is what gates publishing. Parameters are passed per call (SearchParameters), never
set on a shared index, so a live index is never mutated while another thread searches.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import faiss
import numpy as np

log = logging.getLogger(__name__)

FLAT_MAX_ITEMS = 200_000  # below this an exact search is cheap enough and recall is 1.0 by definition
# faiss 1.15 switches flat distance computation to BLAS only when n_queries * d >= 128000; below that a
# batch of 1000 queries on 1M x 64 ran 10x slower (PITFALLS.md). 20 queries is where BLAS starts to pay.
BLAS_THRESHOLD = 20


def configure(threads: int) -> None:
    """Call once per process that builds or searches (entrypoints, replicas), not at import."""
    faiss.omp_set_num_threads(threads)
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD


@dataclasses.dataclass(frozen=True)
class IndexSpec:
    kind: str  # "flat" | "ivf" | "hnsw" | "ivfpq"
    factory: str
    train_sample: int  # 0 = no training


def choose_spec(n: int, d: int, kind: str = "auto") -> IndexSpec:
    """Exact Flat for small catalogs; IVF-Flat with ~4*sqrt(n) lists for large ones (or the override)."""
    if kind == "auto":
        kind = "flat" if n <= FLAT_MAX_ITEMS else "ivf"
    nlist = max(16, min(65536, 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))))
    if kind == "flat":
        return IndexSpec("flat", "IDMap2,Flat", 0)
    if kind == "hnsw":
        return IndexSpec("hnsw", "IDMap2,HNSW32,Flat", 0)
    # 64 training points per list: within faiss' 39-256 guidance and 3-4x faster than training on all.
    sample = min(n, 64 * nlist)
    if kind == "ivf":
        return IndexSpec("ivf", f"IVF{nlist},Flat", sample)
    if kind == "ivfpq":
        m = d // 2 if d % 2 == 0 else d
        return IndexSpec("ivfpq", f"IDMap2,IVF{nlist},PQ{m}x4fs,RFlat", sample)
    raise ValueError(f"unknown index kind {kind!r}; expected one of auto, flat, ivf, hnsw, ivfpq")


def build(spec: IndexSpec, xb: np.ndarray, ids: np.ndarray, seed: int = 0) -> tuple[faiss.Index, dict]:
    """xb: (N, D) float32 unit rows; ids: (N,) int64. Returns the index and train/add seconds."""
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    index = faiss.index_factory(xb.shape[1], spec.factory, faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    if spec.train_sample:
        rng = np.random.default_rng(seed)
        sample = xb[np.sort(rng.choice(len(xb), size=spec.train_sample, replace=False))]
        index.train(sample)
    t1 = time.perf_counter()
    index.add_with_ids(xb, ids)
    t2 = time.perf_counter()
    return index, {"index_train_s": round(t1 - t0, 3), "index_add_s": round(t2 - t1, 3)}


def _params(spec: IndexSpec, p: dict) -> faiss.SearchParameters | None:
    if spec.kind == "flat":
        return None
    if spec.kind == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=p["efSearch"])
    if spec.kind == "ivf":
        return faiss.SearchParametersIVF(nprobe=p["nprobe"])
    # ivfpq with refine: the refine stage's params wrap the IVF params of the base index
    return faiss.IndexRefineSearchParameters(
        k_factor=p["k_factor"], base_index_params=faiss.SearchParametersIVF(nprobe=p["nprobe"])
    )


def candidate_params(spec: IndexSpec) -> list[dict]:
    """Search settings from cheapest to most accurate."""
    if spec.kind == "flat":
        return [{}]
    if spec.kind == "hnsw":
        return [{"efSearch": e} for e in (16, 32, 64, 128, 256, 512)]
    nlist = int(next(t for t in spec.factory.split(",") if t.startswith("IVF"))[3:])
    probes = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if p <= nlist]
    if spec.kind == "ivf":
        return [{"nprobe": p} for p in probes]
    return [{"nprobe": p, "k_factor": k} for p in probes for k in (4, 16, 64)]


def search(
    index: faiss.Index, spec: IndexSpec, params: dict, xq: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    D, I = index.search(xq, k, params=_params(spec, params))  # (Q, k) each
    return D, I


def exact_topk(xb: np.ndarray, xq: np.ndarray, k: int) -> np.ndarray:
    """Exact inner-product top-k ROW numbers (not ids) of xb for each query: (Q, k)."""
    _, I = faiss.knn(
        np.ascontiguousarray(xq, dtype=np.float32),
        np.ascontiguousarray(xb, dtype=np.float32),
        k,
        metric=faiss.METRIC_INNER_PRODUCT,
    )
    return I


def recall_at_k(
    xb: np.ndarray,
    ids: np.ndarray,
    xq: np.ndarray,
    found_ids: np.ndarray,
    k: int,
    exact_rows: np.ndarray | None = None,
) -> float:
    """Tie-tolerant recall@k: a returned id counts if its TRUE score reaches the exact k-th score
    (minus float slack), so equal-score neighbours swapped by the ANN are not counted as misses."""
    if exact_rows is None:
        exact_rows = exact_topk(xb, xq, k)
    kth = np.einsum("qd,qd->q", xq, xb[exact_rows[:, k - 1]])  # (Q,)
    order = np.argsort(ids)
    pos = np.searchsorted(ids, found_ids.clip(min=0), sorter=order)
    rows = order[np.clip(pos, 0, len(ids) - 1)]
    valid = (found_ids >= 0) & (ids[rows] == found_ids)
    true = np.einsum("qd,qkd->qk", xq, xb[rows])  # (Q, k)
    hits = valid & (true >= kth[:, None] - 1e-5)
    return float(hits.sum() / (k * len(xq)))


def tune(index, spec: IndexSpec, xb, ids, xq_tune, xq_holdout, k: int, target: float) -> dict:
    """Cheapest candidate whose tuning-set recall reaches `target`, then its held-out recall."""
    exact_tune = exact_topk(xb, xq_tune, k)
    tried = []
    chosen = None
    for p in candidate_params(spec):
        _, I = search(index, spec, p, xq_tune, k)
        r = recall_at_k(xb, ids, xq_tune, I, k, exact_tune)
        tried.append({**p, "recall": round(r, 4)})
        log.info("index %s params %s: tuning recall@%d %.4f", spec.factory, p, k, r)
        if r >= target:
            chosen = p
            break
    if chosen is None:
        chosen = candidate_params(spec)[-1]
    t0 = time.perf_counter()
    _, I = search(index, spec, chosen, xq_holdout, k)
    search_s = time.perf_counter() - t0
    holdout = recall_at_k(xb, ids, xq_holdout, I, k)
    return {
        "params": chosen,
        "tuning_sweep": tried,
        "recall_at_k": round(holdout, 4),
        "k": k,
        "target": target,
        "holdout_queries": len(xq_holdout),
        "holdout_qps": round(len(xq_holdout) / max(search_s, 1e-9), 1),
    }


def save(index: faiss.Index, path) -> None:
    faiss.write_index(index, str(path))


def load(path, mmap: bool = False) -> faiss.Index:
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    return faiss.read_index(str(path), flags)
