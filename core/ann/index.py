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

from core.ann import ivf_lists

log = logging.getLogger(__name__)

# Up to this many items `auto` builds Flat, HNSW32 and IVF-Flat at 3 list counts, and keeps the one
# with the highest measured query throughput at the recall target (each build takes seconds here).
MEASURED_CHOICE_MAX_ITEMS = 200_000
# ...up to this many `build_tuned` measures HNSW32 against IVF-Flat at 2 and 4*sqrt(n) lists (which one
# is fastest at the target depends on the machine), and the distributed rebuild takes prior_spec. Above
# it HNSW32's graph build dominates the rebuild (10M items: 2,659 s of a 2,782 s rebuild on 2 cores), so
# `auto` is IVF-Flat alone, whose k-means on a sample and list assignment grow far slower with n.
HNSW_MAX_ITEMS = 2_000_000
# faiss 1.15 switches flat distance computation to BLAS only when n_queries * d >= 128000; below that a
# batch of 1000 queries on 1M x 64 ran 10x slower. 20 queries is where BLAS starts to pay.
BLAS_THRESHOLD = 20
# ~1.1-1.25x steps: with powers of 2 the cheapest setting that reaches the target can overshoot it by 2x
# in cost (1M items: nprobe 16 gave recall 0.946, so tuning jumped to 32 and lost 40% of the QPS), and
# every step up on a held-out miss (`_confirm`) costs QPS.
NPROBES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 18, 20, 22, 24, 27, 30, 33, 36, 40, 44, 48, 56, 64, 72, 80, 96, 112, 128, 160, 192, 256, 320, 384, 512)  # fmt: skip
EF_SEARCH = (10, 11, 12, 13, 14, 16, 18, 20, 22, 24, 27, 30, 33, 36, 40, 44, 48, 56, 64, 72, 80, 96, 112, 128, 160, 192, 256, 384, 512)  # fmt: skip
K_FACTORS = (16, 32, 64, 128)  # fast-scan PQ's 4-bit codes need a deep refine to reach 0.95


def configure(threads: int) -> None:
    """Call once per process that builds or searches (entrypoints, replicas), not at import."""
    faiss.omp_set_num_threads(threads)
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD


@dataclasses.dataclass(frozen=True)
class IndexSpec:
    kind: str  # "flat" | "ivf" | "hnsw" | "ivfpq"
    factory: str
    train_sample: int  # 0 = no training
    kmeans_iters: int = 10  # of the coarse quantizer (faiss' default)
    refit: bool = False  # IVF: centroids moved to their lists' means after the add (core.ann.ivf_lists)


KINDS = ("auto", "flat", "ivf", "hnsw", "ivfpq")


def choose_spec(n: int, d: int, kind: str) -> IndexSpec:
    """The spec of one index family sized for n vectors of dimension d ("auto": see auto_specs)."""
    if kind == "auto":
        raise ValueError("kind 'auto' is several specs measured against each other: use auto_specs")
    if kind == "flat":
        return IndexSpec("flat", "IDMap2,Flat", 0)
    if kind == "hnsw":
        return IndexSpec("hnsw", "IDMap2,HNSW32,Flat", 0)
    if kind not in ("ivf", "ivfpq"):
        raise ValueError(f"unknown index kind {kind!r}; expected one of {', '.join(KINDS[1:])}")
    # ~4*sqrt(n) lists (faiss' guidance: 4-16*sqrt(n))
    return ivf_spec(n, d, 4.0) if kind == "ivf" else ivf_spec(n, d, 4.0, pq=True)


def _lists(target: float, steps: tuple[float, ...]) -> int:
    """The list count nearest `target` (in ratio) among step x 2^k, within [16, 65536]."""
    options = [int(m * 2**e) for e in range(4, 17) for m in steps if 16 <= m * 2**e <= 65536]
    return min(options, key=lambda x: abs(math.log(x / max(target, 1.0))))


