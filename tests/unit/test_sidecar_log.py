"""The sidecar's durable log: boundary checks, the cap, compaction (crash-safe), bounded growth."""

import json
import os
import subprocess
import sys

import pytest

from core.storage.sidecar_log import (
    COMPACT_FLOOR,
    COMPACT_RATIO,
    MAX_FIELD_NAME,
    MAX_ITEM_FIELDS,
    MAX_LIST,
    Position,
    SidecarFull,
    SidecarLog,
    entry_problem,
    item_problem,
    served_by_catalog,
)
from tests.conftest import REPO

# An item is whatever the model's item tower declares; the log only bounds its shape
FRESH = {"genre_ids": [1, 4], "year_slot": 30, "title_tokens": [5, 17, 99], "price": 19.99}


def _up(i, **kw):
    return {"op": "upsert", "item_id": i, "item": {**FRESH, **kw}}


def _lines(log: SidecarLog) -> list[dict]:
    return [json.loads(x) for x in log.path.read_bytes().splitlines()]


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        (_up(2**63), "item_id must be an integer in the int64 range"),
        (_up(-(2**63) - 1), "int64 range"),
        (_up(1, year_slot="x"), f"year_slot must be a number or a list of at most {MAX_LIST} numbers"),
        (_up(1, title_tokens="\ud800 lone surrogate"), "title_tokens must be a number or a list"),
        (_up(1, genre_ids=[1, [2]]), "genre_ids must be a number or a list"),  # flat lists only
        (_up(1, genre_ids=[1, True]), "genre_ids must be"),  # booleans are not numbers
        (_up(1, price=None), "price must be"),
        (_up(1, tokens=[1] * (MAX_LIST + 1)), f"at most {MAX_LIST} numbers"),
        (
            {"op": "upsert", "item_id": 1, "item": dict.fromkeys(map(str, range(MAX_ITEM_FIELDS + 1)), 1)},
            f"at most {MAX_ITEM_FIELDS} features",
        ),
        (
            _up(1, **{"x" * (MAX_FIELD_NAME + 1): 1}),
            f"feature names must be 1 to {MAX_FIELD_NAME} characters",
        ),
        ({"op": "upsert", "item_id": 1, "item": [1, 2]}, "features must be an object"),
        ({"op": "delete", "item_id": 10**30}, "delete: item_id must be an int64"),
        ({"op": "drop", "item_id": 1}, "not an upsert/delete entry"),
    ],
)
def test_entries_that_cannot_be_embedded_are_named_and_never_written(tmp_path, entry, fragment):
    assert fragment in entry_problem(entry)
    log = SidecarLog(tmp_path)
    with pytest.raises(ValueError, match="malformed"):
        log.write([_up(5), entry], max_items=10)
    assert not log.path.exists()  # nothing of the request was written, not even its good entry


def test_valid_items_pass_the_boundary_check():
    assert item_problem(2**63 - 1, {**FRESH, "genre_ids": [], "year_slot": 0}) is None
    assert item_problem(-(2**63), {f"c{i}": [0.5] * MAX_LIST for i in range(MAX_ITEM_FIELDS)}) is None


def test_cap_counts_only_entries_the_base_does_not_serve_and_compaction_frees_it(tmp_path):
    log = SidecarLog(tmp_path)
    log.write([_up(1), _up(2), _up(3)], max_items=3)
    with pytest.raises(SidecarFull, match="3 of 3 items not yet served by the base build, 1 new"):
        log.write([_up(4)], max_items=3)
    # the next base's catalog holds item 1 exactly as upserted and item 2 with other features
    catalog = {1: {"item_id": 1, **FRESH}, 2: {"item_id": 2, **FRESH, "title_tokens": [4]}}
    stats = log.compact(served_by_catalog(catalog), base_build="b2")
    assert stats["served"] == 1 and stats["kept"] == 2
    log.write([_up(4)], max_items=3)  # a slot is free again
    assert sorted(e["item_id"] for e in _lines(log)[1:]) == [2, 3, 4]
    archived = [json.loads(x) for x in (log.archive / "b2-gen1-served.jsonl").read_bytes().splitlines()]
    assert [e["item_id"] for e in archived] == [1]  # dropped from the log, never lost


