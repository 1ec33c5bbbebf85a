import numpy as np
import pytest

from core.serving.live_build import BuildRefused, BuildWatcher, load_build
from core.storage.build_dir import FORMAT_VERSION, BuildDir, BuildFormatError
from core.storage.registry import Registry
from tests.unit.tiny_build import make_build, make_checkpoint


def test_retrieve_matches_exact_search(tmp_path):
    b = load_build(make_build(tmp_path / "reg", "b1", make_checkpoint(tmp_path / "ck")))
    ids, scores = b.retrieve(np.array([0, 5]), 10)
    exact = np.argsort(-(b.user_emb[[0, 5]] @ b.item_emb.T), axis=1)[:, :10]
    assert (ids == b.item_ids[exact]).all() and np.all(np.diff(scores, axis=1) <= 1e-6)


def test_query_tower_of_another_version_is_refused(tmp_path):
    build = make_build(tmp_path / "reg", "b1", make_checkpoint(tmp_path / "ck", seed=0))
    other = make_checkpoint(tmp_path / "ck", seed=1)
    with pytest.raises(BuildRefused, match="differs from the index's checkpoint version"):
        load_build(build, query_checkpoint=other)


def test_query_tower_of_another_version_is_served_only_if_the_pair_passed_a_skew_check(tmp_path):
    from core.quality import skew_gate as skew

    reg = tmp_path / "reg"
    ck_a, ck_b = make_checkpoint(tmp_path / "ck", seed=0), make_checkpoint(tmp_path / "ck", seed=1)
    build = make_build(reg, "b1", ck_a)
    va, vb = ck_a.name, ck_b.name

    def allowed(family, q, i):
        return skew.pair_allowed(reg, family, q, i)

    with pytest.raises(BuildRefused, match="has not passed a skew check"):
        load_build(build, query_checkpoint=ck_b, pair_allowed=allowed)
    check = {
        "family": "tiny",
        "versions": [va, vb],
        "k": 10,
        "recall": [[0.1, 0.09], [0.095, 0.1]],
        "overlap": [[1, 0.8], [0.8, 1]],
    }
    skew.save(reg, skew.judge(check, max_relative_drop=0.2))
    assert load_build(build, query_checkpoint=ck_b, pair_allowed=allowed).checkpoint_version == va
    failed = {**check, "recall": [[0.1, 0.01], [0.01, 0.1]]}
    reg2 = tmp_path / "reg2"
    skew.save(reg2, skew.judge(failed, max_relative_drop=0.2))
    assert not skew.pair_allowed(reg2, "tiny", vb, va)


def test_watcher_swaps_on_publish_and_keeps_old_build_when_new_one_is_broken(tmp_path):
    reg_dir = tmp_path / "reg"
    ck = make_checkpoint(tmp_path / "ck")
    make_build(reg_dir, "b1", ck)
    events = []
    w = BuildWatcher(
        reg_dir, on_event=lambda outcome, old, new, detail: events.append((outcome, new and new.build_id))
    )
    reg = Registry(reg_dir)
    assert w.poll() == "empty" and w.live is None
    reg.publish("b1", expected_seq=0)
    assert w.poll() == "swapped" and w.live.build_id == "b1"
    assert w.poll() == "unchanged"

    broken = make_build(reg_dir, "b2", ck, seed=1)
    BuildDir(broken).index_path.write_bytes(b"not a faiss index")
    reg.publish("b2", expected_seq=1)
    assert w.poll() == "refused" and w.live.build_id == "b1"
    assert w.last_refused[0] == "b2" and "cannot be loaded" in w.last_refused[1]
    assert w.poll() == "unchanged"  # a refused build is not reloaded every poll

    make_build(reg_dir, "b3", ck, seed=2)
    reg.publish("b3", expected_seq=2)
    assert w.poll() == "swapped" and w.live.build_id == "b3"
    reg.rollback()
    assert w.poll() == "refused"  # rollback lands on b2, which is still broken; b3 keeps serving
    assert events == [("swapped", "b1"), ("refused", None), ("swapped", "b3"), ("refused", None)]


@pytest.mark.parametrize(
    ("field", "value"), [("format_version", 2), ("format_version", 4), ("kind", "other")]
)
def test_a_build_of_another_format_or_kind_is_refused_naming_both(tmp_path, field, value):
    import json

    build = BuildDir(make_build(tmp_path / "reg", "b1", make_checkpoint(tmp_path / "ck")))
    m = json.loads(build.manifest_path.read_text())
    m[field] = value
    build.manifest_path.write_text(json.dumps(m))
    with pytest.raises(
        BuildRefused,
        match=rf"expected kind 'skewless.build' format version {FORMAT_VERSION}, got .*{value!r}",
    ):
        load_build(build.root)
    with pytest.raises(BuildFormatError, match="format version"):
        Registry(tmp_path / "reg").manifest("b1")


def test_a_build_without_users_loads_and_answers_by_features(tmp_path):
    import pyarrow as pa

    from core.contract.encode import rows_table

    b = load_build(make_build(tmp_path / "reg", "nu", make_checkpoint(tmp_path / "ck"), n_users=0))
    assert not b.manifest.has_users and b.user_rows(np.array([5]))[1].all()  # every user id is unknown
    rows = [{"user_id": 0, "history": b.item_ids[:3].tolist()}, {"user_id": 9, "history": []}]
    features = rows_table(rows, b.model.user_inputs, {})
    assert features.schema.field("history").type == pa.list_(pa.int64())
    vecs = b.feature_vectors(features)  # the build's own user tower
    ids, _ = b.search(vecs, 5)
    assert vecs.shape == (2, b.dim) and (ids >= 0).all()
    # a batch's repeated (user, features) is embedded once
    one = [features.slice(0, 1), features.slice(1, 1), features.slice(0, 1)]
    slots, uniq = b.unique_feature_vectors([0, 9, 0], one)
    assert slots.tolist() == [0, 1, 0] and len(uniq) == 2
    np.testing.assert_allclose(uniq, vecs, atol=1e-6)
