"""The rebuild's distributed middle: embed every partition (one run of the embedding, jobs.embed_data),
then, through a worker pool (core.rebuild.worker): gate, write the id-sorted tables, train once, add
shards, tune the search setting where the shards live, and write the index merged or as shards.

The driver (this module) plans and aggregates: per-part and per-shard records, the queries, and top-k
lists. It never holds the catalog's vectors, so its memory does not grow with the catalog.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from core.ann import index as ann
from core.rebuild import parts as partmod
from core.rebuild import shards as sh
from core.rebuild.validate import ValidationError
from core.storage.build_dir import BuildDir

log = logging.getLogger(__name__)

LAYOUTS = ("auto", "merged", "sharded")


@dataclasses.dataclass(frozen=True)
class Embedded:
    records: dict[str, dict]  # part key -> committed part record
    reused: int
    embedded: int

    def of(self, tasks: list[partmod.PartTask], what: str) -> list[dict]:
        return [self.records[t.key] for t in tasks if t.what == what]


def embed_all(embed_parts: Callable, tasks, parts: Path, settings, progress, phase, bucket=None) -> Embedded:
    """Every partition of items AND users, in ONE run of `embed_parts` (tasks -> committed part
    records, as they finish: jobs.embed_data on Ray Data, or parts.embed_locally); committed parts
    that this build would embed identically (a resumed build) are reused, not re-embedded.
    `bucket` (core.rebuild.bucket_parts.BucketParts): where the parts are committed when the nodes share
    no file system; every part is then fetched into `parts` (those already there are kept)."""
    partmod.discard_partial(parts)

    def committed(t):
        if bucket is None:
            return partmod.reusable(parts, t, settings)
        return partmod.matches(bucket.record(t.key), t, settings)

    records = {t.key: r for t in tasks if (r := committed(t)) is not None}
    if records:
        progress(f"resume: reusing {len(records)} of {len(tasks)} committed partitions")
    todo = [t for t in tasks if t.key not in records]
    for rec in embed_parts(todo) if todo else ():
        records[rec["key"]] = rec
        progress(
            f"part {rec['key']}: {rec['rows']:,} rows in {rec['seconds']:.1f}s on node {rec['node'][:12]} "
            f"({len(records)}/{len(tasks)})"
        )
        phase("part_committed")
    missing = [t.key for t in tasks if t.key not in records]
    if missing:  # the embedding ended without every part: never assemble from a partial catalog
        raise ValidationError(
            f"the embedding returned no record for {len(missing)} part(s), e.g. {missing[:3]}"
        )
    if bucket is not None:
        t0 = time.perf_counter()
        fetched = bucket.fetch_all([records[t.key] for t in tasks], parts)
        progress(f"parts from {bucket.url}: {fetched} fetched to this node in {time.perf_counter() - t0:.1f}s, "
                 f"{len(tasks) - fetched} already here")  # fmt: skip
    return Embedded(records, reused=len(tasks) - len(todo), embedded=len(todo))


def check_rows(records: list[dict], expected: int, what: str) -> None:
    got = sum(r["rows"] for r in records)
    if got != expected:
        raise ValidationError(
            f"{what}: expected {expected:,} embedded rows (the input's row count), got {got:,}"
        )


@dataclasses.dataclass(frozen=True)
class IndexPlan:
    spec: ann.IndexSpec
    layout: str  # "merged" | "sharded"
    shards: int
    small: bool  # the whole catalog in one worker, every candidate family measured (build_tuned)


def plan_index(
    n: int, d: int, kind: str, layout: str, budget: int, shards: int, workers: int, nlist: int = 0
) -> IndexPlan:
    """Family, size and layout from the catalog size and the per-process memory budget; no candidate
    is built on the full catalog. Up to MEASURED_CHOICE_MAX_ITEMS the catalog fits one worker easily
    and `auto` measures every family there, as before. Above, `auto` is the prior (ann.prior_spec) and
    only its search setting is measured. `auto` layout merges when the merged index fits the budget
    (one process writes it and every replica loads it whole); otherwise the build stays sharded."""
    if n <= ann.MEASURED_CHOICE_MAX_ITEMS and layout != "sharded" and not nlist and not shards:
        spec = ann.prior_spec(n, d) if kind == "auto" else ann.choose_spec(n, d, kind)
        return IndexPlan(spec, "merged", 1, True)
    spec = ann.prior_spec(n, d) if kind == "auto" else ann.choose_spec(n, d, kind)
    if nlist:
        if spec.kind not in ("ivf", "ivfpq"):
            raise ValidationError(f"--nlist sizes an IVF index; --index {kind} builds {spec.factory}")
        spec = ann.ivf_spec(n, d, 0, pq=spec.kind == "ivfpq", nlist=nlist)
    total = ann.index_bytes(spec, n, d)
    gib = 2**30
    mergeable = spec.kind in ann.MERGEABLE
    if layout == "auto":
        layout = "merged" if mergeable and total <= budget else "sharded"
    if layout == "merged" and total > budget:
        raise ValidationError(
            f"a merged {spec.factory} index of {n:,} vectors takes ~{total / gib:.1f} GiB, over the "
            f"--memory-budget of {budget / gib:.1f} GiB per process; use --layout sharded or raise the budget"
        )
    if layout == "merged" and not mergeable:
        shards = 1  # one worker adds everything: an HNSW graph is built whole

    # A worker holds the shards it built (searched while the setting is tuned) and, while it adds one,
    # that shard's gathered vectors too: at least one shard per worker, and as many more as it takes to
    # keep that within the budget.
    def peak(s: int) -> float:
        return math.ceil(s / workers) * total / s + total / s

    n_shards = shards or max(workers, math.ceil(total / max(budget / 2, 1)))
    while not shards and peak(n_shards) > budget and n_shards < 4096:
        n_shards *= 2
    if peak(n_shards) > budget:
        raise ValidationError(
            f"{n:,} vectors in {spec.factory} take ~{total / gib:.1f} GiB: ~{peak(n_shards) / gib:.1f} GiB at "
            f"peak per worker with {workers} workers and {n_shards} shards, over the --memory-budget of "
            f"{budget / gib:.1f} GiB; add workers or raise the budget"
        )
    return IndexPlan(spec, layout, max(1, min(n_shards, n)), False)


def plan_tables(pool, parts: Path, records: list[dict], n_shards: int) -> list[sh.ShardPlan]:
    ranges = sh.plan_ranges(records, n_shards)
    if not sh.disjoint(records):
        # parts overlap in id: count each range's rows part by part, on the workers (ids only)
        counts = np.zeros(len(ranges), np.int64)
        calls = [(i % pool.size, "count", (str(parts / r["key"]), ranges))
                 for i, r in enumerate(x for x in records if x["rows"])]  # fmt: skip
        for _, c in pool.on_each(calls):
            counts += np.asarray(c, np.int64)
    else:
        counts = [sum(r["rows"] for r in sh.overlapping(records, lo, hi)) for lo, hi in ranges]
    return sh.plan_shards(parts, records, ranges, counts)


def write_table(pool, out: BuildDir, what: str, plans, version: str, d: int, progress) -> list[dict]:
    """A table without an index (users; the items of a small catalog, indexed whole afterwards): each
    range's worker writes its rows in place."""
    ids_p, vec_p = out.table_files(what)
    sh.create_table(ids_p, vec_p, sum(p.rows for p in plans), d)
    calls = [
        (p.shard % pool.size, "build_shard", (p, what, version, (str(ids_p), str(vec_p)), None, None, 0))
        for p in plans
    ]
    recs = pool.on(calls)
    progress(f"{what} table: {sum(p.rows for p in plans):,} rows in {len(plans)} ranges")
    return recs


