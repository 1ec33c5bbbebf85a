"""Recommend `max_unique_users_per_batch` from what the replicas observed, and time a batch that size.

    python -m jobs.recommend_cap --metrics http://127.0.0.1:8080/metrics --app main --registry registry

Reads the Ray metrics endpoint (any node's `--metrics-export-port`; each node exports its own replicas,
so pass one --metrics per node), sums the application's unique-users-per-batch histogram over its
replicas, and recommends the smallest boundary covering --coverage of the batches (core/serving/cap.py). With
--registry it then scores, in this process, batches of that many unique users on the live build, each
user with the observed rows per user, and reports the median batch latency: what the cap costs at
worst. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request
from pathlib import Path

import numpy as np

from core.serving import cap as capmod
from jobs.common import run_main


def _fetch(url: str) -> str:
    if url.startswith(("http://", "https://")):
        with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 - a URL the operator passes
            return r.read().decode()
    return Path(url).read_text()  # a saved scrape


def time_batch(registry: Path, n_users: int, rows_per_user: int, repeats: int) -> float:
    """Median ms to score one batch of n_users unique users x rows_per_user candidates (live build)."""
    import torch

    from core.serving.broadcast import BroadcastConfig, ScoreRequest, score_batch
    from core.serving.live_build import load_build
    from core.storage.registry import Registry

    reg = Registry(registry)
    build_id = reg.current()
    if build_id is None:
        raise FileNotFoundError(f"no live build in registry {registry}: --registry times a batch on it")
    torch.set_num_threads(1)  # as a replica scores (AppArgs.torch_threads)
    build = load_build(reg.build_dir(build_id))
    rng = np.random.default_rng(0)
    users = rng.choice(build.user_ids, min(n_users, len(build.user_ids)), replace=False)
    reqs = [ScoreRequest(np.full(rows_per_user, u), rng.choice(build.item_ids, rows_per_user)) for u in users]
    cfg = BroadcastConfig(max_unique_users=max(n_users, 1))
    buf = np.empty((cfg.max_unique_users, build.dim), np.float32)
    times = []
    for _ in range(repeats + 1):  # the first warms the memory maps up
        t0 = time.perf_counter()
        score_batch(build, reqs, cfg, buf)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.recommend_cap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--metrics", action="append", required=True, help="metrics URL (or a saved scrape); repeatable"
    )
    p.add_argument("--app", required=True, help="the Serve application name")
    p.add_argument(
        "--coverage", type=float, default=0.999, help="share of observed batches the cap must cover"
    )
    p.add_argument("--registry", type=Path, help="time a batch of the recommended size on this live build")
    p.add_argument("--rows-per-user", type=int, help="candidates per user in that batch (default: observed)")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    text = "\n".join(_fetch(u) for u in a.metrics)
    match = {"application": a.app}
    rec = capmod.recommend(capmod.parse_histogram(text, match=match), a.coverage)
    rows = capmod.counter_sum(text, "ray_skewless_scored_rows_total", match)
    unique = capmod.counter_sum(text, "ray_skewless_batch_unique_users_total", match)
    out = {"application": a.app, "coverage_target": a.coverage, "max_unique_users_per_batch": rec.cap,
           "covered": round(rec.covered, 6), "batches_observed": rec.batches, "batches_over_cap": rec.over_cap,
           "rows_per_unique_user": round(rows / unique, 2) if unique else None}  # fmt: skip
    if a.registry is not None:
        per_user = a.rows_per_user or (max(1, round(rows / unique)) if unique else 1)
        out["batch_latency_ms_at_cap"] = round(time_batch(a.registry, rec.cap, per_user, a.repeats), 2)
        out["timed_rows_per_user"] = per_user
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)
