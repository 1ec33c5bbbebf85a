"""The cut-over comparison's numbers on vectors whose answer is known."""

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from core.quality import compare as cmp
from core.serving.live_build import load_build
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


# ---- the quality floor -------------------------------------------------------------------------------


def test_the_popularity_and_random_baselines_mask_each_users_history_as_retrieval_does():
    item_ids = np.arange(10, 20)  # the catalog: 10 items
    popularity = (np.array([11, 12, 13, 99]), np.array([5, 9, 5, 100]))  # 99 is not in the catalog
    users = cmp.EvalUsers(
        np.arange(5),
        None,
        [np.array([12]), np.array([10, 11]), np.array([10]), np.array([19]), np.array([14])],
        [{13, 14}, {12}, {15, 500}, {13}, {14}],  # user 4 saw its held-out item: not counted
        {"users": "test"},
    )
    top = cmp.popularity_top_k(item_ids, popularity, users, 3)
    # by count (12: 9, then 11 and 13 tied at 5, by id), then the unseen rest by id
    assert top[:4].tolist() == [[11, 13, 10], [12, 13, 14], [12, 11, 13], [12, 11, 13]]
    assert cmp.recall(top, users) == ((1 / 2 + 1 + 0 + 1) / 4, 4)
    # each relevant catalog item is among k = 3 of the C unseen with p = 3 / C; 500 is not in the catalog
    assert cmp.random_recall(item_ids, users, 3) == pytest.approx((3 / 9 + 3 / 8 + 3 / 9 * 1 / 2 + 3 / 9) / 4)


def _floor(recall, popularity, random, users=610):
    return {"checked": True, "k": 10, "users": users, "recall_at_k": recall,
            "popularity_recall_at_k": popularity, "random_recall_at_k": random,
            "lift_over_popularity": round(recall / popularity, 3) if popularity else None,
            "lift_over_random": round(recall / random, 2)}  # fmt: skip


def test_the_floor_refuses_a_build_under_either_multiple_in_one_line_naming_the_numbers():
    lim = cmp.Limits()  # 0.5x popularity, 10x random
    assert cmp.judge_floor(_floor(0.0546, 0.0346, 0.001041), lim) == []  # MovieLens, trained: 1.58x, 52x
    untrained = cmp.judge_floor(_floor(0.0029, 0.0346, 0.001041), lim)  # MovieLens, untrained
    assert untrained == [
        "quality floor: held-out Recall@10 0.0029 over 610 users is 0.084x the popularity ranking's 0.0346 "
        "(floor 0.5x) and 2.79x a random ranking's 0.001041 (floor 10.0x)"
    ]
    # popularity finds nothing (flat data): the random multiple alone decides
    assert cmp.judge_floor(_floor(0.02, 0.0, 0.01), lim) == [
        "quality floor: held-out Recall@10 0.02 over 610 users is 2.0x a random ranking's 0.01 (floor 10.0x)"
    ]
    assert cmp.judge_floor(_floor(0.2, 0.0, 0.01), lim) == []
    loose = cmp.Limits(min_lift_over_popularity=0.05, min_lift_over_random=2.0)
    assert cmp.judge_floor(_floor(0.0029, 0.0346, 0.001041), loose) == []
    assert cmp.judge_floor({"checked": False, "why": "no held-out data"}, lim) == []
    assert cmp.floor_line({"checked": False, "why": "no held-out data"}) == (
        "quality floor: not checked, no held-out data"
    )


def test_a_build_of_random_vectors_is_under_the_floor_where_popularity_finds_the_held_out_items(tmp_path):
    ck = make_checkpoint(tmp_path / "ck")
    b = load_build(make_build(tmp_path / "reg", "b", ck, n_items=500, n_users=200), mmap=True)
    rng = np.random.default_rng(1)
    hist = [rng.choice(b.item_ids, size=1 + q % 8, replace=False) for q in range(200)]
    ids, counts = np.unique(np.concatenate(hist), return_counts=True)
    users = cmp.EvalUsers(np.asarray(b.user_ids), None, hist, None, {"users": "test"})
    assert cmp.quality_floor(b, users, (ids, counts)) == {"checked": False, "why": "no held-out data"}
    # each user's held-out items: the 10 most popular they have not seen, so popularity finds them all
    top_pop = cmp.popularity_top_k(b.item_ids, (ids, counts), users, 10)
    users = dataclasses.replace(users, relevant=[set(row.tolist()) for row in top_pop])
    f = cmp.quality_floor(b, users, (ids, counts))
    assert f["users"] == 200 and f["popularity_recall_at_k"] == 1.0 and f["recall_at_k"] < 0.2
    assert f["random_recall_at_k"] == pytest.approx(10 / 496, rel=0.01)  # k / unseen items
    assert f["overlap_with_popularity"] == f["recall_at_k"]
    why = cmp.judge_floor(f, cmp.Limits())
    assert (
        len(why) == 1
        and f"is {f['lift_over_popularity']}x the popularity ranking's 1.0 (floor 0.5x)" in why[0]
    )