def ivf_spec(
    n: int, d: int, lists_per_sqrt_n: float, pq: bool = False, nlist: int = 0, per_list: int = 64,
    iters: int = 10, refit: bool = False, codes: str = "Flat", steps: tuple[float, ...] = (1.0,),
) -> IndexSpec:  # fmt: skip
    """IVF with ~lists_per_sqrt_n * sqrt(n) lists (a power of 2, or step x a power of 2), or exactly
    `nlist` if given, its k-means run `iters` times over `per_list` points per list; `codes` "Flat"
    (float32) or "SQfp16" (half the bytes per vector, scored exactly afterwards: `core.ann.ivf_lists.rescore`)."""
    nlist = nlist or _lists(lists_per_sqrt_n * math.sqrt(max(n, 1)), steps)
    # 64 training points per list: within faiss' 39-256 guidance and 3-4x faster than training on all.
    sample = min(n, per_list * nlist)
    if not pq:
        return IndexSpec("ivf", f"IVF{nlist},{codes}", sample, iters, refit)
    m = d // 2 if d % 2 == 0 else d
    return IndexSpec("ivfpq", f"IDMap2,IVF{nlist},PQ{m}x4fs,RFlat", sample)


def auto_specs(n: int, d: int) -> list[IndexSpec]:
    """What `auto` builds, measures and chooses from (one spec: nothing to measure).
    Up to MEASURED_CHOICE_MAX_ITEMS: exact, HNSW32, and IVF-Flat at three list counts (the fastest at
    the target depends on the data: 512 lists won on a 9.7k-item catalog, where 4*sqrt(n) rounds to
    512, but fewer lists were faster at 1M). Up to HNSW_MAX_ITEMS: HNSW32 and IVF-Flat at 2 and
    4*sqrt(n). Above: IVF-Flat at 2*sqrt(n), not 4: k-means costs sample x lists = 64 * lists^2, so 10M
    items train 8192 lists on 524k vectors instead of 16384 on 1M (4x less), and 1M items showed the
    same QPS at the target for 4096 and 8192 lists (README, ANN)."""
    if n > HNSW_MAX_ITEMS:
        return [ivf_spec(n, d, 2.0)]
    specs = [choose_spec(n, d, "hnsw")] + [ivf_spec(n, d, c) for c in (2.0, 4.0)]
    if n <= MEASURED_CHOICE_MAX_ITEMS:
        specs = [choose_spec(n, d, "flat")] + specs + [ivf_spec(n, d, 8.0)]
    return list(dict.fromkeys(specs))  # small n: list counts may coincide


def prior_spec(n: int, d: int) -> IndexSpec:
    """`auto` above MEASURED_CHOICE_MAX_ITEMS, without building candidates. Up to HNSW_MAX_ITEMS:
    IVF at ~6*sqrt(n) lists (1M: 6144) with fp16 codes, trained for the k-means cost of 4*sqrt(n)
    lists at 64 points x 10 iterations (points x lists x iterations: 48 x 6 at 1.5x the lists), then
    every centroid refit to its list's mean. At 1M on 2 cores (README, ANN): scanning is memory-bound,
    so fp16 codes search 1.4x faster than float32 ones at the same recall; more lists scan fewer
    vectors but cost more coarse search, and 6144 sits between 4096 (best where BLAS is slow) and 8192
    (best where it is fast). The refit gives back what a short k-means loses where it loses anything
    (8192 lists after 4 iterations: nprobe 27 -> 24 at the target) and costs 0.1-0.3 s. Above:
    2*sqrt(n) float32 lists fully trained (k-means costs 64 * lists^2 * d per iteration)."""
    if n <= HNSW_MAX_ITEMS:
        return ivf_spec(n, d, 6.0, per_list=48, iters=6, refit=True, codes="SQfp16", steps=(1.0, 1.5))
    return ivf_spec(n, d, 2.0)


def approximate(spec: IndexSpec) -> bool:
    """Whether the index's own scores are approximate (compressed codes): its hits are rescored."""
    return ",SQ" in spec.factory


MERGEABLE = ("flat", "ivf")  # families whose shards faiss merges (IVF: list by list); HNSW graphs do not


def index_bytes(spec: IndexSpec, n: int, d: int) -> int:
    """Memory an index of n vectors takes (what a process holding it, merged, must have)."""
    per = (2 if ",SQfp16" in spec.factory else 4) * d + 8  # codes + id (IVF: in its lists, IDMap2: its map)
    if spec.kind == "hnsw":
        per += 32 * 2 * 4 + 16  # level-0 links (2M) + upper levels and bookkeeping, about
    if spec.kind == "ivfpq":
        per += d // 4  # 4-bit codes of the fast-scan PQ, besides the refine's flat vectors
    return n * per


