"""Exported towers (a model package, inputs validated against its manifest) vs the eager towers, on the
same rows, interleaved, median of repeats: at the rebuild's batch size and at serving's small batches.

  python -m benchmarks.export_speed [--repeats 15] [--threads 2] [--out benchmarks/results/export_speed.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from core.contract.encode import rows_table
from core.contract.towers import load_package
from examples.movielens import export, synthetic
from examples.movielens.checkpoint import load_checkpoint, save_checkpoint
from examples.movielens.features import FeatureSchema
from examples.movielens.model import ModelConfig, TwoTower, item_vectors, user_vectors


def _time_ms(fn, times: list[float]) -> None:
    t0 = time.perf_counter()
    fn()
    times.append(1e3 * (time.perf_counter() - t0))


def measure(repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        ck_dir = save_checkpoint(
            TwoTower(FeatureSchema(), ModelConfig()), Path(tmp), family="ml", training={}, metrics={}
        )
        ck, m = load_checkpoint(ck_dir), load_package(export.export(ck_dir, Path(tmp) / "pkg"))
    s = ck.schema
    cat = next(synthetic.catalog_chunks(8192, 1, s))
    users = next(synthetic.user_chunks(8192, 8192, 1))
    rows8 = users.slice(0, 8).select(["user_id", "history"]).to_pylist()
    cases = {
        "items x8192 (rebuild batch)": (lambda: item_vectors(ck.model.item_tower, cat, s), lambda: m.item_vectors(cat)),
        "items x32 (sidecar)": (lambda: item_vectors(ck.model.item_tower, cat.slice(0, 32), s),
                                lambda: m.item_vectors(cat.slice(0, 32))),
        "users x8192 (rebuild batch)": (
            lambda: user_vectors(ck.model.user_tower, users["user_id"].to_numpy(), users["history"], s),
            lambda: m.user_vectors(users)),
        "users x8 (history users per serving batch)": (
            lambda: user_vectors(ck.model.user_tower, users["user_id"].to_numpy()[:8], users["history"][:8], s),
            lambda: m.user_vectors(users.slice(0, 8))),
        # what a serving batch does with 8 users sent in JSON: before, ids + histories as numpy arrays into
        # the eager tower; now, the features rows into an Arrow table (rows_table), validated, the program
        "users x8 from JSON rows (serving path)": (
            lambda: user_vectors(ck.model.user_tower, np.array([r["user_id"] for r in rows8], np.int64),
                                 [np.asarray(r["history"], np.int64) for r in rows8], s),
            lambda: m.user_vectors(rows_table(rows8, m.user_inputs, {}))),
    }  # fmt: skip
    out = {}
    for name, (eager, exported) in cases.items():
        te, tx = [], []
        for _ in range(3):  # warm-up
            eager(), exported()
        for _ in range(repeats):  # interleaved, so drift hits both alike
            _time_ms(eager, te)
            _time_ms(exported, tx)
        e, x = float(np.median(te)), float(np.median(tx))
        # the ratio within each interleaved pair, then its median: this VM's drift moves both alike
        r = np.array(tx) / np.array(te)
        lo, hi = np.percentile(r, [25, 75])
        out[name] = {
            "eager_ms": round(e, 3),
            "exported_ms": round(x, 3),
            "exported_over_eager": round(float(np.median(r)), 3),
            "ratio_iqr": [round(float(lo), 3), round(float(hi), 3)],
        }
        print(
            f"{name:45s} eager {e:8.3f} ms  exported {x:8.3f} ms  ratio {np.median(r):.3f} "
            f"(pairs' IQR {lo:.3f}-{hi:.3f})"
        )
    return {"repeats": repeats, "threads": threads, "torch": torch.__version__, "cases": out}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.export_speed", description=__doc__)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/export_speed.json"))
    a = p.parse_args(argv)
    res = measure(a.repeats, a.threads)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
