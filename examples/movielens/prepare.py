"""Prepare the MovieLens model's catalog, users and interactions as partitioned parquet.

python -m examples.movielens.prepare movielens [--movielens PATH] [--out data/movielens]
python -m examples.movielens.prepare synthetic --items 1000000 --users 1000000 --out data/synth-1m

users: `history` holds each user's last `history_len` (50) train items, most recent last (the exported
user tower refuses longer lists), `seen_item_ids` all their train items (masked in evaluation). The
feature schema the catalog was encoded with is recorded in each dataset's `source`.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time
from pathlib import Path

from core.storage.datasets import split_table, write_dataset
from core.storage.store import location
from examples.movielens import data as movielens
from examples.movielens import synthetic
from examples.movielens.features import FeatureSchema
from jobs.common import run_main


@dataclasses.dataclass(frozen=True)
class MovieLensConfig:
    out: Path
    movielens: Path | None
    download_dir: Path
    partitions: int


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    out: Path
    items: int
    users: int
    seed: int
    chunk_rows: int


def prepare_movielens(cfg: MovieLensConfig) -> dict:
    schema = FeatureSchema()
    src = movielens.locate(cfg.movielens, cfg.download_dir)
    print(f"reading MovieLens from {src}")
    t = movielens.load(src, schema)
    source = {
        "dataset": "movielens/ml-latest-small",
        "path": str(src),
        "split": "per-user chronological 80/10/10",
        "example": "examples.movielens",
        "feature_schema": schema.to_dict(),
    }
    out = cfg.out
    counts = {}
    for name, table, kind in [
        ("catalog", t.catalog, "catalog"),
        ("users", t.users, "users"),
        ("interactions/train", t.train, "interactions"),
        ("interactions/val", t.val, "interactions"),
        ("interactions/test", t.test, "interactions"),
    ]:
        m = write_dataset(
            out / name, split_table(table, cfg.partitions), kind=kind, source=source, overwrite=True
        )
        counts[name] = m["row_count"]
        print(f"  {out / name}: {m['row_count']:,} rows in {m['num_partitions']} partitions")
    return counts


def prepare_synthetic(cfg: SyntheticConfig) -> dict:
    schema = FeatureSchema()
    source = {
        "dataset": "synthetic",
        "seed": cfg.seed,
        "items": cfg.items,
        "users": cfg.users,
        "chunk_rows": cfg.chunk_rows,
        "example": "examples.movielens",
        "feature_schema": schema.to_dict(),
    }
    t0 = time.perf_counter()

    def progress(chunks, total, what):
        for i, c in enumerate(chunks):
            print(
                f"  {what}: chunk {i + 1}/{-(-total // cfg.chunk_rows)} ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
            yield c

    counts = {}
    if cfg.items:
        chunks = synthetic.catalog_chunks(cfg.items, cfg.seed, schema, cfg.chunk_rows)
        m = write_dataset(
            cfg.out / "catalog",
            progress(chunks, cfg.items, "catalog"),
            kind="catalog",
            source=source,
            overwrite=True,
        )
        counts["catalog"] = m["row_count"]
    if cfg.users:
        chunks = synthetic.user_chunks(cfg.users, max(cfg.items, 1), cfg.seed, cfg.chunk_rows)
        m = write_dataset(
            cfg.out / "users",
            progress(chunks, cfg.users, "users"),
            kind="users",
            source=source,
            overwrite=True,
        )
        counts["users"] = m["row_count"]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"synthetic data in {cfg.out}: {counts}; {time.perf_counter() - t0:.1f}s, peak RSS {peak_mib:,.0f} MiB"
    )
    return counts


def parse(argv: list[str] | None) -> MovieLensConfig | SyntheticConfig:
    p = argparse.ArgumentParser(
        prog="python -m examples.movielens.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="source")
    ml = sub.add_parser("movielens", help="MovieLens ml-latest-small (the default)")
    ml.add_argument(
        "--movielens",
        type=Path,
        default=None,
        help="unpacked ml-latest-small directory (default: ../shared/data/movielens/ml-latest-small, else download)",
    )
    ml.add_argument("--out", type=location, default=Path("data/movielens"),
                    help="a directory, or s3://BUCKET/PREFIX / gs://BUCKET/PREFIX")  # fmt: skip
    ml.add_argument("--download-dir", type=Path, default=Path("data/downloads"))
    ml.add_argument(
        "--partitions", type=int, default=8, help="parquet files per table (Ray Data maps over them)"
    )
    sy = sub.add_parser("synthetic", help="deterministic synthetic catalog/users of any size")
    sy.add_argument("--items", type=int, required=True)
    sy.add_argument("--users", type=int, default=0)
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--chunk-rows", type=int, default=500_000, help="rows per partition file (bounds memory)")
    sy.add_argument("--out", type=location, required=True, help="a directory, or s3://... / gs://...")
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["movielens", *argv]  # MovieLens is the default source
    args = p.parse_args(argv)
    if args.source == "synthetic":
        if args.items < 0 or args.users < 0 or args.chunk_rows < 1:
            p.error("--items/--users must be >= 0 and --chunk-rows >= 1")
        return SyntheticConfig(args.out, args.items, args.users, args.seed, args.chunk_rows)
    return MovieLensConfig(args.out, args.movielens, args.download_dir, args.partitions)


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    if isinstance(cfg, SyntheticConfig):
        prepare_synthetic(cfg)
    else:
        prepare_movielens(cfg)
    return 0


if __name__ == "__main__":
    run_main(main)
