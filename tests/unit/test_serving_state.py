"""The replica's state machine driven directly: follow CURRENT, swap, tail the sidecar, serve by features."""

import json

import numpy as np
import pytest
import torch

from core.contract.encode import rows_table
from core.serving.broadcast import BroadcastConfig, ScoreRequest, score_batch
from core.serving.live_build import load_build
from core.serving.serving_state import ReplicaState, RetrieveQuery, retrieve
from core.serving.sidecar import embed_items
from core.storage.registry import Registry
from core.storage.sidecar_log import SidecarLog
from tests.unit.tiny_build import make_build, make_checkpoint

# An item as the tiny package's item tower declares it (item_id comes from the log entry's key)
FRESH = {"genre_ids": [1, 4], "year_slot": 30, "title_tokens": [5, 17, 99], "tag_tokens": [3]}

# What a sidecar log could hold (an older version, a hand edit): entries no replica can apply, either
# malformed for the log itself or refused by the package's own check where the item is embedded.
POISON = [
    {"op": "upsert", "item_id": 2**64, "item": FRESH},
    {"op": "upsert", "item_id": 11, "item": {**FRESH, "year_slot": 10**11}},  # beyond the declared vocab
    {"op": "upsert", "item_id": 12, "item": {**FRESH, "title_tokens": "\ud800"}},
    {"op": "upsert", "item_id": 13, "item": {**FRESH, "genre_ids": None}},  # not a declared column's type
    {"op": "upsert", "item_id": 14, "item": {"year_slot": 3}},  # declared columns missing
    {"op": "delete", "item_id": "x"},
]


@pytest.fixture
def reg(tmp_path):
    ck_a, ck_b = make_checkpoint(tmp_path / "ck", seed=0), make_checkpoint(tmp_path / "ck", seed=1)
    root = tmp_path / "reg"
    make_build(root, "a", ck_a)
    make_build(root, "b", ck_b, seed=1)
    Registry(root).publish("a", expected_seq=0)
    return root


@pytest.fixture
def embedded(monkeypatch) -> list[int]:
    """Every item id the sidecar sends to a tower, in order."""
    import core.serving.sidecar as sc

    ids, real = [], sc.embed_items
    monkeypatch.setattr(
        sc, "embed_items", lambda b, rows: ids.extend(r["item_id"] for r in rows) or real(b, rows)
    )
    return ids


def _append_raw(registry, entries):
    """Write lines straight into the log, as an older version (or a hand edit) could have."""
    log = SidecarLog(registry)
    log.write([{"op": "upsert", "item_id": 1, "item": FRESH}], max_items=100)  # creates the log
    with open(log.path, "ab") as f:
        for e in entries:
            f.write((json.dumps(e) + "\n").encode())


def test_poisoned_entries_are_skipped_once_and_later_writes_and_swaps_go_through(reg):
    bad = []
    rs = ReplicaState(reg, on_bad_entry=lambda e, why: bad.append(why))
    _append_raw(reg, POISON)
    SidecarLog(reg).write([{"op": "upsert", "item_id": 77, "item": FRESH}], max_items=100)
    s1 = rs.tick()
    assert s1.build.build_id == "a" and s1.sidecar.ids.tolist() == [1, 77]
    assert len(bad) == len(POISON) and s1.sidecar.skipped == len(POISON)
    SidecarLog(reg).write([{"op": "upsert", "item_id": 78, "item": FRESH}], max_items=100)
    s2 = rs.tick()
    assert s2.sidecar.ids.tolist() == [1, 77, 78] and len(bad) == len(POISON)  # each reported once
    Registry(reg).publish("b", expected_seq=1)
    s3 = rs.tick()
    # ONE state moves: the new build, and its sidecar re-embedded by the new build's own tower
    assert s3.build.build_id == "b" and s3.sidecar.build_id == "b" and rs.current is s3
    np.testing.assert_allclose(
        s3.sidecar.emb[0], embed_items(s3.build, [{**FRESH, "item_id": 1}])[0], atol=1e-6
    )


