"""recall@10 vs QPS of the index families core.ann.index can build, on a published build's own vectors.

Items are the build's item_embeddings.npy, queries are its user_embeddings.npy (the real queries). Every
family is built with core.ann.index.build and searched with per-call parameters; recall is core.ann.index's
tie-tolerant recall@k against exact search. Timing: each repeat visits every (family, params) point once
(A B C ... A B C, so the noise of a shared machine spreads over all points); batch QPS = queries / time
of searching them `--batch` at a time; each batch timing loops over the query set for >= --min-time-s; single-query latency = one query per
call with --single-threads faiss threads (default 1: with 2 OpenMP threads on a loaded 2-core machine each
call waits for a descheduled thread at the barrier, p50 1-5 ms instead of 0.15 ms on a 10k Flat), and
single_qps = 1 / p50 latency. Medians over repeats.
The build's own index (loaded from the build, at its published setting) is measured beside them as
the point "build": the job's automatic choice, with the training it had.

python -m benchmarks.ann_sweep --build /tmp/bench/reg-1m/builds/<id> --name synth-1m --ivf-nlists 1024 2048 8192
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import faiss
import numpy as np

from core.ann import index as ann
from core.ann import ivf_lists
from core.storage.build_dir import BuildDir


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    build: Path
    name: str
    families: tuple[str, ...] = ("flat", "ivf", "hnsw", "ivfpq")
    ivf_nlists: tuple[int, ...] = ()  # extra IVF-Flat list counts besides choose_spec's
    sq_nlists: tuple[int, ...] = ()  # IVF with fp16 codes (fully trained) at these list counts
    queries: int = 2000
    batch: int = 1000
    latency_queries: int = 50  # single-query calls per point per repeat
    repeats: int = 5
    threads: int = 2
    single_threads: int = 1  # see the module docstring
    min_time_s: float = 0.2  # per batch-QPS timing
    k: int = 10
    target: float = 0.95
    seed: int = 1  # the rebuild tunes with seed 0: a different query sample here
    suffix: str = ""  # output file name suffix
    out_dir: Path = Path("benchmarks/results")


@dataclasses.dataclass
class Point:
    family: str
    spec: ann.IndexSpec
    params: dict
    recall: float = 0.0
    batch_s: list[float] = dataclasses.field(default_factory=list)
    single_s: list[float] = dataclasses.field(default_factory=list)


def specs(cfg: SweepConfig, n: int, d: int) -> list[tuple[str, ann.IndexSpec]]:
    out = [(f, ann.choose_spec(n, d, f)) for f in cfg.families]
    for nlist in cfg.ivf_nlists:
        out.append((f"ivf{nlist}", ann.IndexSpec("ivf", f"IVF{nlist},Flat", min(n, 64 * nlist))))
    for nlist in cfg.sq_nlists:
        out.append((f"ivf{nlist}fp16", ann.IndexSpec("ivf", f"IVF{nlist},SQfp16", min(n, 64 * nlist))))
    return out


class Rescored:
    """An index searched as serving searches it: compressed codes' hits rescored from the table."""

    def __init__(self, index, ids, xb):
        self.index, self.ids, self.xb = index, ids, xb

    def search(self, xq, k, params=None):
        D, I = self.index.search(xq, k, params=params)
        return ivf_lists.rescore(xq, D, I, self.ids, self.xb)


def grid(spec: ann.IndexSpec) -> list[dict]:
    return ann.candidate_params(spec)  # the rebuild's own tuning grid: its choice is always a point here


def time_point(index, pt: Point, xq: np.ndarray, cfg: SweepConfig, rng: np.random.Generator) -> None:
    passes, t0 = 0, time.perf_counter()
    while passes == 0 or time.perf_counter() - t0 < cfg.min_time_s:  # small sets: several passes
        for s in range(0, len(xq), cfg.batch):
            ann.search(index, pt.spec, pt.params, xq[s : s + cfg.batch], cfg.k)
        passes += 1
    pt.batch_s.append((time.perf_counter() - t0) / passes)
    faiss.omp_set_num_threads(cfg.single_threads)
    for q in rng.choice(len(xq), size=min(cfg.latency_queries, len(xq)), replace=False):
        t0 = time.perf_counter()
        ann.search(index, pt.spec, pt.params, xq[q : q + 1], cfg.k)
        pt.single_s.append(time.perf_counter() - t0)
    faiss.omp_set_num_threads(cfg.threads)


