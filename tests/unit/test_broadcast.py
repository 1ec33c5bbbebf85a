import numpy as np
import pytest

from core.serving.broadcast import BroadcastConfig, ScoreRequest, score_batch
from core.serving.live_build import load_build
from tests.unit.tiny_build import make_build, make_checkpoint


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    root = tmp_path_factory.mktemp("b")
    return load_build(make_build(root / "registry", "b1", make_checkpoint(root / "ck")))


def _random_batch(build, rng, n_requests=24, n_users=6):
    """Requests whose users repeat within a request (rows form) and across requests."""
    users = rng.choice(build.user_ids, n_users, replace=False)
    reqs = []
    for k in range(n_requests):
        n = int(rng.integers(1, 60))
        items = rng.choice(build.item_ids, n)
        if k % 3 == 0:  # rows form with mixed users
            reqs.append(ScoreRequest(rng.choice(users, n), items))
        else:  # one user, many candidates
            reqs.append(ScoreRequest(np.full(n, rng.choice(users)), items))
    return reqs


@pytest.mark.parametrize("seed", range(5))
def test_broadcast_scores_equal_the_per_row_path(build, seed):
    reqs = _random_batch(build, np.random.default_rng(seed))
    on, s_on = score_batch(build, reqs, BroadcastConfig(enabled=True))
    off, s_off = score_batch(build, reqs, BroadcastConfig(enabled=False))
    for a, b, r in zip(on, off, reqs, strict=True):
        assert a.status == b.status == 200 and len(a.scores) == len(r.item_ids)
        assert np.max(np.abs(a.scores - b.scores)) <= 1e-5
    assert s_on.rows == s_off.rows == sum(len(r.item_ids) for r in reqs)
    assert s_on.user_lookups == s_on.unique_users <= 6  # once per unique user across the whole batch
    assert s_off.user_lookups == s_off.rows


def test_bad_request_fails_alone(build):
    good = ScoreRequest(np.full(3, build.user_ids[0]), build.item_ids[:3])
    bad_user = ScoreRequest(np.array([-7, -7]), build.item_ids[:2])
    bad_item = ScoreRequest(np.full(2, build.user_ids[1]), np.array([build.item_ids[0], -99]))
    res, _ = score_batch(build, [good, bad_user, bad_item, good], BroadcastConfig())
    assert [r.status for r in res] == [200, 404, 404, 200]
    assert "unknown user_id(s) [-7]" in res[1].error and "unknown item_id(s) [-99]" in res[2].error
    alone, _ = score_batch(build, [good], BroadcastConfig())
    np.testing.assert_allclose(res[0].scores, alone[0].scores, atol=1e-6)


def _many_users(build, n_req=10):
    return [
        ScoreRequest(np.full(5, u), build.item_ids[i : i + 5]) for i, u in enumerate(build.user_ids[:n_req])
    ]


def test_cap_split_processes_sub_batches_under_the_cap_with_equal_scores(build):
    reqs = _many_users(build)
    res, stats = score_batch(build, reqs, BroadcastConfig(max_unique_users=3, policy="split"))
    ref, _ = score_batch(build, reqs, BroadcastConfig(enabled=False))
    assert stats.cap_events == {"split": 1} and stats.unique_users == 10
    for a, b in zip(res, ref, strict=True):
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_cap_reject_answers_429_to_requests_that_do_not_fit(build):
    reqs = _many_users(build)
    res, stats = score_batch(build, reqs, BroadcastConfig(max_unique_users=4, policy="reject"))
    assert [r.status for r in res] == [200] * 4 + [429] * 6
    assert "unique-user cap 4" in res[5].error and stats.cap_events == {"reject": 6}


def test_cap_fallback_uses_the_per_row_path(build):
    reqs = _many_users(build)
    res, stats = score_batch(build, reqs, BroadcastConfig(max_unique_users=2, policy="fallback"))
    assert all(r.status == 200 for r in res) and stats.cap_events == {"fallback": 1}
    assert stats.user_lookups == stats.rows == 50