def test_an_upsert_is_served_by_a_catalog_row_of_the_same_features_as_the_tower_reads_them():
    import numpy as np

    # a float32 column reads back 19.99 as 19.989999771118164: the same input to the tower
    row = {**FRESH, "price": float(np.float32(19.99)), "extra_column": "ignored"}
    served = served_by_catalog({1: row, 2: {**row, "genre_ids": [1]}, 3: {"year_slot": 30}})
    assert served([_up(1), _up(2), _up(3)]) == [True, False, False]  # 3: the catalog lacks its columns


def test_a_delete_is_folded_once_the_base_no_longer_holds_the_item(tmp_path):
    log = SidecarLog(tmp_path)
    log.write([{"op": "delete", "item_id": 7}, {"op": "delete", "item_id": 8}], max_items=3)
    log.compact(served_by_catalog({8: {"item_id": 8, **FRESH}}), base_build="b2")
    assert [e["item_id"] for e in _lines(log)[1:]] == [8]  # 7 is gone from the base: nothing to hide


def test_two_writers_share_one_cap_and_each_reads_only_the_new_tail(tmp_path):
    a, b = SidecarLog(tmp_path), SidecarLog(tmp_path)  # two replicas
    a.write([_up(1)], max_items=2)
    b.write([_up(2)], max_items=2)
    with pytest.raises(SidecarFull):
        a.write([_up(3)], max_items=2)
    b.write([{"op": "delete", "item_id": 1}], max_items=2)
    a.write([_up(3)], max_items=2)
    assert a.live_upserts() == 2


def test_log_stays_bounded_under_a_long_stream_of_updates(tmp_path):
    log = SidecarLog(tmp_path)
    for n in range(1500):
        log.write([_up(n % 10, year_slot=n)], max_items=10)
        assert len(_lines(log)) <= COMPACT_RATIO * 10 + COMPACT_FLOOR + 2
    r = log.read(Position())
    latest = {e["item_id"]: e["item"]["year_slot"] for e in r.entries}
    assert latest == {i: 1490 + i for i in range(10)}


_CRASH = """
import os, signal, sys
from core.storage.sidecar_log import SidecarLog, served_by_catalog
log = SidecarLog(sys.argv[1])
log.compact(served_by_catalog({1: {"item_id": 1, "year_slot": 1}, 3: {"year_slot": 3}}), base_build="b9",
            before_replace=lambda tmp: os.kill(os.getpid(), signal.SIGKILL))
"""


def test_a_kill_during_compaction_loses_no_entry_and_duplicates_none(tmp_path):
    log = SidecarLog(tmp_path)
    log.write(
        [{"op": "upsert", "item_id": 1, "item": {"year_slot": 1}}, _up(2), _up(2, year_slot=2)], max_items=5
    )
    log.write([{"op": "delete", "item_id": 3}], max_items=5)
    before = log.path.read_bytes()
    p = subprocess.run([sys.executable, "-c", _CRASH, str(tmp_path)], cwd=REPO, capture_output=True)
    assert p.returncode == -9, p.stderr.decode()
    assert log.path.read_bytes() == before  # the old generation is whole
    reader = SidecarLog(tmp_path)
    ids = [e["item_id"] for e in reader.read(Position()).entries]
    assert ids == [1, 2, 2, 3]
    leftovers = [f for f in os.listdir(log.dir) if ".tmp-" in f]
    assert len(leftovers) == 1  # the unreplaced temp file: harmless, never read
    catalog = {1: {"item_id": 1, "year_slot": 1}, 3: {"year_slot": 3}}  # 3 in the base: its delete stays
    stats = reader.compact(served_by_catalog(catalog), base_build="b9")
    after = [e["item_id"] for e in reader.read(Position()).entries]
    assert stats["served"] == 1 and after == [2, 3]  # each id once, its latest entry
    assert not [f for f in os.listdir(log.dir) if ".tmp-" in f]  # the next compaction clears the temp
    assert [e["item"]["year_slot"] for e in reader.read(Position()).entries if e["op"] == "upsert"] == [2]


def test_a_reader_replays_a_compacted_generation(tmp_path):
    log = SidecarLog(tmp_path)
    log.write([_up(1), _up(2)], max_items=5)
    first = log.read(Position())
    assert first.restarted and len(first.entries) == 2
    assert log.read(first.position).entries == []  # nothing new
    log.compact()
    again = log.read(first.position)
    assert again.restarted and again.position.generation == first.position.generation + 1
    assert sorted(e["item_id"] for e in again.entries) == [1, 2]
    assert again.position.covers(first.position)
