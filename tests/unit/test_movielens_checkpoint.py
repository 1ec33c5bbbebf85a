"""The MovieLens example's training checkpoints (examples/movielens/checkpoint.py)."""

import dataclasses
import json

import pytest
import torch

from examples.movielens.checkpoint import MANIFEST, CheckpointError, load_checkpoint, save_checkpoint
from examples.movielens.features import FeatureSchema
from examples.movielens.model import ModelConfig, TwoTower

SMALL = FeatureSchema(item_id_buckets=256, user_id_buckets=64, title_buckets=128, tag_buckets=64)
CFG = ModelConfig(embed_dim=8, field_dim=4, hidden=(16,), ranker_hidden=8, ranker_user_hidden=(16,))


def _save(root, seed=0):
    torch.manual_seed(seed)
    return save_checkpoint(
        TwoTower(SMALL, CFG), root, family="tiny", training={"seed": seed}, metrics={"recall_at_10": 0.1}
    )


def test_roundtrip_keeps_version_weights_and_manifest(tmp_path):
    path = _save(tmp_path)
    ck = load_checkpoint(path, expected_schema=SMALL)
    m = json.loads((path / MANIFEST).read_text())
    assert ck.version == m["version"] == path.name
    assert m["weights_sha256"].startswith(m["version"].split("-")[-1])
    assert m["embed_dim"] == 8 and m["feature_schema"]["item_id_buckets"] == 256
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir()), "staging dir left behind"


def test_different_weights_give_different_versions(tmp_path):
    assert _save(tmp_path, seed=0).name != _save(tmp_path, seed=1).name


def test_one_flipped_byte_is_refused_naming_expected_and_actual(tmp_path):
    path = _save(tmp_path)
    weights = path / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    expected = json.loads((path / MANIFEST).read_text())["weights_sha256"]
    with pytest.raises(CheckpointError, match=f"expected {expected}, got [0-9a-f]{{64}}"):
        load_checkpoint(path)


def test_schema_mismatch_is_refused_naming_field_expected_and_actual(tmp_path):
    path = _save(tmp_path)
    other = dataclasses.replace(SMALL, title_buckets=4096)
    # expected = the schema the caller (the data) needs; actual = the checkpoint's
    with pytest.raises(
        CheckpointError,
        match=r"\(expected\) vs checkpoint .* \(actual\): title_buckets: expected 4096, got 128",
    ):
        load_checkpoint(path, expected_schema=other)


def test_missing_checkpoint_and_missing_manifest_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_checkpoint(tmp_path / "empty")


def test_checkpoint_from_before_the_user_context_network_still_loads(tmp_path):
    # its config has no ranker_user_hidden and its scorer a single linear user layer
    old_cfg = dataclasses.replace(CFG, ranker_user_hidden=())
    torch.manual_seed(0)
    path = save_checkpoint(TwoTower(SMALL, old_cfg), tmp_path, family="tiny", training={}, metrics={})
    manifest = json.loads((path / MANIFEST).read_text())
    del manifest["model_config"]["ranker_user_hidden"]
    (path / MANIFEST).write_text(json.dumps(manifest))
    ck = load_checkpoint(path, expected_schema=SMALL)
    assert isinstance(ck.model.scorer.w_user, torch.nn.Linear)
    u, i = torch.randn(3, 8), torch.randn(3, 8)
    with torch.inference_mode():  # the per-row and broadcast paths agree on the old layout too
        pre = ck.model.scorer.user_side(u)
        assert torch.allclose(ck.model.scorer(u, i), ck.model.scorer.pair_side(u, pre, i))