def run(cfg: SweepConfig) -> dict:
    ann.configure(cfg.threads)
    bd = BuildDir(cfg.build)
    manifest = bd.read_manifest()
    ids, xb = (np.array(a) for a in bd.open_items())  # (N,), (N, D)
    users = bd.open_users(manifest)[1]  # (U, D)
    if not len(users):
        raise SystemExit(f"build {cfg.build} has no user table: the sweep's queries are its users")
    rng = np.random.default_rng(cfg.seed)
    xq = np.ascontiguousarray(users[np.sort(rng.choice(len(users), min(cfg.queries, len(users)), False))])
    n, d = xb.shape
    print(
        f"{cfg.name}: {n:,} items x {d}, {len(xq)} user queries, faiss threads {faiss.omp_get_max_threads()}"
    )
    exact = ann.exact_topk(xb, xq, cfg.k)

    builds, indexes, points = {}, {}, []
    for fam, spec in specs(cfg, n, d):
        t0 = time.perf_counter()
        index, t = ann.build(spec, xb, ids)
        builds[fam] = {"factory": spec.factory, **t, "build_s": round(time.perf_counter() - t0, 3)}
        print(f"  built {spec.factory} in {builds[fam]['build_s']:.1f}s", flush=True)
        indexes[fam] = index
        for p in grid(spec):
            pt = Point(fam, spec, p)
            pt.recall = ann.recall_at_k(xb, ids, xq, ann.search(index, spec, p, xq, cfg.k)[1], cfg.k, exact)
            points.append(pt)
    # the build's own index as published (its training and refit, its search setting), not a rebuild
    # of its factory string
    mi = manifest.index
    indexes["build"] = bd.load_index(manifest)
    auto = Point("build", ann.IndexSpec(mi.type, mi.factory, mi.train_sample, mi.kmeans_iters, mi.refit),
                 mi.search_params)  # fmt: skip
    found = ann.search(indexes["build"], auto.spec, auto.params, xq, cfg.k)[1]
    auto.recall = ann.recall_at_k(xb, ids, xq, found, cfg.k, exact)
    points.append(auto)
    if ann.approximate(auto.spec):  # and as served: its hits rescored in float32 (core.serving.live_build)
        indexes["build_served"] = Rescored(indexes["build"], ids, xb)
        points.append(dataclasses.replace(auto, family="build_served", batch_s=[], single_s=[]))

    for r in range(cfg.repeats):  # interleaved: every point once per repeat
        for pt in points:
            time_point(indexes[pt.family], pt, xq, cfg, rng)
        print(f"  repeat {r + 1}/{cfg.repeats} done", flush=True)

    rows = [
        {
            "family": pt.family,
            "factory": pt.spec.factory,
            "params": pt.params,
            "recall_at_10": round(pt.recall, 4),
            "batch_qps": round(len(xq) / statistics.median(pt.batch_s), 1),
            "batch_s": pt.batch_s,
            "single_ms_p50": round(1e3 * statistics.median(pt.single_s), 4),
            "single_ms_p99": round(1e3 * float(np.percentile(pt.single_s, 99)), 4),
            "single_qps": round(1 / statistics.median(pt.single_s), 1),  # 1 / p50, see the docstring
            "auto_choice": pt is auto,
        }
        for pt in points
    ]
    ok = [r for r in rows if r["recall_at_10"] >= cfg.target]
    best = max(ok, key=lambda r: r["batch_qps"]) if ok else None
    best_single = max(ok, key=lambda r: r["single_qps"]) if ok else None
    auto_row = next(r for r in rows if r["auto_choice"])
    return {
        "benchmark": "ann_sweep",
        "dataset": cfg.name,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()},
        "items": n,
        "dim": d,
        "queries": len(xq),
        "faiss_version": faiss.__version__,
        "faiss_threads": faiss.omp_get_max_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (libgomp spins, then sleeps)"),
        "builds": builds,
        "manifest_index": dataclasses.asdict(manifest.index),
        "manifest_quality": {k: v for k, v in manifest.quality.items() if k != "tuning_sweep"},
        "manifest_timings": manifest.timings,
        "best_batch_at_target": best,
        "best_single_at_target": best_single,
        "auto": auto_row,
        "auto_vs_best_batch_qps": round(auto_row["batch_qps"] / best["batch_qps"], 3) if best else None,
        "served_vs_best_batch_qps": next(
            (
                round(r["batch_qps"] / best["batch_qps"], 3)
                for r in rows
                if r["family"] == "build_served" and best
            ),
            None,
        ),
        "auto_vs_best_single_qps": round(auto_row["single_qps"] / best_single["single_qps"], 3)
        if best_single
        else None,
        "points": rows,
    }