def test_buffer_is_reused_and_bounds_unique_users(build):
    buf = np.empty((8, build.dim), dtype=np.float32)
    reqs = _many_users(build, 6)
    res, _ = score_batch(build, reqs, BroadcastConfig(max_unique_users=8), user_buffer=buf)
    np.testing.assert_allclose(
        buf[:6], build.user_emb[[int(np.searchsorted(build.user_ids, u)) for u in build.user_ids[:6]]]
    )
    assert all(r.status == 200 for r in res)


def test_batch_of_distinct_users_takes_the_per_row_path(build):
    # one candidate per request, every user different: nothing to share, so no unique/inverse pass
    reqs = [ScoreRequest(np.array([u]), build.item_ids[i : i + 1]) for i, u in enumerate(build.user_ids[:7])]
    buf = np.full((8, build.dim), np.nan, dtype=np.float32)
    res, stats = score_batch(build, reqs, BroadcastConfig(max_unique_users=8), user_buffer=buf)
    ref, _ = score_batch(build, reqs, BroadcastConfig(enabled=False))
    assert np.isnan(buf).all()  # the broadcast path's buffer was not used
    assert stats.user_lookups == stats.unique_users == stats.rows == 7
    for a, b in zip(res, ref, strict=True):
        np.testing.assert_array_equal(a.scores, b.scores)


def _shared_items_batch(build, rng, n_requests=24):
    """Requests over a few popular items, users many (rows form) or one per request."""
    popular = rng.choice(build.item_ids, 5, replace=False)
    reqs = []
    for k in range(n_requests):
        n = int(rng.integers(1, 40))
        items = rng.choice(popular, n)
        users = rng.choice(build.user_ids, n) if k % 2 else np.full(n, rng.choice(build.user_ids))
        reqs.append(ScoreRequest(users, items))
    return reqs, popular


@pytest.mark.parametrize("seed", range(5))
def test_two_sided_dedup_equals_the_per_row_path(build, seed):
    reqs, popular = _shared_items_batch(build, np.random.default_rng(seed))
    on, s_on = score_batch(build, reqs, BroadcastConfig(max_unique_users=64, dedup_items=True))  # split too
    off, s_off = score_batch(build, reqs, BroadcastConfig(enabled=False))
    for a, b in zip(on, off, strict=True):
        assert a.status == b.status == 200
        assert np.max(np.abs(a.scores - b.scores)) <= 1e-5
    # each split chunk gathers its shared items once (a small last chunk may gather per row): far
    # below one gather per row
    assert len(popular) <= s_on.item_lookups < s_on.rows / 4
    assert s_off.item_lookups == s_off.rows


def test_one_popular_item_for_many_distinct_users_is_gathered_once(build):
    item = build.item_ids[3]
    reqs = [ScoreRequest(np.array([u]), np.array([item])) for u in build.user_ids[:10]]
    res, stats = score_batch(build, reqs, BroadcastConfig(dedup_items=True))
    ref, _ = score_batch(build, reqs, BroadcastConfig(enabled=False))
    assert stats.item_lookups == 1 and stats.user_lookups == 10
    for a, b in zip(res, ref, strict=True):
        assert np.max(np.abs(a.scores - b.scores)) <= 1e-5


def test_items_not_shared_are_gathered_per_row(build):
    # distinct candidates: the unique pass finds nothing to share and the rows are gathered as before
    reqs = [ScoreRequest(np.full(20, build.user_ids[0]), build.item_ids[:20])]
    res, stats = score_batch(build, reqs, BroadcastConfig(dedup_items=True))
    assert stats.item_lookups == 20
    off, _ = score_batch(build, reqs, BroadcastConfig(dedup_items=False))
    np.testing.assert_array_equal(res[0].scores, off[0].scores)


def test_unknown_policy_is_named():
    with pytest.raises(ValueError, match="cap policy must be one of"):
        BroadcastConfig(policy="drop")
