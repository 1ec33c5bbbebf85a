"""Train the MovieLens two towers on a prepared dataset, write the training checkpoint and export it as a
model package (what every job consumes).

  python -m examples.movielens.train [--data data/movielens] [--out packages] [--checkpoints checkpoints]
                                     [--seed 0] [--epochs 8] [--init-from PACKAGE_OR_CHECKPOINT]

Evaluates Recall@10 / HR@10 on the held-out test split against a popularity baseline in the same
run; both go into the checkpoint manifest and the package's metadata. Different seeds or epochs give
different versions. The last two lines are `checkpoint: <dir>` and `package: <dir>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from core.contract.package import KIND as PACKAGE_KIND
from core.storage import datasets
from examples.movielens import checkpoint
from examples.movielens.export import export
from examples.movielens.features import FeatureSchema, schema_diff
from examples.movielens.model import ModelConfig
from examples.movielens.training import TrainConfig, train
from jobs.common import run_main


@dataclasses.dataclass(frozen=True)
class JobConfig:
    data: Path
    out: Path
    checkpoints: Path
    family: str
    eval_split: str
    model: ModelConfig
    train: TrainConfig
    init_from: Path | None = None


def parse(argv: list[str] | None) -> JobConfig:
    p = argparse.ArgumentParser(
        prog="python -m examples.movielens.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data",
        type=Path,
        default=Path("data/movielens"),
        help="output of examples.movielens.prepare movielens",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("packages"),
        help="package root; the exported model package goes to OUT/<family>-<hash>",
    )
    p.add_argument(
        "--checkpoints",
        type=Path,
        default=Path("checkpoints"),
        help="training checkpoint root; the checkpoint goes to CHECKPOINTS/<family>-<hash>",
    )
    p.add_argument("--family", default="ml-two-tower", help="model family name (skew checks are per family)")
    p.add_argument("--eval-split", choices=["val", "test"], default="test")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--threads", type=int, default=TrainConfig.threads, help="torch intra-op threads")
    p.add_argument("--embed-dim", type=int, default=ModelConfig.embed_dim)
    p.add_argument(
        "--ranker-user-hidden",
        type=_sizes,
        default=ModelConfig.ranker_user_hidden,
        help="hidden sizes of the ranker's user-side MLP, comma-separated ('' = one linear layer): the "
        "user-side cost that broadcast saves per row (benchmarks/serve_gain_curve.py)",
    )
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="warm-start from this training checkpoint, or a package exported from one (its checkpoint "
        "is found by the package's metadata: its path, else its version under --checkpoints); same "
        "family and architecture",
    )
    a = p.parse_args(argv)
    if a.epochs < 1 or a.batch_size < 2:
        p.error("--epochs must be >= 1 and --batch-size >= 2")
    return JobConfig(
        a.data, a.out, a.checkpoints, a.family, a.eval_split,
        ModelConfig(embed_dim=a.embed_dim, ranker_user_hidden=a.ranker_user_hidden),
        TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed, threads=a.threads),
        a.init_from,
    )  # fmt: skip


def _sizes(s: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated sizes like 1024,1024; got {s!r}"
        ) from None
    if any(x < 1 for x in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be >= 1; got {s!r}")
    return sizes


def checkpoint_of(path: Path, checkpoints: Path) -> Path:
    """--init-from: a training checkpoint as is; a model package -> the checkpoint it was exported from."""
    mf = Path(path) / checkpoint.MANIFEST
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError):
        return Path(path)  # load_checkpoint names what is wrong
    if manifest.get("kind") != PACKAGE_KIND:
        return Path(path)
    meta = manifest.get("metadata", {})
    candidates = [Path(meta["checkpoint_path"])] if meta.get("checkpoint_path") else []
    if meta.get("checkpoint"):
        candidates.append(Path(checkpoints) / meta["checkpoint"])
    for c in candidates:
        if (c / checkpoint.MANIFEST).is_file():
            return c
    raise FileNotFoundError(
        f"--init-from {path} is a model package; its training checkpoint "
        f"{meta.get('checkpoint') or '(not recorded)'} is not at any of {[str(c) for c in candidates]} "
        "(pass --checkpoints ROOT, or --init-from the checkpoint directory)"
    )


def catalog_schema(cat_m: dict) -> FeatureSchema:
    """The feature schema the catalog was encoded with (in the dataset's source; older datasets kept it
    at the top level)."""
    d = cat_m.get("source", {}).get("feature_schema") or cat_m.get("feature_schema")
    if d is None:
        raise ValueError(
            "the catalog dataset records no feature schema: prepare it with examples.movielens.prepare"
        )
    return FeatureSchema.from_dict(d)


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    schema = FeatureSchema()
    cat_m = datasets.read_dataset_manifest(cfg.data / "catalog", "catalog")
    data_schema = catalog_schema(cat_m)
    if data_schema != schema:
        raise ValueError(
            f"catalog {cfg.data / 'catalog'} was encoded with another feature schema: {schema_diff(schema, data_schema)}"
        )
    train_m = datasets.read_dataset_manifest(cfg.data / "interactions/train", "interactions")
    catalog = datasets.read_table(cfg.data / "catalog")
    users = datasets.read_table(cfg.data / "users")
    train_split = datasets.read_table(cfg.data / "interactions/train")
    eval_split = datasets.read_table(cfg.data / f"interactions/{cfg.eval_split}")
    print(
        f"training on {train_split.num_rows:,} interactions, {catalog.num_rows:,} items, {users.num_rows:,} users"
    )
    init = None
    if cfg.init_from is not None:
        parent = checkpoint.load_checkpoint(
            checkpoint_of(cfg.init_from, cfg.checkpoints), expected_schema=schema
        )
        if parent.family != cfg.family or parent.model.cfg != cfg.model:
            raise ValueError(
                f"--init-from {cfg.init_from}: expected family {cfg.family!r} with {cfg.model}, got {parent.family!r} with {parent.model.cfg}"
            )
        init = parent.model.state_dict()
        print(f"warm-starting from {parent.version}")
    model, metrics = train(
        catalog, users, train_split, eval_split, schema, cfg.model, cfg.train, init_state=init
    )
    metrics["eval_split"] = cfg.eval_split
    training = {
        "data": str(cfg.data),
        "train_fingerprint": train_m["fingerprint"],
        "catalog_fingerprint": cat_m["fingerprint"],
        "config": dataclasses.asdict(cfg.train),
        "init_from": None if init is None else parent.version,
    }
    path = checkpoint.save_checkpoint(
        model, cfg.checkpoints, family=cfg.family, training=training, metrics=metrics
    )
    package = export(path, cfg.out)
    print(json.dumps(metrics, indent=2))
    beat = metrics["recall_at_10"] > metrics["popularity_recall_at_10"]
    print(
        f"Recall@10 {metrics['recall_at_10']:.4f} vs popularity {metrics['popularity_recall_at_10']:.4f} "
        f"({'beats' if beat else 'does NOT beat'} the baseline)"
    )
    print(f"checkpoint: {path}")
    print(f"package: {package}")
    return 0


if __name__ == "__main__":
    run_main(main)