def test_a_sidecar_failure_never_holds_back_a_build_swap(reg, monkeypatch):
    rs = ReplicaState(reg)
    SidecarLog(reg).write([{"op": "upsert", "item_id": 5, "item": FRESH}], max_items=10)
    assert rs.tick().sidecar.ids.tolist() == [5]
    Registry(reg).publish("b", expected_seq=1)
    real = rs.sidecar.snapshot
    monkeypatch.setattr(rs.sidecar, "snapshot", lambda *a: (_ for _ in ()).throw(OSError("log unreadable")))
    s = rs.tick()
    assert s.build.build_id == "b" and len(s.sidecar.ids) == 0 and rs.sidecar_errors == 1
    monkeypatch.setattr(rs.sidecar, "snapshot", real)
    assert rs.tick().sidecar.ids.tolist() == [5]  # replayed at the next tick


def test_each_entry_is_embedded_once_per_build(reg, embedded):
    rs = ReplicaState(reg)
    log = SidecarLog(reg)
    for i in range(5):
        log.write([{"op": "upsert", "item_id": 100 + i, "item": FRESH}], max_items=10)
        rs.tick()
    assert embedded == [100, 101, 102, 103, 104]  # not 1 + 2 + 3 + 4 + 5 re-embeddings
    Registry(reg).publish("b", expected_seq=1)
    rs.tick()
    assert sorted(embedded[5:]) == [100, 101, 102, 103, 104]  # once more for the new checkpoint


def test_build_age_is_measured_from_the_manifest(reg):
    rs = ReplicaState(reg, clock=lambda: 0.0)
    s = rs.tick()
    rs._clock = lambda: s.build.manifest.created_at_epoch() + 90.0
    assert rs.age_s() == pytest.approx(90.0)


@pytest.fixture
def no_users(tmp_path):
    root = tmp_path / "reg"
    make_build(root, "nu", make_checkpoint(tmp_path / "ck"), n_users=0)
    Registry(root).publish("nu", expected_seq=0)
    return root


def _features(build, user_id: int, history) -> object:
    """One user's features as a route hands them to core: a one-row table of the declared columns."""
    return rows_table(
        [{"user_id": user_id, "history": [int(i) for i in history]}], build.model.user_inputs, {}
    )


