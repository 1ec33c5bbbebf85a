"""The cut-over comparison's numbers on vectors whose answer is known."""

import numpy as np
import pyarrow as pa

from core import compare as cmp
from core.live_build import load_build
from tests.unit.tiny_build import make_build, make_checkpoint


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_health_tells_a_collapsed_or_rank_one_embedding_from_a_healthy_one():
    rng = np.random.default_rng(0)
    healthy = cmp.health(_unit(rng.standard_normal((3000, 32))))
    assert abs(healthy["mean_pair_cosine"]) < 0.05 and healthy["near_duplicate_share"] == 0
    assert healthy["effective_rank"] > 25 and healthy["norm_mean"] == 1.0
    point = _unit(np.ones((3000, 32)) + 1e-4 * rng.standard_normal((3000, 32)))
    collapsed = cmp.health(point)
    assert collapsed["mean_pair_cosine"] > 0.99 and collapsed["near_duplicate_share"] == 1.0
    assert collapsed["effective_rank"] < 1.1
    line = _unit(np.sign(rng.standard_normal((3000, 1))) * np.ones((1, 32)))  # items +v or -v
    flat = cmp.health(line)
    assert abs(flat["mean_pair_cosine"]) < 0.1 and flat["effective_rank"] < 1.1  # rank catches it
    why = cmp.judge(
        {"new": {"health": collapsed}, "base": {"build_id": "live"}, "k": 10, "overlap_at_k": 1.0},
        cmp.Limits(),
    )
    assert any("mean cosine of random item pairs" in w and "> 0.8" in w for w in why)
    assert any("effective rank" in w for w in why)


def test_compare_a_build_with_itself_and_with_an_unrelated_one(tmp_path):
    ck_a, ck_b = make_checkpoint(tmp_path / "ck", seed=0), make_checkpoint(tmp_path / "ck", seed=1)
    a = load_build(make_build(tmp_path / "reg", "a", ck_a, seed=0), mmap=True)
    b = load_build(make_build(tmp_path / "reg", "b", ck_b, seed=1), mmap=True)
    ids = a.user_ids[:100]
    hist = [np.asarray(a.item_ids[i : i + 3]) for i in range(100)]
    rel = [set(np.asarray(a.item_ids[i + 5 : i + 8]).tolist()) for i in range(100)]
    features = pa.table(
        {
            "user_id": pa.array(ids, pa.int64()),
            "history": pa.array([h.tolist() for h in hist], pa.list_(pa.int64())),
        }
    )
    users = cmp.EvalUsers(np.asarray(ids), features, hist, rel, {"users": "test"})
    same = cmp.compare(a, a, users)
    assert same["overlap_at_k"] == 1.0 and same["quality"]["relative_drop"] == 0.0
    assert cmp.judge(same, cmp.Limits()) == []
    other = cmp.compare(a, b, users)  # random vectors, other users' ids: nothing in common
    assert other["overlap_at_k"] < 0.1
    assert any("top-10 overlap with live build a" in w for w in cmp.judge(other, cmp.Limits()))
    top = cmp.top_k(a, users, 10)
    assert not any(set(top[q].tolist()) & set(hist[q].tolist()) for q in range(100))  # seen items masked
