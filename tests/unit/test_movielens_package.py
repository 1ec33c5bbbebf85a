"""The MovieLens model exported through the public contract embeds and scores exactly as the eager
model does: the in-graph id hash matches the training's, the declared inputs take the stored columns."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from core.contract.package import read_manifest
from core.contract.towers import load_package
from examples.movielens import export, synthetic
from examples.movielens.checkpoint import load_checkpoint, save_checkpoint
from examples.movielens.features import FeatureSchema, bucket_ids
from examples.movielens.model import ModelConfig, TwoTower, item_vectors, user_vectors
from examples.movielens.train import checkpoint_of


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(3)
    root = tmp_path_factory.mktemp("ml")
    ck_dir = save_checkpoint(
        TwoTower(FeatureSchema(), ModelConfig()), root / "ck", family="ml", training={}, metrics={}
    )
    return load_checkpoint(ck_dir), load_package(export.export(ck_dir, root / "pkg"))


def test_in_graph_hash_is_the_training_hash():
    ids = np.concatenate([np.arange(5000), np.random.default_rng(0).integers(0, 1 << 62, 5000)]).astype(
        np.int64
    )
    for buckets in (1 << 16, 1 << 14):
        np.testing.assert_array_equal(
            export.bucket(torch.from_numpy(ids), buckets).numpy(), bucket_ids(ids, buckets)
        )


def test_package_embeds_and_scores_as_the_eager_model(exported):
    ck, m = exported
    assert m.family == "ml" and m.manifest.metadata["checkpoint"] == ck.version
    assert m.manifest.metadata["checkpoint_path"] == str(ck.path.resolve())
    cat = next(synthetic.catalog_chunks(700, 5, ck.schema))
    np.testing.assert_allclose(
        m.item_vectors(cat), item_vectors(ck.model.item_tower, cat, ck.schema), atol=1e-6
    )
    users = next(synthetic.user_chunks(80, 700, 5))
    eager_u = user_vectors(ck.model.user_tower, users["user_id"].to_numpy(), users["history"], ck.schema)
    np.testing.assert_allclose(m.user_vectors(users), eager_u, atol=1e-6)
    u, i = torch.from_numpy(eager_u), torch.from_numpy(m.item_vectors(cat)[:80])
    with torch.no_grad():
        np.testing.assert_allclose(m.scores(u, i).numpy(), ck.model.scorer(u, i).numpy(), atol=1e-5)


def test_a_history_longer_than_declared_is_refused(exported):
    _, m = exported
    long = pa.table({"user_id": pa.array([1], pa.int64()), "history": pa.array([list(range(1, 52))])})
    with pytest.raises(ValueError, match="'history'.*at most 50.*list of 51"):
        m.user_vectors(long)


def test_init_from_a_package_finds_its_checkpoint(exported, tmp_path):
    ck, m = exported
    assert checkpoint_of(ck.path, tmp_path) == ck.path  # a checkpoint is taken as is
    assert checkpoint_of(m.path, tmp_path) == ck.path.resolve()  # by the recorded path
    # moved away from the recorded path: by its version under --checkpoints
    moved = tmp_path / "pkg"
    moved.mkdir()
    manifest = read_manifest(m.path).to_dict()
    manifest["metadata"]["checkpoint_path"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    assert checkpoint_of(moved, ck.path.parent) == ck.path.parent / ck.version
    with pytest.raises(FileNotFoundError, match="its training checkpoint .* is not at any of"):
        checkpoint_of(moved, tmp_path)