def new_index(spec: IndexSpec, d: int) -> faiss.Index:
    """The untrained index of `spec`, its k-means iterations set."""
    index = faiss.index_factory(d, spec.factory, faiss.METRIC_INNER_PRODUCT)
    if spec.kind in ("ivf", "ivfpq"):
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = spec.kmeans_iters
        if approximate(spec):
            ivf.by_residual = False  # codes of the vectors themselves: a refit keeps them valid
    return index


def build(spec: IndexSpec, xb: np.ndarray, ids: np.ndarray, seed: int = 0) -> tuple[faiss.Index, dict]:
    """xb: (N, D) float32 unit rows; ids: (N,) int64. Returns the index and train/add seconds."""
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    index = new_index(spec, xb.shape[1])
    t0 = time.perf_counter()
    if spec.train_sample:
        rng = np.random.default_rng(seed)
        sample = xb[np.sort(rng.choice(len(xb), size=spec.train_sample, replace=False))]
        index.train(sample)
    t1 = time.perf_counter()
    index.add_with_ids(xb, ids)
    if spec.refit:
        ivf_lists.refit_centroids([index], *ivf_lists.list_sums(index))
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
        return [{"efSearch": e} for e in EF_SEARCH]
    nlist = int(next(t for t in spec.factory.split(",") if t.startswith("IVF"))[3:])
    probes = [p for p in NPROBES if p <= nlist]
    if spec.kind == "ivf":
        return [{"nprobe": p} for p in probes]
    return [{"nprobe": p, "k_factor": k} for p in probes for k in K_FACTORS]


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


def query_recalls(
    xb: np.ndarray,
    ids: np.ndarray,
    xq: np.ndarray,
    found_ids: np.ndarray,
    k: int,
    exact_rows: np.ndarray | None = None,
) -> np.ndarray:
    """Tie-tolerant recall@k of each query (Q,): a returned id counts if its TRUE score reaches the
    exact k-th score (minus float slack), so equal-score neighbours swapped by the ANN are not misses."""
    if exact_rows is None:
        exact_rows = exact_topk(xb, xq, k)
    kth = np.einsum("qd,qd->q", xq, xb[exact_rows[:, k - 1]])  # (Q,)
    order = np.argsort(ids)
    pos = np.searchsorted(ids, found_ids.clip(min=0), sorter=order)
    rows = order[np.clip(pos, 0, len(ids) - 1)]
    valid = (found_ids >= 0) & (ids[rows] == found_ids)
    true = np.einsum("qd,qkd->qk", xq, xb[rows])  # (Q, k)
    hits = valid & (true >= kth[:, None] - 1e-5)
    return hits[:, :k].sum(1) / k


def recall_at_k(xb, ids, xq, found_ids, k: int, exact_rows=None) -> float:
    """The mean of `query_recalls`."""
    return float(query_recalls(xb, ids, xq, found_ids, k, exact_rows).mean())


# One-sided 95%: the held-out queries are a sample of the users; the gate wants the recall of the users
# it did not see, so it requires the lower end of the interval, not the sample mean, to reach the target.
Z_LOWER_95 = 1.645


@dataclasses.dataclass(frozen=True)
class RecallEstimate:
    """Mean recall@k over a sample of queries, with a normal-approximation interval over queries."""

    mean: float
    lower_95: float  # one-sided: the population mean is above this with 95% confidence
    ci95: tuple[float, float]  # two-sided, for the record
    queries: int

    @classmethod
    def of(cls, per_query: np.ndarray) -> RecallEstimate:
        r = np.asarray(per_query, np.float64)
        se = float(r.std(ddof=1) / np.sqrt(len(r))) if len(r) > 1 else 1.0
        m = float(r.mean()) if len(r) else 0.0
        return cls(m, m - Z_LOWER_95 * se, (m - 1.96 * se, min(1.0, m + 1.96 * se)), len(r))

    def record(self) -> dict:
        return {"recall_at_k": round(self.mean, 4), "recall_lower_95": round(self.lower_95, 4),
                "recall_ci95": [round(self.ci95[0], 4), round(self.ci95[1], 4)]}  # fmt: skip


def _tune(grid: list[dict], recall_tune, target: float) -> tuple[int, list, bool]:
    """Position in `grid` of the cheapest setting whose recall on the tuning queries (`recall_tune(p)`)
    reaches `target` (else the most accurate one), with the settings tried and whether it was reached."""
    tried = []
    for i, p in enumerate(grid):
        r = float(np.mean(recall_tune(p)))
        tried.append({**p, "recall": round(r, 4)})
        log.info("params %s: tuning recall %.4f", p, r)
        if r >= target:
            return i, tried, True
    return len(grid) - 1, tried, False


