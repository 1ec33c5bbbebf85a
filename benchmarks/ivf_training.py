"""How the coarse quantizer's training changes IVF-Flat's search cost, on a build's own vectors.

Each config is LISTS:POINTS_PER_LIST:ITERATIONS[:refit]: k-means on POINTS_PER_LIST x LISTS sampled item
vectors for ITERATIONS iterations (core.ann.index.build, the rebuild's own recipe), optionally followed by
the refit (every centroid moved to its list's unit-norm mean after the add, core.ann.index.refit_centroids).
For each it reports the train and add seconds, the first nprobe of the rebuild's grid whose recall@10
(tie-tolerant, vs exact search, the build's user vectors as queries) reaches --target, the vectors
scanned per query there ("ndis", from faiss' IVF statistics: it does not depend on the machine's
speed), the list-size imbalance factor, and the batch QPS at that nprobe (median of --repeats timings,
the configs visited in turn).

python -m benchmarks.ivf_training --build /tmp/bench/reg-1m/builds/<id> \\
    4096:64:10 8192:64:10 8192:40:4 8192:40:4:refit 6144:48:6:refit --codes SQfp16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import faiss
import numpy as np

from core.ann import index as ann
from core.storage.build_dir import BuildDir


def parse_config(text: str) -> tuple[int, int, int, bool]:
    parts = text.split(":")
    if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "refit"):
        raise argparse.ArgumentTypeError(f"expected LISTS:POINTS_PER_LIST:ITERATIONS[:refit], got {text!r}")
    nlist, per, iters = (int(x) for x in parts[:3])
    return nlist, per, iters, len(parts) == 4


def imbalance(index) -> float:
    ivf = faiss.extract_index_ivf(index)
    sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], np.float64)
    return float((sizes**2).sum() * len(sizes) / sizes.sum() ** 2)


def at_target(index, spec, xb, ids, xq, exact, target) -> tuple[dict, float, float]:
    stats = faiss.cvar.indexIVF_stats
    for params in ann.candidate_params(spec):
        stats.reset()
        found = ann.search(index, spec, params, xq, 10)[1]
        recall = ann.recall_at_k(xb, ids, xq, found, 10, exact)
        if recall >= target:
            return params, recall, stats.ndis / len(xq)
    return params, recall, stats.ndis / len(xq)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.ivf_training", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--build", type=Path, required=True, help="a build directory (registry/builds/<id>)")
    p.add_argument("configs", nargs="+", type=parse_config, metavar="LISTS:PER_LIST:ITERS[:refit]")
    p.add_argument("--codes", choices=("Flat", "SQfp16"), default="Flat", help="the lists' vector codes")
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/ivf_training_synth-1m.json"))
    a = p.parse_args(argv)

    ann.configure(a.threads)
    bd = BuildDir(a.build)
    manifest = bd.read_manifest()
    ids, xb = (np.array(x) for x in bd.open_items())
    users = bd.open_users(manifest)[1]
    rng = np.random.default_rng(1)
    xq = np.ascontiguousarray(users[np.sort(rng.choice(len(users), min(a.queries, len(users)), False))])
    exact = ann.exact_topk(xb, xq, 10)
    rows, indexes = [], []
    specs = [ann.IndexSpec("ivf", f"IVF{nl},{a.codes}", per * nl, it, rf) for nl, per, it, rf in a.configs]
    for spec in specs:
        index, t = ann.build(spec, xb, ids)
        params, recall, ndis = at_target(index, spec, xb, ids, xq, exact, a.target)
        row = {"factory": spec.factory, "points_per_list": spec.train_sample // int(spec.factory[3:].split(",")[0]),
               "iterations": spec.kmeans_iters, "refit": spec.refit, **t, "params": params,
               "recall_at_10": round(recall, 4), "ndis": round(ndis), "imbalance": round(imbalance(index), 3),
               "batch_s": []}  # fmt: skip
        print(json.dumps({k: v for k, v in row.items() if k != "batch_s"}), flush=True)
        rows.append(row)
        indexes.append((index, spec, params))
    for _ in range(a.repeats):  # interleaved, as benchmarks.ann_sweep times
        for row, (index, spec, params) in zip(rows, indexes, strict=True):
            passes, t0 = 0, time.perf_counter()
            while passes == 0 or time.perf_counter() - t0 < 0.3:
                ann.search(index, spec, params, xq, 10)
                passes += 1
            row["batch_s"].append((time.perf_counter() - t0) / passes)
    print(
        "| training | train s | add s | nprobe | ndis | imbalance | batch QPS |\n|---|---|---|---|---|---|---|"
    )
    for row in rows:
        row["batch_qps"] = round(len(xq) / statistics.median(row["batch_s"]))
        name = f"{row['factory'].split(',')[0]}, {row['iterations']} it. x {row['points_per_list']}/list"
        print(f"| {name}{' + refit' if row['refit'] else ''} | {row['index_train_s']:.1f} | {row['index_add_s']:.1f} | "
              f"{row['params']['nprobe']} | {row['ndis']:,} | {row['imbalance']:.2f} | {row['batch_qps']:,} |")  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps({"build": str(a.build), "queries": len(xq), "target": a.target, "rows": rows}, indent=2)
    )
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
