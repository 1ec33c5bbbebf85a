import numpy as np
import pyarrow as pa
import pytest

from core.serving.live_build import load_build
from core.serving.serving_state import RetrieveQuery, ServingState, retrieve
from core.serving.sidecar import Sidecar, embed_items
from core.storage.build_dir import BuildDir
from core.storage.sidecar_log import SidecarFull, SidecarLog
from tests.unit.tiny_build import make_build, make_checkpoint

# An item as the tiny package's item tower declares it (item_id comes from the log entry's key)
FRESH = {"genre_ids": [1, 4], "year_slot": 30, "title_tokens": [5, 17, 99], "tag_tokens": [3]}


@pytest.fixture
def env(tmp_path):
    reg = tmp_path / "reg"
    ck_a, ck_b = make_checkpoint(tmp_path / "ck", seed=0), make_checkpoint(tmp_path / "ck", seed=1)
    a = load_build(make_build(reg, "a", ck_a))
    b = load_build(make_build(reg, "b", ck_b, seed=1))
    return reg, a, b


def _upsert(i, **kw):
    return {"op": "upsert", "item_id": i, "item": {**FRESH, **kw}}


def merge_topk(build, snap, user_row, k):
    """Retrieval for one table user over base + sidecar, as a replica serves it."""
    res, _ = retrieve(ServingState(build, snap), [RetrieveQuery(k, user_row=user_row)])
    return res[0].item_ids, res[0].scores, res[0].sources


def test_upsert_is_embedded_by_the_live_builds_own_tower_and_merged(env):
    reg, a, _ = env
    log = SidecarLog(reg)
    log.write([_upsert(10**9)], max_items=10)
    snap = Sidecar(log).snapshot(a, None)
    assert snap.ids.tolist() == [10**9] and snap.checkpoint_version == a.checkpoint_version
    np.testing.assert_allclose(snap.emb[0], embed_items(a, [{**FRESH, "item_id": 10**9}])[0], atol=1e-6)
    # the fresh item appears exactly where its score ranks it among base results
    u = np.asarray(a.user_emb[0])
    ids, scores, sources = merge_topk(a, snap, 0, k=a.index.ntotal + 1)
    assert ids.count(10**9) == 1 and sources[ids.index(10**9)] == "sidecar"
    assert scores == sorted(scores, reverse=True) and scores[ids.index(10**9)] == pytest.approx(
        float(snap.emb[0] @ u), abs=1e-5
    )


def test_delete_hides_a_base_item_and_upsert_shadows_one(env):
    reg, a, _ = env
    top, _, _ = merge_topk(a, Sidecar(SidecarLog(reg)).snapshot(a, None), 0, k=5)
    log = SidecarLog(reg)
    log.write([{"op": "delete", "item_id": top[0]}, _upsert(top[1])], max_items=10)
    snap = Sidecar(log).snapshot(a, None)
    ids, _, sources = merge_topk(a, snap, 0, k=50)
    assert top[0] not in ids
    assert [s for i, s in zip(ids, sources, strict=True) if i == top[1]] in (
        [],
        ["sidecar"],
    )  # never the stale base entry


def test_restart_replays_the_durable_log_and_a_new_build_reembeds_everything(env):
    reg, a, b = env
    log = SidecarLog(reg)
    log.write([_upsert(1), _upsert(2, title_tokens=[7])], max_items=10)
    first = Sidecar(log).snapshot(a, None)
    restarted = Sidecar(SidecarLog(reg)).snapshot(a, None)  # a replica restart: nothing lost
    assert restarted.ids.tolist() == first.ids.tolist() == [1, 2]
    np.testing.assert_array_equal(restarted.emb, first.emb)
    side = Sidecar(log)
    s_a = side.snapshot(a, None)
    s_b = side.snapshot(b, s_a)  # the swap: same sidecar, re-embedded by the new checkpoint
    assert s_b.checkpoint_version == b.checkpoint_version != s_a.checkpoint_version
    np.testing.assert_allclose(
        s_b.emb,
        embed_items(b, [{**FRESH, "item_id": 1}, {**FRESH, "title_tokens": [7], "item_id": 2}]),
        atol=1e-6,
    )


def test_size_bound_answers_a_clear_error(env):
    reg, _, _ = env
    log = SidecarLog(reg)
    log.write([_upsert(1), _upsert(2)], max_items=2)
    log.write([_upsert(2, title_tokens=[8])], max_items=2)  # an update of a known id does not grow it
    with pytest.raises(
        SidecarFull, match="sidecar is full: 2 of 2 items not yet served by the base build, 1 new"
    ):
        log.write([_upsert(3)], max_items=2)
    log.write([{"op": "delete", "item_id": 1}], max_items=2)
    log.write([_upsert(3)], max_items=2)