class GlobalRows:
    """Rows of the embedded parts by global position (parts in key order, rows in id order), read
    through memory maps: what the driver samples query histories from without loading the catalog."""

    def __init__(self, parts: Path, records: list[dict], column: str):
        self.recs = [r for r in records if r["rows"]]
        self.parts, self.column = parts, column
        self.starts = np.cumsum([0] + [r["rows"] for r in self.recs])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def picks(self, positions: np.ndarray) -> list[tuple[str, list[int]]]:
        """(part dir, local rows) for sorted global positions."""
        part = np.searchsorted(self.starts, positions, side="right") - 1
        out = []
        for p in np.unique(part):
            rows = positions[part == p] - self.starts[p]
            out.append((str(self.parts / self.recs[p]["key"]), rows.tolist()))
        return out

    def __getitem__(self, positions) -> np.ndarray:
        positions = np.asarray(positions, np.int64)
        order = np.argsort(positions, kind="stable")
        got = []
        for d, rows in self.picks(positions[order]):
            ids, x = partmod.open_part(Path(d))
            got.append(np.array((ids if self.column == "ids" else x)[np.asarray(rows)]))
        vals = np.concatenate(got)
        out = np.empty_like(vals)
        out[order] = vals
        return out


def build_index(pool, out: BuildDir, plan: IndexPlan, item_records: list[dict], shard_plans, version: str, xq_tune, xq_hold, opts,
                share: Callable, progress, timings: dict) -> tuple[dict, list[dict]]:  # fmt: skip
    """Train once, add the shards on their workers (which also write the items table), tune the search
    setting over every shard, write the index. Returns (quality, shard records)."""
    d = xq_tune.shape[1]
    n = sum(p.rows for p in shard_plans)
    table = tuple(str(f) for f in out.table_files("items"))
    k = opts.k
    if plan.small:
        t0 = time.perf_counter()
        recs = write_table(pool, out, "items", shard_plans, version, d, progress)
        timings["items_table_s"] = round(time.perf_counter() - t0, 3)
        spec, quality, t_idx = pool.on(
            [(0, "build_small", (table, xq_tune, xq_hold, opts, str(out.index_path)))]
        )[0]
        timings.update(t_idx)
        for r in recs:
            r["index_node"] = pool.nodes()[0]  # one index, built by worker 0 from the whole table
        return {**quality, "spec": spec}, recs

    sh.create_table(Path(table[0]), Path(table[1]), n, d)
    spec = plan.spec
    picks = []  # the training sample's rows: none for families that need no training
    if spec.train_sample:
        rng = np.random.default_rng(opts.seed)
        rows = GlobalRows(out.parts_dir, item_records, "vectors")
        picks = rows.picks(
            np.sort(rng.choice(len(rows), size=min(spec.train_sample, len(rows)), replace=False))
        )
    empty, train_s = pool.on([(0, "train", (spec, d, picks))])[0]
    timings["index_train_s"] = train_s
    progress(f"trained {spec.factory} on {spec.train_sample:,} vectors in {train_s:.1f}s")
    t1 = time.perf_counter()
    xq_all = np.concatenate([xq_tune, xq_hold])
    empty_ref, q_ref = share(empty), share(xq_all)
    recs = []
    calls = [
        (p.shard % pool.size, "build_shard", (p, "items", version, table, empty_ref, q_ref, k))
        for p in shard_plans
    ]
    for _, rec in pool.on_each(calls):  # a line per shard as it finishes
        progress(f"shard {rec['shard']}: {rec['rows']:,} items [{rec['id_lo']}, {rec['id_hi']}) added in "
                 f"{rec['add_s']:.1f}s on node {rec['node'][:12]}")  # fmt: skip
        recs.append(rec)
    recs.sort(key=lambda r: r["shard"])
    if spec.refit:  # every list's vectors, summed over the workers: the same centroids in every shard
        holders = sorted({p.shard % pool.size for p in shard_plans})
        got = pool.on([(w, "list_sums", ()) for w in holders])
        sums, counts = sum(g[0] for g in got), sum(g[1] for g in got)
        pool.on([(w, "refit", (sums, counts)) for w in holders])
        progress(f"refit {int((counts > 0).sum()):,} centroids to their lists' means")
    timings["index_add_s"] = round(time.perf_counter() - t1, 3)
    # the exact top-k over all shards, merged: its k-th score is what a found id must reach
    D, _ = ann.merge_topk([r.pop("exact") for r in recs], k)
    kth_tune, kth_hold = D[: len(xq_tune), k - 1], D[len(xq_tune) :, k - 1]
    t2 = time.perf_counter()

    def recall(xq, kth):
        ref = share(xq)

        def at(p: dict) -> float:
            Dp, Ip = ann.merge_topk(pool.on([(w, "search", (spec, p, ref, k)) for w in range(pool.size)]), k)
            return sh.recall_vs_exact(Ip, Dp, kth, k)

        return at

    quality = ann.tune_setting(spec, recall(xq_tune, kth_tune), recall(xq_hold, kth_hold), opts.target_recall)
    timings["recall_s"] = round(time.perf_counter() - t2, 3)
    t3 = time.perf_counter()
    hold_ref = share(xq_hold)
    ts = time.perf_counter()
    pool.on([(w, "search", (spec, quality["params"], hold_ref, k)) for w in range(pool.size)])
    search_s = time.perf_counter() - ts
    quality.update(k=k, target=opts.target_recall, tuning_queries=len(xq_tune), holdout_queries=len(xq_hold),
                   holdout_qps=round(len(xq_hold) / max(search_s, 1e-9), 1), selection="prior" if opts.kind == "auto" else "requested",
                   candidates=[], spec=spec)  # fmt: skip
    if quality["recall_lower_95"] >= opts.target_recall:  # a refused build writes no index
        paths = out.shard_paths(p.shard for p in shard_plans)
        by_worker: dict[int, dict] = {}
        for p in shard_plans:
            by_worker.setdefault(p.shard % pool.size, {})[p.shard] = paths[p.shard]
        pool.on([(w, "save_shards", (ps,)) for w, ps in by_worker.items()])
        pool.on([(w, "free", ()) for w in range(pool.size)])  # before a merge reads them all into one
        if plan.layout == "merged":
            ntotal = pool.on([(0, "merge", ([paths[p.shard] for p in shard_plans], str(out.index_path)))])[0]
            if ntotal != n:
                raise ValidationError(f"merged index holds {ntotal:,} vectors, expected {n:,}")
            for path in paths.values():
                Path(path).unlink()
            Path(next(iter(paths.values()))).parent.rmdir()
        timings["index_write_s"] = round(time.perf_counter() - t3, 3)
    pool.on([(w, "free", ()) for w in range(pool.size)])
    return quality, recs