def plot(result: dict, path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, title in (
        (axes[0], "batch_qps", f"batch of {min(result['config']['batch'], result['queries'])} queries"),
        (axes[1], "single_qps", "one query per call"),
    ):
        for fam in dict.fromkeys(r["family"] for r in result["points"]):
            pts = sorted((r for r in result["points"] if r["family"] == fam), key=lambda r: r["recall_at_10"])
            if fam in ("build", "build_served"):
                continue  # the star below
            label = pts[0]["factory"] if fam != "ivfpq" else f"{pts[0]['factory']} (best k_factor)"
            if fam == "ivfpq":  # upper envelope over k_factor, else the line zig-zags
                pts = [
                    p
                    for p in pts
                    if not any(q[key] > p[key] and q["recall_at_10"] >= p["recall_at_10"] for q in pts)
                ]
            ax.plot([p["recall_at_10"] for p in pts], [p[key] for p in pts], "o-", ms=3, label=label)
        a = result["auto"]
        ax.plot(
            a["recall_at_10"],
            a[key],
            "k*",
            ms=14,
            label=f"the rebuild's choice, {a['factory']} {a['params']}",
        )
        ax.axvline(target, color="grey", ls="--", lw=0.8)
        ax.set(xlabel="recall@10 (tie-tolerant, vs exact)", ylabel="QPS", yscale="log", title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{result['dataset']}: {result['items']:,} items x {result['dim']}, {result['queries']} user queries, "
        f"faiss {result['faiss_version']}, {result['faiss_threads']} threads, OMP_WAIT_POLICY "
        f"{result['omp_wait_policy'].split()[0]}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse(argv: list[str] | None = None) -> SweepConfig:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.ann_sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--build", type=Path, required=True, help="a build directory (registry/builds/<id>)")
    p.add_argument("--name", required=True, help="dataset name used in the output file names")
    p.add_argument(
        "--families", nargs="+", choices=("flat", "ivf", "hnsw", "ivfpq"), default=SweepConfig.families
    )
    p.add_argument("--ivf-nlists", type=int, nargs="*", default=[], help="extra IVF-Flat list counts")
    p.add_argument("--sq-nlists", type=int, nargs="*", default=[], help="IVF-SQfp16 list counts")
    p.add_argument("--queries", type=int, default=2000, help="user queries (all users if fewer)")
    p.add_argument("--batch", type=int, default=1000, help="queries per search call for batch QPS")
    p.add_argument("--latency-queries", type=int, default=50, help="single-query calls per point per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="faiss OpenMP threads (build, batch search)")
    p.add_argument("--single-threads", type=int, default=1, help="faiss threads for single-query calls")
    p.add_argument("--min-time-s", type=float, default=0.2, help="minimum duration of one batch timing")
    p.add_argument("--target", type=float, default=0.95, help="recall@10 the comparison is made at")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--suffix", default="", help="appended to the output file names")
    p.add_argument("--out-dir", type=Path, default=SweepConfig.out_dir)
    a = p.parse_args(argv)
    return SweepConfig(
        a.build, a.name, tuple(a.families), tuple(a.ivf_nlists), tuple(a.sq_nlists), a.queries, a.batch, a.latency_queries,
        a.repeats, a.threads, a.single_threads, a.min_time_s, 10, a.target, a.seed, a.suffix, a.out_dir,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    result = run(cfg)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    stem = cfg.out_dir / f"ann_sweep_{cfg.name}{cfg.suffix}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, stem.with_suffix(".png"), cfg.target)
    for key in ("best_batch_at_target", "best_single_at_target", "auto"):
        r = result[key]
        print(
            f"{key}: {r and {k: r[k] for k in ('factory', 'params', 'recall_at_10', 'batch_qps', 'single_qps')}}"
        )
    print(
        f"auto / best batch QPS: {result['auto_vs_best_batch_qps']} (as served, rescored: "
        f"{result['served_vs_best_batch_qps']}), single: {result['auto_vs_best_single_qps']}"
    )
    print(f"wrote {stem}.json and {stem}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