def test_a_torn_write_is_skipped_and_later_writes_survive(env):
    reg, a, _ = env
    log = SidecarLog(reg)
    log.write([_upsert(1)], max_items=10)
    with open(log.path, "ab") as f:
        f.write(b'{"op": "upsert", "item_id": 99, "ite')  # crash mid-line
    log.write([_upsert(2)], max_items=10)
    assert Sidecar(log).snapshot(a, None).ids.tolist() == [1, 2]


def test_upsert_identical_to_the_base_entry_is_folded(env, tmp_path):
    reg, a, _ = env
    target = int(a.item_ids[3])
    vec = embed_items(a, [{**FRESH, "item_id": target}])[0]
    table = np.load(BuildDir(reg / "builds/a").table_path("item_embeddings"), mmap_mode="r+")
    table[3] = vec  # as if the rebuild had embedded this very item
    table.flush()
    a2 = load_build(reg / "builds/a")
    log = SidecarLog(reg)
    log.write([_upsert(target), _upsert(10**9)], max_items=10)
    snap = Sidecar(log).snapshot(a2, None)
    assert snap.ids.tolist() == [10**9] and snap.folded == 1 and target not in snap.hidden


def _catalog(path, build, rows: list[dict]) -> list:
    """A catalog dataset of these rows (item_id and the declared columns), as a prepared one stores them."""
    from core.contract.encode import rows_table
    from core.storage.datasets import partition_files, write_dataset

    specs = tuple(s for s in build.model.item_inputs if s.name != "item_id")
    write_dataset(path, [rows_table(rows, specs, {"item_id": pa.int64()})], kind="catalog", source={})
    return partition_files(path)


def test_fold_into_base_drops_what_the_live_catalog_serves_and_frees_the_cap(env, tmp_path):
    from core.serving.sidecar import fold_into_base
    from core.storage.registry import Registry

    reg, a, _ = env
    log = SidecarLog(reg)
    log.write([_upsert(1), _upsert(2), {"op": "delete", "item_id": 3}], max_items=2)
    with pytest.raises(SidecarFull):
        log.write([_upsert(4)], max_items=2)
    # the next catalog holds item 1 exactly as upserted, item 2 with other features, no item 3
    rows = [{**FRESH, "item_id": 1}, {**FRESH, "item_id": 2, "title_tokens": [1]}, {**FRESH, "item_id": 9}]
    files = _catalog(tmp_path / "cat", a, rows)
    Registry(reg).publish("b", expected_seq=0)
    assert fold_into_base(reg, "a", files)["folded"] == 0  # "a" is not live: nothing is dropped
    stats = fold_into_base(reg, "b", files)
    assert stats == {"folded": 2, "kept": 1, "generation": 2}
    log.write([_upsert(4)], max_items=2)  # a slot is free again


def test_a_rollback_restores_what_the_build_it_left_had_folded(env, tmp_path, capsys):
    from core.serving.sidecar import fold_into_base
    from core.storage.registry import Registry
    from jobs import registry as cli

    reg, a, _ = env
    log = SidecarLog(reg)
    log.write([_upsert(10**9), {"op": "delete", "item_id": int(a.item_ids[0])}], max_items=5)
    before = Sidecar(SidecarLog(reg)).snapshot(a, None)
    assert before.ids.tolist() == [10**9] and int(a.item_ids[0]) in before.deleted
    rows = [{**FRESH, "item_id": 10**9}]  # build b's catalog: holds the fresh item, not the deleted one
    files = _catalog(tmp_path / "cat", a, rows)
    Registry(reg).publish("a", expected_seq=0)
    Registry(reg).publish("b", expected_seq=1)
    assert fold_into_base(reg, "b", files)["folded"] == 2
    assert Sidecar(SidecarLog(reg)).snapshot(a, None).ids.tolist() == []  # on a, they would be lost
    assert cli.main(["--registry", str(reg), "rollback"]) == 0
    assert "sidecar entries restored: 2" in capsys.readouterr().out
    after = Sidecar(SidecarLog(reg)).snapshot(a, None)
    assert after.ids.tolist() == [10**9] and int(a.item_ids[0]) in after.deleted
    assert SidecarLog(reg).restore_folded("b") == 0  # idempotent
