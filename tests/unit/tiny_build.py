"""A small but real build directory (checkpoint copy, faiss index, id tables), written without Ray."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from core import index as ann
from core.checkpoint import save_checkpoint
from core.features import FeatureSchema
from core.model import ModelConfig, TwoTower

SCHEMA = FeatureSchema(item_id_buckets=512, user_id_buckets=128, title_buckets=256, tag_buckets=128)
CFG = ModelConfig(embed_dim=16, field_dim=8, hidden=(32,), ranker_hidden=16, ranker_user_hidden=(32,))


def make_checkpoint(root: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return save_checkpoint(TwoTower(SCHEMA, CFG), root, family="tiny", training={"seed": seed}, metrics={})


def make_build(
    registry: Path, build_id: str, checkpoint: Path, n_items: int = 500, n_users: int = 200, seed: int = 0
) -> Path:
    rng = np.random.default_rng(seed)
    d = CFG.embed_dim
    item_ids = np.sort(rng.choice(100_000, n_items, replace=False)).astype(np.int64)
    user_ids = np.sort(rng.choice(50_000, n_users, replace=False)).astype(np.int64)
    xb = rng.standard_normal((n_items, d)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xu = rng.standard_normal((n_users, d)).astype(np.float32)
    xu /= np.linalg.norm(xu, axis=1, keepdims=True)
    out = Path(registry) / "builds" / build_id
    out.mkdir(parents=True)
    spec = ann.choose_spec(n_items, d, "flat")
    idx, _ = ann.build(spec, xb, item_ids)
    ann.save(idx, out / "index.faiss")
    for name, arr in (
        ("item_ids", item_ids),
        ("item_embeddings", xb),
        ("user_ids", user_ids),
        ("user_embeddings", xu),
    ):
        np.save(out / f"{name}.npy", arr)
    shutil.copytree(checkpoint, out / "checkpoint")
    version = json.loads((checkpoint / "manifest.json").read_text())["version"]
    manifest = {
        "build_id": build_id,
        "checkpoint": {"version": version},
        "catalog": {"row_count": n_items},
        "index": {
            "type": spec.kind,
            "factory": spec.factory,
            "train_sample": 0,
            "dim": d,
            "search_params": {},
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out
