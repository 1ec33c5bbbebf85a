import json
import os
import threading

import pytest

from core.storage.build_dir import BuildDir
from core.storage.registry import POINTER, PublishConflict, Registry, RegistryError


def _build(reg: Registry, build_id: str) -> str:
    d = BuildDir(reg.builds / build_id)
    d.root.mkdir(parents=True)
    d.manifest_path.write_text(json.dumps({"build_id": build_id}))  # complete as far as the pointer cares
    return build_id


def test_publish_rollback_promote_keep_a_consistent_pointer(tmp_path):
    reg = Registry(tmp_path)
    assert reg.current() is None and reg.pointer().seq == 0
    a, b, c = (_build(reg, x) for x in ("b1", "b2", "b3"))
    reg.publish(a, expected_seq=0)
    reg.publish(b, expected_seq=1)
    assert reg.current() == b
    ptr = reg.rollback()
    assert ptr.build_id == a and ptr.seq == 3 and ptr.log[-1]["action"] == "rollback"
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        reg.rollback()
    reg.promote(c)
    assert reg.current() == c and reg.pointer().stack == (a, c)


def test_publish_refuses_incomplete_or_unknown_builds(tmp_path):
    reg = Registry(tmp_path)
    (reg.builds / ".tmp-half").mkdir(parents=True)
    for bad in ("nope", ".tmp-half", "../x"):
        with pytest.raises(RegistryError, match="no complete build"):
            reg.publish(bad, expected_seq=0)
    assert not (tmp_path / POINTER).exists()


def test_compare_and_swap_loser_is_told_and_winner_stays_live(tmp_path):
    reg = Registry(tmp_path)
    a, b = _build(reg, "a"), _build(reg, "b")
    seq = reg.pointer().seq  # both rebuilds started from here
    reg.publish(a, expected_seq=seq)
    with pytest.raises(PublishConflict, match=r"expected seq 0, found seq 1 \(live build a\)"):
        reg.publish(b, expected_seq=seq)
    assert reg.current() == a


def test_racing_publishers_exactly_one_wins(tmp_path):
    reg = Registry(tmp_path)
    ids = [_build(reg, f"r{i}") for i in range(8)]
    start, results = threading.Barrier(len(ids)), {}

    def race(b):
        start.wait()
        try:
            Registry(tmp_path).publish(b, expected_seq=0)
            results[b] = "won"
        except PublishConflict:
            results[b] = "lost"

    threads = [threading.Thread(target=race, args=(b,)) for b in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [b for b, r in results.items() if r == "won"]
    assert len(winners) == 1 and reg.current() == winners[0] and reg.pointer().seq == 1


def test_crash_between_pointer_temp_and_replace_leaves_old_pointer(tmp_path):
    reg = Registry(tmp_path)
    a, b = _build(reg, "a"), _build(reg, "b")
    reg.publish(a, expected_seq=0)

    class Crash(Exception):
        pass

    def crash(_tmp):
        raise Crash

    with pytest.raises(Crash):
        reg.publish(b, expected_seq=1, before_replace=crash)
    assert reg.current() == a and json.loads((tmp_path / POINTER).read_text())["build_id"] == a


def test_gc_keeps_live_and_rollback_targets_and_removes_dead_staging(tmp_path):
    reg = Registry(tmp_path)
    for i in range(6):
        reg.publish(_build(reg, f"b{i}"), expected_seq=i)
    _build(reg, "never-live")
    dead = reg.builds / ".tmp-crashed"
    dead.mkdir()
    (dead / ".owner").write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename}))
    alive = reg.builds / ".tmp-running"
    alive.mkdir()
    (alive / ".owner").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))

    removed = reg.gc(rollback_window=2, keep_extra=0)
    assert set(removed) == {"b0", "b1", "b2", "never-live", ".tmp-crashed"}
    assert reg.list_builds() == ["b3", "b4", "b5"] and alive.exists()
    reg.rollback()
    reg.rollback()
    assert reg.current() == "b3"
