"""Independent checks of a published build, recomputed by the tests from the stored artifacts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.ann import index as ann
from core.contract.package import read_manifest
from core.storage.build_dir import BuildDir
from core.storage.registry import Registry


def current_build(registry: Path) -> str:
    return Registry(registry).current()


def check_build(registry: Path, build_id: str, *, checkpoint_version: str, catalog_ids: set[int]) -> dict:
    """Asserts the build is complete, loadable and version-homogeneous; returns recall@10 it measured."""
    reg = Registry(registry)
    m = reg.manifest(build_id)
    bdir = BuildDir(reg.build_dir(build_id))
    assert m.checkpoint_version == checkpoint_version
    assert m.homogeneity["checkpoint_versions"] == [checkpoint_version]
    assert {s["checkpoint_version"] for s in m.index.shards} == {checkpoint_version}
    ids, xb = (np.array(a) for a in bdir.open_items())
    assert len(ids) == len(set(ids.tolist())) == len(catalog_ids) and set(ids.tolist()) == catalog_ids
    assert (np.diff(ids) > 0).all() and np.isfinite(xb).all()
    assert read_manifest(bdir.checkpoint_path).version == checkpoint_version

    index = bdir.load_index(m)
    assert index.ntotal == len(ids)
    # Queries: the build's own user embeddings (else random unit vectors); oracle: brute force, tie-tolerant.
    if m.has_users:
        xq = np.array(bdir.open_users(m)[1][:300])
    else:
        xq = np.random.default_rng(0).standard_normal((300, xb.shape[1])).astype(np.float32)
        xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    spec = ann.IndexSpec(m.index.type, m.index.factory, m.index.train_sample)
    _, found = ann.search(index, spec, m.index.search_params, xq, 10)
    scores = xq @ xb.T  # (Q, N)
    kth = np.sort(scores, axis=1)[:, -10]
    row = {int(i): r for r, i in enumerate(ids)}
    true = np.array(
        [[scores[q, row[int(i)]] if i >= 0 else -np.inf for i in found[q]] for q in range(len(xq))]
    )
    return {"recall_at_10": float((true >= kth[:, None] - 1e-5).mean()), "manifest": m}
