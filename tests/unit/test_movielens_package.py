"""The MovieLens model exported through the public contract embeds and scores exactly as the eager
model does: the in-graph id hash matches the training's, the declared inputs take the stored columns."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from core import synthetic
from core.checkpoint import load_checkpoint, save_checkpoint
from core.contract.towers import load_package
from core.embed import item_vectors, user_vectors
from core.features import FeatureSchema, bucket_ids
from core.model import ModelConfig, TwoTower
from examples.movielens import export


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
