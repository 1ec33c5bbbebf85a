"""The canary: its pointer operations (crash-safe CAS like every pointer update), the stable routing
of users, and a replica that serves both builds without mixing them."""

import json

import numpy as np
import pytest

from core.serving import canary
from core.serving.serving_state import ReplicaState, RetrieveQuery, retrieve
from core.storage.registry import POINTER, PublishConflict, Registry, RegistryError
from tests.unit.test_registry import _build
from tests.unit.tiny_build import make_build, make_checkpoint


def test_canary_promote_abort_rollback_and_gc_keep_a_consistent_pointer(tmp_path):
    reg = Registry(tmp_path)
    a, b, c = (_build(reg, x) for x in ("b1", "b2", "b3"))
    reg.publish(a, expected_seq=0)
    ptr = reg.canary(b, 10)
    assert (ptr.build_id, ptr.canary, ptr.percent, ptr.seq) == (a, b, 10.0, 2)
    assert json.loads((tmp_path / POINTER).read_text())["canary"] == {"build_id": b, "percent": 10.0}
    assert reg.canary(b, 50).percent == 50.0  # ramp
    with pytest.raises(RegistryError, match="canary b2 is in progress"):
        reg.canary(c, 10)
    with pytest.raises(PublishConflict, match="canary b2 serves 50% of users"):
        reg.publish(c, expected_seq=None)
    with pytest.raises(RegistryError, match="abort it before promoting b3"):
        reg.promote(c)
    assert b in reg.protected(rollback_window=0) and a in reg.protected(rollback_window=0)
    assert reg.abort().canary is None and reg.current() == a
    with pytest.raises(RegistryError, match="no canary in progress"):
        reg.abort()
    reg.canary(b, 20)
    ptr = reg.rollback()  # during a canary, one step back ends it
    assert ptr.build_id == a and ptr.canary is None and ptr.log[-1]["aborted_canary"] == b
    reg.canary(b, 20)
    ptr = reg.promote()
    assert ptr.build_id == b and ptr.canary is None and ptr.stack == (a, b)
    assert reg.rollback().build_id == a
    with pytest.raises(RegistryError, match="canary percent must be in"):
        reg.canary(b, 0)
    with pytest.raises(RegistryError, match="is the live build already"):
        reg.canary(a, 5)


def test_a_crash_between_the_pointers_temp_write_and_replace_leaves_it_consistent(tmp_path):
    reg = Registry(tmp_path)
    a, b = _build(reg, "b1"), _build(reg, "b2")
    reg.publish(a, expected_seq=0)
    before = (tmp_path / POINTER).read_bytes()

    def crash(_tmp):
        raise KeyboardInterrupt("killed between temp write and replace")

    for op in (lambda: reg.canary(b, 10, before_replace=crash), lambda: reg.promote(b, before_replace=crash)):
        with pytest.raises(KeyboardInterrupt):
            op()
        assert (tmp_path / POINTER).read_bytes() == before  # still the old, complete pointer
        assert reg.pointer().build_id == a and reg.pointer().canary is None
    reg.canary(b, 10)
    with pytest.raises(KeyboardInterrupt):
        reg.abort(before_replace=crash)
    assert reg.pointer().canary == b
    assert any(r.startswith(f".{POINTER}.tmp-") for r in reg.gc(dry_run=True))  # the leftover temp files


def test_routing_is_stable_nested_when_ramping_and_close_to_the_percentage():
    users = np.arange(1, 20_001)
    assert abs(canary.share(users, "build-x", 10) - 0.10) < 0.01
    at10 = {int(u) for u in users if canary.in_canary(int(u), "build-x", 10)}
    at50 = {int(u) for u in users if canary.in_canary(int(u), "build-x", 50)}
    assert at10 < at50  # a user in at 10 % stays in at 50 %
    assert all(canary.in_canary(u, "build-x", 10) for u in list(at10)[:100])  # the same answer every time
    other = {int(u) for u in users if canary.in_canary(int(u), "build-y", 10)}
    assert len(at10 & other) < 0.2 * len(at10)  # another canary samples other users
    assert canary.share(users, "build-x", 100) == 1.0


def test_a_replica_serves_each_user_from_one_build_and_follows_promote_and_abort(tmp_path):
    ck_a, ck_b = make_checkpoint(tmp_path / "ck", seed=0), make_checkpoint(tmp_path / "ck", seed=1)
    root = tmp_path / "reg"
    make_build(root, "a", ck_a)
    make_build(root, "b", ck_b, seed=1)
    reg = Registry(root)
    reg.publish("a", expected_seq=0)
    rs = ReplicaState(root)
    rs.tick()
    assert rs.routing.canary is None
    reg.canary("b", 30)
    rs.tick()
    r = rs.routing
    assert (r.live.build.build_id, r.canary.build.build_id, r.percent) == ("a", "b", 30.0)
    users = r.live.build.user_ids[:200]
    served = {int(u): r.route(int(u)).build.build_id for u in users}
    assert 0.15 < np.mean([v == "b" for v in served.values()]) < 0.45
    for u, build in list(served.items())[:20]:  # answered wholly by the routed build
        state = r.route(u)
        rows, _ = state.build.user_rows(np.array([u]))
        (res,), _ = retrieve(state, [RetrieveQuery(5, user_row=int(rows[0]))])
        ids, _ = state.build.retrieve(rows[:1], 5)
        assert state.build.build_id == build and res.item_ids == ids[0].tolist()
    canary_state = r.canary
    reg.promote()
    rs.tick()
    assert rs.routing.canary is None and rs.routing.live is canary_state  # not reloaded: the same state
    reg.canary("a", 10)
    rs.tick()
    assert rs.routing.canary.build.build_id == "a"
    reg.abort()
    rs.tick()
    assert rs.routing.canary is None and rs.routing.live.build.build_id == "b"