def _confirm(grid: list[dict], start: int, recall_tune, recall_hold, target: float):
    """From grid position `start` (reached the target on the tuning queries) step up until the setting
    reaches it on the disjoint held-out queries as well, at the lower end of their one-sided 95%
    interval: a setting chosen because its sample mean just passed was, for users outside the sample,
    below the target about half the time (a 4-shard 300k build: 0.949 +/- 0.0065 on a fresh sample).
    Returns (params, held-out RecallEstimate, steps): the most accurate setting tried if none reaches
    it (the gate then refuses)."""
    steps = []
    for i in range(start, len(grid)):
        p = grid[i]
        hold = RecallEstimate.of(recall_hold(p))
        tune = float(np.mean(recall_tune(p))) if i > start else None  # at `start` the tuning recall is known
        steps.append({**p, "holdout_recall": round(hold.mean, 4), "holdout_lower_95": round(hold.lower_95, 4),
                      "tuning_recall": tune and round(tune, 4)})  # fmt: skip
        if hold.lower_95 >= target and (tune is None or tune >= target):
            break
    return grid[i], hold, steps


def tune_setting(spec: IndexSpec, recall_tune, recall_hold, target: float) -> dict:
    """The cheapest search setting of `spec` that reaches `target` on the tuning queries and then on the
    held-out ones; `recall_*(params) -> recall@k` search wherever the index lives (one process, or
    every shard's worker). Returns the quality fields the manifest records."""
    grid = candidate_params(spec)
    pos, tried, reached = _tune(grid, recall_tune, target)
    if reached:
        params, hold, steps = _confirm(grid, pos, recall_tune, recall_hold, target)
    else:
        params, hold, steps = grid[pos], RecallEstimate.of(recall_hold(grid[pos])), []
    return {"params": params, "tuning_sweep": tried, **hold.record(), "tuning_reached_target": reached,
            "holdout_steps": steps}  # fmt: skip


def batch_qps(
    points: list[tuple], xq: np.ndarray, k: int, rounds: int = 5, min_s: float = 0.05
) -> list[float]:
    """Queries per second of each (index, spec, params) point searching `xq` in one call: the median of
    `rounds` timings of >= `min_s` each, the points visited in turn (A B C A B C ...). On a shared 2-core
    machine one point timed alone read 22k-40k QPS from one run to the next; interleaving spreads that
    drift over all points instead of handing it to whichever was timed last."""
    rates: list[list[float]] = [[] for _ in points]
    for _ in range(rounds):
        for (index, spec, params), out in zip(points, rates, strict=True):
            passes, t0 = 0, time.perf_counter()
            while passes == 0 or time.perf_counter() - t0 < min_s:
                search(index, spec, params, xq, k)
                passes += 1
            out.append(passes * len(xq) / (time.perf_counter() - t0))
    return [float(np.median(r)) for r in rates]


def _recall_fn(index, spec: IndexSpec, xb, ids, xq, k: int, exact):
    return lambda p: query_recalls(xb, ids, xq, search(index, spec, p, xq, k)[1], k, exact)


@dataclasses.dataclass(eq=False)
class _Candidate:
    """One index family built and tuned by `build_tuned`: the index, the grid position of the cheapest
    setting that reached the target on the tuning queries (else the most accurate), what was tried."""

    index: faiss.Index | None
    spec: IndexSpec
    pos: int
    tried: list
    reached: bool
    qps: float | None = None

    @property
    def params(self) -> dict:
        return candidate_params(self.spec)[self.pos]


