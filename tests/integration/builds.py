"""Independent checks of a published build, recomputed by the tests from the stored artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads

from core import index as ann
from core.embed import embeddings_to_numpy
from core.registry import Registry


def current_build(registry: Path) -> str:
    return json.loads((Path(registry) / "CURRENT").read_text())["build_id"]


def check_build(registry: Path, build_id: str, *, checkpoint_version: str, catalog_ids: set[int]) -> dict:
    """Asserts the build is complete, loadable and version-homogeneous; returns recall@10 it measured."""
    reg = Registry(registry)
    m = reg.manifest(build_id)
    bdir = reg.build_dir(build_id)
    assert m["checkpoint"]["version"] == checkpoint_version
    emb = pads.dataset(str(bdir / "embeddings"), format="parquet").to_table()
    assert set(emb.column("checkpoint_version").cast("string").to_pylist()) == {checkpoint_version}
    ids = emb.column("item_id").to_numpy()
    assert len(ids) == len(set(ids.tolist())) == len(catalog_ids) and set(ids.tolist()) == catalog_ids
    users = pads.dataset(str(bdir / "users"), format="parquet").to_table()
    assert set(users.column("checkpoint_version").cast("string").to_pylist()) == {checkpoint_version}
    ckm = json.loads((bdir / "checkpoint/manifest.json").read_text())
    assert ckm["version"] == checkpoint_version

    xb = embeddings_to_numpy(emb)
    index = ann.load(bdir / "index.faiss")
    assert index.ntotal == len(ids)
    # Queries: the build's own user embeddings; oracle: brute force in numpy, tie-tolerant.
    xq = np.load(bdir / "user_embeddings.npy")[:300]
    spec = ann.IndexSpec(m["index"]["type"], m["index"]["factory"], m["index"]["train_sample"])
    _, found = ann.search(index, spec, m["index"]["search_params"], xq, 10)
    scores = xq @ xb.T  # (Q, N)
    kth = np.sort(scores, axis=1)[:, -10]
    row = {int(i): r for r, i in enumerate(ids)}
    true = np.array(
        [[scores[q, row[int(i)]] if i >= 0 else -np.inf for i in found[q]] for q in range(len(xq))]
    )
    return {"recall_at_10": float((true >= kth[:, None] - 1e-5).mean()), "manifest": m}
