"""A small but real build directory (model package copy, faiss index, id tables), written without Ray
through the build directory's owner (core.storage.build_dir), as the rebuild writes it. The package is the
MovieLens example model at a tiny size, exported through the public contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from core.ann import index as ann
from core.contract.package import read_manifest
from core.storage.build_dir import BuildDir, BuildManifest, CheckpointRef, DatasetRef, IndexInfo, now_iso
from examples.movielens.export import export_model
from examples.movielens.features import FeatureSchema
from examples.movielens.model import ModelConfig, TwoTower

SCHEMA = FeatureSchema(item_id_buckets=512, user_id_buckets=128, title_buckets=256, tag_buckets=128)
CFG = ModelConfig(embed_dim=16, field_dim=8, hidden=(32,), ranker_hidden=16, ranker_user_hidden=(32,))


def make_checkpoint(root: Path, seed: int = 0) -> Path:
    """A tiny model package (seeded weights); the name stays: the package is the frozen checkpoint."""
    torch.manual_seed(seed)
    return export_model(TwoTower(SCHEMA, CFG), root, family="tiny", metadata={"seed": seed})


def _unit_rows(rng, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_build(
    registry: Path, build_id: str, checkpoint: Path, n_items: int = 500, n_users: int = 200, seed: int = 0
) -> Path:
    """A complete build of random unit vectors; `n_users=0` makes a build without user tables."""
    rng = np.random.default_rng(seed)
    d = CFG.embed_dim
    item_ids = np.sort(rng.choice(100_000, n_items, replace=False)).astype(np.int64)
    user_ids = np.sort(rng.choice(50_000, n_users, replace=False)).astype(np.int64)
    xb, xu = _unit_rows(rng, n_items, d), _unit_rows(rng, n_users, d)
    out = BuildDir(Path(registry) / "builds" / build_id)
    out.root.mkdir(parents=True)
    spec = ann.choose_spec(n_items, d, "flat")
    idx, _ = ann.build(spec, xb, item_ids)
    out.write_index(idx)
    out.write_items(item_ids, xb)
    if n_users:
        out.write_users(user_ids, xu)
    out.copy_checkpoint(checkpoint)
    ck = read_manifest(checkpoint)
    out.write_manifest(
        BuildManifest(
            build_id=build_id,
            created_at=now_iso(),
            checkpoint=CheckpointRef(ck.version, ck.family, ck.content_sha256, str(checkpoint), d),
            catalog=DatasetRef("tiny-catalog", n_items),
            users=DatasetRef("tiny-users", n_users) if n_users else None,
            homogeneity={"checkpoint_versions": [ck.version], "item_rows": n_items, "user_rows": n_users},
            index=IndexInfo(spec.kind, spec.factory, "inner_product", d, n_items, 0, {}),
            quality={},
            timings={},
            skew_gate=None,
            run={},
            based_on_seq=0,
        )
    )
    return out.root