def test_a_build_without_users_serves_retrieval_and_scoring_by_features(no_users):
    rs = ReplicaState(no_users)
    state = rs.tick()
    b = state.build
    assert not b.manifest.has_users and len(b.user_ids) == 0
    feats = _features(b, 42, b.item_ids[[3, 7, 9]])
    u = b.feature_vectors(feats)[0]  # the build's own user tower
    (res,), embedded = retrieve(state, [RetrieveQuery(10, user_id=42, features=feats)])
    exact = np.argsort(-(np.asarray(b.item_emb) @ u))[:10]
    assert res.item_ids == b.item_ids[exact].tolist() and embedded == 1

    items = np.asarray(b.item_ids[:20])
    req = ScoreRequest(np.full(20, 42, np.int64), items, feats)
    twin = ScoreRequest(np.full(5, 42, np.int64), items[:5], _features(b, 42, b.item_ids[[3, 7, 9]]))
    (r1, r2), stats = score_batch(b, [req, twin], BroadcastConfig())
    with torch.inference_mode():
        ref = b.model.scores(
            torch.from_numpy(np.tile(u, (20, 1))), torch.from_numpy(np.asarray(b.item_emb[:20]))
        )
    np.testing.assert_allclose(r1.scores, ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(r2.scores, r1.scores[:5], atol=1e-6)
    assert stats.history_users == 1  # one user-tower pass for the batch's one unique (user, features)
    off, _ = score_batch(b, [req, twin], BroadcastConfig(enabled=False))  # the per-row path agrees
    np.testing.assert_allclose(off[0].scores, r1.scores, atol=1e-5)


def test_features_of_ids_the_build_does_not_hold_are_still_embedded(reg):
    # any history of ids in the declared vocabulary is a valid input (no "known items" filter): the
    # package decides what its tower takes
    state = ReplicaState(reg).tick()
    b = state.build
    feats = _features(b, 10**12, [int(b.item_ids[0]), 987654321, 2**61])
    (res,), embedded = retrieve(state, [RetrieveQuery(5, user_id=10**12, features=feats)])
    assert len(res.item_ids) == 5 and embedded == 1


def test_table_and_feature_queries_in_one_batch_match_the_build(reg):
    state = ReplicaState(reg).tick()
    b = state.build
    feats = _features(b, 1, b.item_ids[:4])
    res, embedded = retrieve(
        state,
        [
            RetrieveQuery(5, user_row=3),
            RetrieveQuery(7, user_id=1, features=feats),
            RetrieveQuery(5, user_row=4),
        ],
    )
    assert [len(r.item_ids) for r in res] == [5, 7, 5] and embedded == 1
    assert res[0].item_ids == b.retrieve(np.array([3]), 5)[0][0].tolist()
    alone, _ = retrieve(state, [RetrieveQuery(7, user_id=1, features=feats)])
    assert res[1].item_ids == alone[0].item_ids
    assert load_build(reg / "builds" / "a").build_id == b.build_id


def test_until_applied_says_when_the_replica_did_not_catch_up(reg):
    import asyncio

    from core.storage.sidecar_log import Position

    rs = ReplicaState(reg)
    rs.tick()
    pos = SidecarLog(reg).write([{"op": "upsert", "item_id": 5, "item": FRESH}], max_items=10)
    assert asyncio.run(rs.until_applied(pos, timeout_s=0.05)) is False  # nobody ticked: not applied
    rs.tick()
    assert asyncio.run(rs.until_applied(pos, timeout_s=0.05)) is True
    assert asyncio.run(rs.until_applied(Position(pos.generation, pos.offset + 1), 0.0)) is False


def test_an_unreadable_skew_record_never_stalls_a_swap(reg):
    rs = ReplicaState(reg)
    rs.tick()
    bad = reg / "skew" / "tiny"
    bad.mkdir(parents=True)
    (bad / "20260101T000000-bad.json").write_text('{"versions": []}')  # no "passed": an older format
    Registry(reg).publish("b", expected_seq=1)
    s = rs.tick()
    assert s.build.build_id == "b" and s.skew_check_passed is False


def test_a_compaction_does_not_re_embed_unchanged_items(reg, embedded):
    rs = ReplicaState(reg)
    log = SidecarLog(reg)
    log.write([{"op": "upsert", "item_id": 100 + i, "item": FRESH} for i in range(20)], max_items=50)
    rs.tick()
    log.compact()  # a new generation with the same entries
    log.write([{"op": "upsert", "item_id": 100, "item": {**FRESH, "title_tokens": [8]}}], max_items=50)
    s = rs.tick()
    assert sorted(embedded) == sorted([*range(100, 120), 100])  # only the changed one again
    assert s.sidecar.ids.tolist() == list(range(100, 120))


def test_an_item_that_fails_to_embed_is_retried_by_the_next_build(reg, monkeypatch):
    import core.serving.sidecar as sc

    real = sc.embed_items

    def flaky(b, rows):
        if b.build_id == "a" and any(r["item_id"] == 7 for r in rows):
            raise MemoryError("transient")
        return real(b, rows)

    monkeypatch.setattr(sc, "embed_items", flaky)
    rs = ReplicaState(reg)
    SidecarLog(reg).write([{"op": "upsert", "item_id": i, "item": FRESH} for i in (6, 7)], max_items=10)
    assert rs.tick().sidecar.ids.tolist() == [6]  # 7 skipped on build a, 6 still served
    Registry(reg).publish("b", expected_seq=1)
    assert rs.tick().sidecar.ids.tolist() == [6, 7]
