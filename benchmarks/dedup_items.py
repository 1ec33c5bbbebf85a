"""Two-sided dedup in process: a scoring batch with and without gathering shared candidate items once.

On the live build of --registry, `core.serving.broadcast.score_batch` with broadcast on, dedup_items on vs off,
timed in turn (A B A B ..., median of --repeats) on three batch shapes of --requests requests each:
  popular-1   each request one user and ONE candidate from a set of --popular items (popular items
              scored for many users)
  popular-N   each request one distinct user and --candidates candidates from the same popular set
  distinct    each request one user and --candidates candidates drawn from the whole catalog (little to
              share: dedup must cost nothing here)
The user side is broadcast in both arms; only the item side differs. Scores are checked equal (1e-5).

python -m benchmarks.dedup_items --registry registry
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from core.serving.broadcast import BroadcastConfig, ScoreRequest, score_batch
from core.serving.live_build import load_build
from core.storage.registry import Registry


def shapes(build, rng, requests: int, candidates: int, popular: int) -> dict[str, list[ScoreRequest]]:
    users = rng.choice(build.user_ids, requests, replace=len(build.user_ids) < requests)
    pool = rng.choice(build.item_ids, popular, replace=False)
    return {
        "popular-1": [ScoreRequest(np.array([u]), rng.choice(pool, 1)) for u in users],
        "popular-N": [ScoreRequest(np.full(candidates, u), rng.choice(pool, candidates)) for u in users],
        "distinct": [
            ScoreRequest(np.full(candidates, u), rng.choice(build.item_ids, candidates)) for u in users
        ],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dedup_items", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--registry", type=Path, default=Path("registry"))
    p.add_argument("--requests", type=int, default=32, help="requests per batch (the app's max_batch_size)")
    p.add_argument("--candidates", type=int, default=1000)
    p.add_argument("--popular", type=int, default=50, help="size of the popular item set")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a replica's default)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/dedup_items.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    reg = Registry(a.registry)
    build = load_build(reg.build_dir(reg.current()))
    arms = {"on": BroadcastConfig(dedup_items=True), "off": BroadcastConfig(dedup_items=False)}
    out = {"benchmark": "dedup_items", "build_id": build.build_id, "config": {k: str(v) for k, v in vars(a).items()},
           "shapes": {}}  # fmt: skip
    for name, reqs in shapes(build, np.random.default_rng(0), a.requests, a.candidates, a.popular).items():
        times = {arm: [] for arm in arms}
        res = {}
        for r in range(a.repeats + 1):
            for arm, cfg in arms.items():
                t0 = time.perf_counter()
                res[arm] = score_batch(build, reqs, cfg)
                if r:  # the first round warms up
                    times[arm].append((time.perf_counter() - t0) * 1e3)
        diff = max(
            float(np.max(np.abs(x.scores - y.scores)))
            for x, y in zip(res["on"][0], res["off"][0], strict=True)
        )
        assert diff <= 1e-5, f"{name}: dedup changed scores by {diff}"
        med = {arm: statistics.median(t) for arm, t in times.items()}
        out["shapes"][name] = {
            "rows": res["on"][1].rows, "item_lookups": {arm: res[arm][1].item_lookups for arm in arms},
            "batch_ms": {arm: round(m, 3) for arm, m in med.items()}, "speedup": round(med["off"] / med["on"], 3),
            "max_abs_score_diff": diff,
        }  # fmt: skip
        s = out["shapes"][name]
        print(f"{name:<10} rows {s['rows']:>6}  item lookups {s['item_lookups']['on']:>6} vs {s['item_lookups']['off']:>6}"
              f"  batch {s['batch_ms']['on']:.2f} vs {s['batch_ms']['off']:.2f} ms = {s['speedup']:.2f}x")  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
