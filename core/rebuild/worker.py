"""What one index-assembly worker does, and the pool the rebuild drives its workers through.

The embedding runs before, on Ray Data's actor pool (jobs.embed_data; in-process in the unit tests,
core.rebuild.parts.embed_locally). A `Worker` assembles what it committed: it counts and reads part
rows, trains the one empty index, adds shards and holds them, so the search-parameter tuning can query
every shard where it lives. jobs.rebuild_index runs one Worker per Ray actor (`RayPool`); the unit
tests run them in-process (`LocalPool`). Both pools hand out the same calls, so the orchestration
(core.rebuild.build) is the same code with or without Ray.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np

from core.ann import index as ann
from core.ann import ivf_lists
from core.rebuild import parts as partmod
from core.rebuild import shards as sh


class Worker:
    def __init__(self, threads: int, node: str = "local", faiss_threads: int | None = None):
        self.node = node
        self.faiss_threads = faiss_threads or threads
        ann.configure(self.faiss_threads)
        self.shards: dict[int, faiss.Index] = {}
        self.items_table: tuple[str, str] | None = None  # (ids, vectors) .npy of the build being added
        self._table_maps: tuple | None = None  # those files memory-mapped, opened once by `search`

    def ready(self) -> str:
        return self.node

    def count(self, part: str, ranges: list[tuple[int, int]]) -> list[int]:
        return sh.count_in_ranges(Path(part), ranges)

    def read_rows(self, picks: list[tuple[str, list[int]]], column: str = "vectors") -> np.ndarray:
        """Rows of committed parts, in the order given: (part dir, sorted local rows) pairs."""
        out = []
        for d, rows in picks:
            ids, x = partmod.open_part(Path(d))
            out.append(np.array((x if column == "vectors" else ids)[np.asarray(rows, np.int64)]))
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    def train(self, spec: ann.IndexSpec, d: int, picks: list[tuple[str, list[int]]]) -> tuple[bytes, float]:
        """The one training of the build. Every other worker waits for it, so its k-means takes every
        core this process may run on (1M items: 14.9 s on 1 thread, ~10 s on 2), then gives them back."""
        t0 = time.perf_counter()
        sample = self.read_rows(picks) if picks else None
        faiss.omp_set_num_threads(max(self.faiss_threads, len(os.sched_getaffinity(0))))
        try:
            return sh.train_empty(spec, d, sample), round(time.perf_counter() - t0, 3)
        finally:
            faiss.omp_set_num_threads(self.faiss_threads)

    def build_shard(
        self,
        plan: sh.ShardPlan,
        what: str,
        version: str,
        table: tuple[str, str],
        empty: bytes | None,
        queries: np.ndarray | None,
        k: int,
    ) -> dict:
        """Gather the shard's rows, write them into the global tables; for items also add them to a copy
        of the trained empty index (kept here for tuning) and answer the exact top-k of `queries`."""
        rec = {"shard": plan.shard, "rows": plan.rows, "id_lo": plan.lo, "id_hi": plan.hi,
               "row_offset": plan.offset, "parts": len(plan.part_dirs), "checkpoint_version": version,
               "node": self.node}  # fmt: skip
        index = None if empty is None else sh.empty_index(empty)
        spent = {"write_s": 0.0, "add_s": 0.0, "exact_s": 0.0}
        exact, offset = [], plan.offset
        for ids, x in sh.chunks(plan, what, version):
            t0 = time.perf_counter()
            sh.write_rows(Path(table[0]), Path(table[1]), offset, ids, x)
            offset += len(ids)
            t1 = time.perf_counter()
            if index is not None:
                sh.add(index, ids, x)
                t2 = time.perf_counter()
                exact = [ann.merge_topk(exact + [sh.exact_topk(ids, x, queries, k)], k)]
                spent["add_s"] += t2 - t1
                spent["exact_s"] += time.perf_counter() - t2
            spent["write_s"] += t1 - t0
        if index is not None:
            self.shards[plan.shard] = index
            if self.items_table != table:  # where `search` rescores compressed codes
                self.items_table, self._table_maps = table, None
            rec["exact"] = exact[0]
        rec.update({key: round(v, 3) for key, v in spent.items() if index is not None or key == "write_s"})
        return rec

    def search(
        self, spec: ann.IndexSpec, params: dict, xq: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over the shards this worker holds (empty lists if none)."""
        if not self.shards:
            q = len(xq)
            return np.full((q, k), -np.inf, np.float32), np.full((q, k), -1, np.int64)
        index = ann.ShardedIndex([self.shards[s] for s in sorted(self.shards)])
        D, I = ann.search(index, spec, params, xq, k)
        if ann.approximate(spec):  # exact scores from the rows this worker wrote into the table
            if self._table_maps is None:
                self._table_maps = tuple(np.load(f, mmap_mode="r") for f in self.items_table)
            D, I = ivf_lists.rescore(xq, D, I, *self._table_maps)
        return D, I

    def list_sums(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-list vector sums and counts over the IVF shards this worker holds (for the refit)."""
        got = [ivf_lists.list_sums(self.shards[s]) for s in sorted(self.shards)]
        return sum(g[0] for g in got), sum(g[1] for g in got)

    def refit(self, sums: np.ndarray, counts: np.ndarray) -> None:
        if self.shards:
            ivf_lists.refit_centroids(list(self.shards.values()), sums, counts)

    def save_shards(self, paths: dict[int, str]) -> None:
        for s, p in paths.items():
            ann.save(self.shards[s], p)

    def merge(self, shard_paths: list[str], out: str) -> int:
        """One index from shards of one trained index (IVF: inverted lists are appended list by list)."""
        merged = ann.load(shard_paths[0])
        for p in shard_paths[1:]:
            merged.merge_from(ann.load(p), 0)
        ann.save(merged, out)
        return int(merged.ntotal)

    def build_small(self, table: tuple[str, str], xq_tune, xq_hold, opts, out: str) -> tuple:
        """The whole (small) catalog in this worker: every candidate family built and measured
        (core.ann.index.build_tuned), the winner written to `out`."""
        ids, x = np.load(table[0], mmap_mode="r"), np.load(table[1], mmap_mode="r")
        idx, spec, quality, timings = ann.build_tuned(
            np.array(x),
            np.array(ids),
            xq_tune,
            xq_hold,
            opts.k,
            opts.target_recall,
            opts.kind,
            seed=opts.seed,
        )
        ann.save(idx, out)
        return spec, quality, timings

    def free(self) -> None:
        self.shards.clear()


class Pool(Protocol):
    size: int

    def nodes(self) -> list[str]: ...

    def on(self, calls: list[tuple[int, str, tuple]]) -> list:
        """(worker, method, args) calls, run concurrently; their results in order."""

    def on_each(self, calls: list[tuple[int, str, tuple]]) -> Iterator[tuple[int, Any]]:
        """The same calls; yields (call number, result) as each finishes."""


class LocalPool:
    """Workers in this process, one call at a time (unit tests, and what the pool protocol means)."""

    def __init__(self, workers: list[Worker]):
        self.workers = workers
        self.size = len(workers)

    def nodes(self) -> list[str]:
        return [w.node for w in self.workers]

    def on(self, calls: list[tuple[int, str, tuple]]) -> list:
        return [getattr(self.workers[w], m)(*a) for w, m, a in calls]

    def on_each(self, calls: list[tuple[int, str, tuple]]) -> Iterator[tuple[int, Any]]:
        for i, (w, m, a) in enumerate(calls):
            yield i, getattr(self.workers[w], m)(*a)
