"""The comparison gate through the real rebuild job, against a live MovieLens build: a collapsed
checkpoint and an unrelated one are refused (CURRENT untouched, the numbers named), the warm-started
next version passes, --force publishes on record. With no live build, the quality floor refuses an
untrained model."""

from __future__ import annotations

import pytest
import torch

from core.quality import compare as cmp
from core.storage.registry import POINTER, Registry
from examples.movielens.export import export_model
from examples.movielens.features import FeatureSchema
from examples.movielens.model import ModelConfig, TwoTower
from tests.degraded import collapsed_checkpoint
from tests.integration.conftest import rebuild, summary


@pytest.fixture(scope="module")
def live(registry_with_a):
    return registry_with_a("reg-cutover")


def _refused(p, registry, build_a):
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert Registry(registry).current() == build_a  # CURRENT untouched
    s = summary(p)
    assert s["published"] is False and s["committed"] is True
    assert Registry(registry).manifest(s["build_id"]).comparison["passed"] is False  # committed, not live
    return s["comparison"]


def test_a_collapsed_checkpoint_is_refused_by_the_health_gate(ray_head, ml_data, checkpoints, live, tmp_path):
    registry, build_a = live
    bad = collapsed_checkpoint(checkpoints[0], tmp_path)
    p = rebuild(ray_head, bad, ml_data / "catalog", registry, "--force-unchecked", check=False)
    c = _refused(p, registry, build_a)
    h = c["new"]["health"]
    assert h["mean_pair_cosine"] > 0.95 and h["effective_rank"] < 2
    assert f"mean cosine of random item pairs {h['mean_pair_cosine']}" in p.stderr
    assert f"effective rank {h['effective_rank']}" in p.stderr


def test_an_unrelated_checkpoint_is_refused_unless_forced_and_the_next_version_passes(
    ray_head, ml_data, checkpoints, scratch_checkpoint, live
):
    registry, build_a = live
    p = rebuild(ray_head, scratch_checkpoint, ml_data / "catalog", registry, "--force-unchecked", check=False)
    c = _refused(p, registry, build_a)
    assert f"top-10 overlap with live build {build_a} {c['overlap_at_k']} < 0.3" in p.stderr
    assert c["quality"]["users"] > 500 and c["users"]["holdout"].endswith("interactions/test")

    nxt = summary(rebuild(ray_head, checkpoints[1], ml_data / "catalog", registry))
    assert nxt["published"] and nxt["comparison"]["passed"] and nxt["comparison"]["overlap_at_k"] >= 0.3
    assert Registry(registry).current() == nxt["build_id"]

    forced = summary(
        rebuild(ray_head, scratch_checkpoint, ml_data / "catalog", registry, "--force-unchecked", "--force")
    )
    m = Registry(registry).manifest(forced["build_id"])
    assert Registry(registry).current() == forced["build_id"]
    assert m.comparison["forced"] and not m.comparison["passed"] and m.comparison["refused_for"]


def test_a_first_build_from_an_untrained_model_is_refused_by_the_quality_floor(ray_head, ml_data, tmp_path):
    """No live build, so nothing to compare with but the floor's baselines: an untrained model of the
    trained ones' architecture (its item vectors pass the health limits: mean pair cosine 0.69, no
    near-duplicates, effective rank 42) would publish without the floor."""
    torch.manual_seed(0)
    untrained = export_model(TwoTower(FeatureSchema(), ModelConfig()), tmp_path / "pkg", family="ml-two-tower",
                             metadata={"untrained": True})  # fmt: skip
    registry = tmp_path / "registry"  # empty: a first build (no skew check, hence --force-unchecked)
    p = rebuild(ray_head, untrained, ml_data / "catalog", registry, "--force-unchecked", check=False)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert Registry(registry).current() is None and not (registry / POINTER).exists()  # CURRENT untouched
    s = summary(p)
    assert s["published"] is False and s["committed"] is True
    c = Registry(registry).manifest(s["build_id"]).comparison  # committed, not live
    assert c["base"] is None and c["not_compared"] == "no live build" and c["passed"] is False
    f = c["quality_floor"]
    assert f["users"] > 500 and c["users"]["holdout"].endswith("interactions/test")
    assert f["lift_over_popularity"] < 0.5 and f["popularity_recall_at_k"] > 0.02
    failed = [line for line in p.stderr.splitlines() if line.startswith("FAILED: ")]
    assert len(failed) == 1 and c["refused_for"] == cmp.judge_floor(f, cmp.Limits())
    named = (f"(no live build) quality floor: held-out Recall@10 {f['recall_at_k']} over {f['users']} users "
             f"is {f['lift_over_popularity']}x the popularity ranking's {f['popularity_recall_at_k']} (floor 0.5x)")  # fmt: skip
    assert named in failed[0]