def build_tuned(
    xb: np.ndarray,
    ids: np.ndarray,
    xq_tune: np.ndarray,
    xq_holdout: np.ndarray,
    k: int,
    target: float,
    kind: str = "auto",
    seed: int = 0,
) -> tuple[faiss.Index, IndexSpec, dict, dict]:
    """Build the index and choose its search setting: the cheapest one whose recall@k reaches `target`
    on the tuning queries and then on the disjoint held-out queries too (`_confirm`). With kind="auto"
    every spec of `auto_specs` is built and tuned, and the one with the highest measured batch QPS on
    the tuning queries at the target wins (batch QPS is what a rebuild's offline consumers and the
    benchmarks measure; /retrieve's single-query latency favours HNSW by 1.3-1.5x, README). The
    held-out recall at the chosen setting gates publishing. Returns (index, spec, quality, timings)."""
    n, d = xb.shape
    specs = auto_specs(n, d) if kind == "auto" else [choose_spec(n, d, kind)]
    measured = len(specs) > 1
    exact_tune = exact_topk(xb, xq_tune, k)
    timings = {"index_train_s": 0.0, "index_add_s": 0.0}
    built: list[_Candidate] = []
    for spec in specs:
        index, t = build(spec, xb, ids, seed=seed)
        timings["index_train_s"] += t["index_train_s"]
        timings["index_add_s"] += t["index_add_s"]
        built.append(
            _Candidate(
                index,
                spec,
                *_tune(
                    candidate_params(spec), _recall_fn(index, spec, xb, ids, xq_tune, k, exact_tune), target
                ),
            )
        )
    # one that missed the target cannot beat one that reached it: only those that reached it (all, if
    # none did) are timed, together, so they stay in memory until then (1M items: ~1 GB for three)
    contenders = [c for c in built if c.reached] or built
    for c in built:
        if c not in contenders:
            c.index = None  # free it now
    if measured:
        qps = batch_qps([(c.index, c.spec, c.params) for c in contenders], xq_tune, k)
        for c, q in zip(contenders, qps, strict=True):
            c.qps = q
    candidates = []
    for c in built:
        row = {
            "factory": c.spec.factory,
            "params": c.params,
            "tuning_recall": c.tried[-1]["recall"],
            "reached_target": c.reached,
            "tuning_qps": c.qps,  # None: not timed (missed the target) or nothing to compare
        }
        candidates.append(row)
        log.info("index candidate %s", row)
    best = max(contenders, key=lambda c: (c.reached, c.qps or 0.0))  # the first one on a tie
    index, spec, pos, tried, reached = best.index, best.spec, best.pos, best.tried, best.reached
    del built, contenders, best
    if reached:
        params, holdout, confirm = _confirm(
            candidate_params(spec), pos, _recall_fn(index, spec, xb, ids, xq_tune, k, exact_tune),
            _recall_fn(index, spec, xb, ids, xq_holdout, k, exact_topk(xb, xq_holdout, k)), target,
        )  # fmt: skip
    else:  # nothing reached the target on the tuning queries: report the most accurate setting
        params = candidate_params(spec)[pos]
        holdout = RecallEstimate.of(
            query_recalls(xb, ids, xq_holdout, search(index, spec, params, xq_holdout, k)[1], k)
        )
        confirm = []
    t0 = time.perf_counter()
    search(index, spec, params, xq_holdout, k)
    search_s = time.perf_counter() - t0
    quality = {
        "params": params,
        "tuning_sweep": tried,
        **holdout.record(),
        "k": k,
        "target": target,
        "tuning_queries": len(xq_tune),
        "holdout_queries": len(xq_holdout),
        "holdout_qps": round(len(xq_holdout) / max(search_s, 1e-9), 1),
        "tuning_reached_target": reached,
        "holdout_steps": confirm,  # settings checked on the held-out queries, from the tuning choice up
        "selection": "measured" if measured else ("default" if kind == "auto" else "requested"),
        "candidates": candidates,
    }
    timings = {key: round(v, 3) for key, v in timings.items()}
    return index, spec, quality, timings


def merge_topk(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of several (scores (Q, k_i), ids (Q, k_i)) lists over disjoint id sets, best first."""
    D = np.concatenate([r[0] for r in results], axis=1)
    I = np.concatenate([r[1] for r in results], axis=1)
    D = np.where(I >= 0, D, -np.inf)
    order = np.argsort(-D, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)


class ShardedIndex:
    """Several indexes over disjoint ids searched as one: each shard answers its top-k with the same
    search parameters, and the lists are merged. Shards built from one trained IVF index probe the
    same lists a merged index would, so the answers are those of the merged index."""

    def __init__(self, shards: list[faiss.Index]):
        if not shards:
            raise ValueError("a sharded index needs at least one shard")
        self.shards = shards
        self.d = shards[0].d

    @property
    def ntotal(self) -> int:
        return int(sum(s.ntotal for s in self.shards))

    def search(self, xq: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
        return merge_topk([s.search(xq, k, params=params) for s in self.shards], k)


def save(index: faiss.Index, path) -> None:
    faiss.write_index(index, str(path))


def load(path, mmap: bool = False) -> faiss.Index:
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    return faiss.read_index(str(path), flags)
