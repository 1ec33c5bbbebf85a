"""The registry on a real S3-compatible server (SeaweedFS on loopback, tests/s3server.py): builds
uploaded and committed by their create-only manifest, the pointer swapped by If-Match on its ETag,
verified cached copies, racing publishers, uploads killed part-way, gc. No Ray here: these are the
storage guarantees on which the rebuild and serving stand."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from core.rebuild import parts as partmod
from core.rebuild.bucket_parts import BucketParts, parts_url
from core.rebuild.parts import EmbedSettings
from core.storage.build_dir import BuildDir, BuildFormatError
from core.storage.datasets import (
    DatasetError,
    part_name,
    partition_files,
    read_dataset_manifest,
    read_table,
    split_table,
    write_dataset,
)
from core.storage.registry import PublishConflict, Registry, RegistryError
from core.storage.sidecar_log import (
    COMPACT_FLOOR,
    COMPACT_RATIO,
    Position,
    SidecarFull,
    open_log,
    served_by_catalog,
)
from core.storage.store import CREATE, AlreadyExists, VersionConflict, open_store
from tests.unit.tiny_build import make_build, make_checkpoint

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "ck")


_prefixes = iter(range(10**6))


def fresh_registry(tmp_path: Path) -> Registry:
    """A registry under its own prefix of the bucket, with its own node cache."""
    return Registry(
        f"s3://skewless/reg-{os.getpid()}-{next(_prefixes)}", cache=tmp_path / f"cache-{next(_prefixes)}"
    )


def commit(reg: Registry, tmp_path: Path, build_id: str, checkpoint: Path, **kw) -> Path:
    staged = make_build(tmp_path / f"stage-{build_id}", build_id, checkpoint, **kw)
    reg.commit(staged, build_id)
    return staged


def test_conditional_writes_are_refereed_by_the_server(s3, tmp_path):
    st = open_store("s3://skewless/cond")
    st.put("obj", b"one", mode=CREATE)
    with pytest.raises(AlreadyExists):
        st.put("obj", b"two", mode=CREATE)
    data, v1 = st.get("obj")
    assert data == b"one"
    st.put("obj", b"three", mode=v1)
    with pytest.raises(VersionConflict):
        st.put("obj", b"four", mode=v1)  # v1 is stale now
    assert st.get("obj")[0] == b"three"


def test_builds_publish_roll_back_and_gc_on_the_bucket(s3, tmp_path, checkpoint):
    reg = fresh_registry(tmp_path)
    for i in range(5):
        commit(reg, tmp_path, f"b{i}", checkpoint, seed=i)
        reg.publish(f"b{i}", expected_seq=reg.pointer().seq)
    assert reg.list_builds() == [f"b{i}" for i in range(5)]
    assert reg.current() == "b4" and reg.pointer().seq == 5
    # a second node (another cache) fetches a verified copy: the same tables bit for bit
    other = Registry(reg.store.url, cache=tmp_path / "node2")
    local = BuildDir(other.build_dir("b4"))
    ids, emb = local.open_items()
    ref_ids, ref_emb = BuildDir(reg.build_dir("b4")).open_items()
    assert np.array_equal(ids, ref_ids) and np.array_equal(emb, ref_emb)
    ids_file = local.table_path("item_ids")
    assert local.read_manifest().files[ids_file.name]["bytes"] == ids_file.stat().st_size
    assert other.build_dir("b4") == local.root  # reused, not fetched again
    ptr = reg.rollback()
    assert ptr.build_id == "b3" and other.current() == "b3"
    reg.canary("b4", 10)
    assert other.pointer().canary == "b4"
    reg.promote()
    assert other.current() == "b4"
    removed = reg.gc(rollback_window=1, keep_extra=0)
    assert set(removed) == {"b0", "b1", "b2"}  # b4 live, b3 its rollback target
    assert reg.list_builds() == ["b3", "b4"]
    assert not list(reg.store.list("builds/b0/"))
    with pytest.raises(RegistryError, match="no complete build 'b0'"):
        reg.publish("b0", expected_seq=None)


def test_a_corrupted_object_is_refused_before_use(s3, tmp_path, checkpoint):
    reg = fresh_registry(tmp_path)
    commit(reg, tmp_path, "good", checkpoint)
    name = BuildDir(reg.build_dir("good")).table_path("item_embeddings").name
    key = f"builds/good/{name}"
    data, _ = reg.store.get(key)
    reg.store.put(key, data[:-4] + b"\0\0\0\1")  # same size, other bytes
    fresh = Registry(reg.store.url, cache=tmp_path / "fresh-node")
    with pytest.raises(BuildFormatError, match=f"{name} is .* the manifest says"):
        fresh.build_dir("good")
    assert not (fresh.builds / "good").exists()  # nothing half-verified left to be used


def test_staged_parts_are_fetched_verified_reused_and_a_stopped_rebuilds_are_gc_ed(s3, tmp_path):
    """The rebuild's parts on the bucket (core.rebuild.bucket_parts): uploaded record last, fetched
    once per node and checked against the record's hashes (a changed object is refused, nothing left
    in place), and a stopped rebuild's staged parts removed by gc once stale."""
    reg = fresh_registry(tmp_path)
    bucket = BucketParts(parts_url(reg.store.url, "b-stopped"))
    local = tmp_path / "embedded"
    ids = np.arange(10, 20, dtype=np.int64)
    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    settings = EmbedSettings("v1", "sha", "fp32", 64)
    rec = {"key": "items-00000", "rows": 10, "settings": dataclasses.asdict(settings)}
    partmod._commit(local, "items-00000", ids, x, rec)
    up = bucket.upload(local / "items-00000")
    assert bucket.record("items-00000") == up and set(up["files"]) == {"ids.npy", "vectors.npy"}
    node = tmp_path / "driver-parts"
    assert bucket.fetch_all([up], node) == 1 and bucket.fetch_all([up], node) == 0  # the second reuses it
    got_ids, got_x = partmod.open_part(node / "items-00000")
    assert np.array_equal(got_ids, ids) and np.array_equal(got_x, x)
    data, _ = bucket.store.get("items-00000/vectors.npy")
    bucket.store.put("items-00000/vectors.npy", data[:-4] + b"\0\0\0\1")  # same size, other bytes
    other = tmp_path / "other-node"
    with pytest.raises(OSError, match="vectors.npy: got .* its part.json says"):
        bucket.fetch(up, other)
    assert list(other.iterdir()) == []  # nothing half-verified left in place
    assert reg.gc(stale_staging_s=3600) == []  # fresh: a running (or resumable) rebuild's parts stay
    assert reg.gc(stale_staging_s=0) == ["staging/b-stopped/ (3 objects, stopped rebuild)"]
    assert list(reg.store.list("staging/")) == []


def test_racing_publishers_exactly_one_wins_each_time(s3, tmp_path, checkpoint):
    reg = fresh_registry(tmp_path)
    racers = [f"r{i}" for i in range(4)]
    for b in ["base", *racers]:
        commit(reg, tmp_path, b, checkpoint, n_items=50, n_users=10)
    reg.publish("base", expected_seq=0)
    for race in range(20):
        seq = reg.pointer().seq
        barrier = threading.Barrier(len(racers))
        outcome: dict[str, str] = {}

        def publish(build_id: str, seq=seq, barrier=barrier, outcome=outcome) -> None:
            own = Registry(reg.store.url, cache=tmp_path / "racers")  # one client each, as separate jobs
            barrier.wait()
            try:
                own.publish(build_id, expected_seq=seq)
                outcome[build_id] = "won"
            except PublishConflict as e:
                outcome[build_id] = str(e)

        threads = [threading.Thread(target=publish, args=(b,)) for b in racers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [b for b, o in outcome.items() if o == "won"]
        assert len(winners) == 1, (race, outcome)
        ptr = reg.pointer()
        assert ptr.build_id == winners[0] and ptr.seq == seq + 1
        for b, o in outcome.items():
            if b != winners[0]:
                assert f"live build {winners[0]}" in o, (race, o)


UPLOADER = """
import sys, time
from pathlib import Path
from core.storage.registry import Registry
reg = Registry(sys.argv[1], cache=Path(sys.argv[2]))
def slow(line):
    print(line, flush=True)
    time.sleep(0.3)  # room for the test's kill between two files
reg.commit(Path(sys.argv[3]), sys.argv[4], progress=slow)
print("committed", flush=True)
reg.publish(sys.argv[4], expected_seq=1)
print("published", flush=True)
"""


@pytest.mark.parametrize("kill_after", [0, 1, 3, "committed"])
def test_an_upload_killed_part_way_is_never_a_build(s3, tmp_path, checkpoint, kill_after):
    """SIGKILL between files (or between the commit and the publish): CURRENT still names the old
    complete build, the half-uploaded one is invisible to every reader, and gc removes its objects."""
    reg = fresh_registry(tmp_path)
    commit(reg, tmp_path, "old", checkpoint)
    reg.publish("old", expected_seq=0)
    staged = make_build(tmp_path / "stage-new", "new", checkpoint, seed=7)
    n_files = len(BuildDir(staged).build_files())
    proc = subprocess.Popen([sys.executable, "-c", UPLOADER, reg.store.url, str(tmp_path / "up-cache"), str(staged), "new"],
                            cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    lines = []
    try:
        while True:
            line = proc.stdout.readline()
            assert line, f"the uploader ended before the kill point: {lines}"
            lines.append(line.strip())
            uploaded = sum(ln.startswith("uploaded ") for ln in lines)
            if line.startswith("committed") if kill_after == "committed" else uploaded == kill_after + 1:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert reg.current() == "old" and reg.pointer().seq == 1
    if kill_after == "committed":
        assert reg.list_builds() == ["new", "old"]  # committed, not live: promote would serve it whole
        assert Registry(reg.store.url, cache=tmp_path / "reader").build_dir("new")
        return
    assert 0 < len(list(reg.store.list("builds/new/"))) <= n_files
    reader = Registry(reg.store.url, cache=tmp_path / "reader")
    assert reader.list_builds() == ["old"]
    with pytest.raises(RegistryError, match="no complete build 'new'"):
        reader.build_dir("new")
    with pytest.raises(RegistryError):
        reader.publish("new", expected_seq=None)
    assert reg.gc(stale_staging_s=3600) == []  # too recent: maybe a running upload
    removed = reg.gc(stale_staging_s=0)
    assert any(r.startswith("builds/new/") for r in removed), removed
    assert not list(reg.store.list("builds/new/"))
    json.loads(reg.store.get("CURRENT")[0])  # the pointer is intact JSON
    reg.commit(staged, "new")  # the same id can be uploaded again, whole this time
    assert reg.list_builds() == ["new", "old"]


# ---- the sidecar's segment log on the bucket ------------------------------------------------------
FRESH = {"genre_ids": [1, 4], "year_slot": 30, "title_tokens": [5, 17, 99]}


def _up(i, **kw):
    return {"op": "upsert", "item_id": i, "item": {**FRESH, **kw}}


def _ids(log) -> list[int]:
    return [e["item_id"] for e in log.read(Position()).entries]


def test_sidecar_segments_concurrent_writers_share_one_cap_and_lose_nothing(s3):
    registry = f"s3://skewless/side-{next(_prefixes)}"
    logs = [open_log(registry) for _ in range(8)]  # eight replicas
    outcome = {}
    barrier = threading.Barrier(len(logs))

    def write(i: int) -> None:
        barrier.wait()
        try:
            logs[i].write([_up(100 + i)], max_items=5)
            outcome[i] = "ok"
        except SidecarFull:
            outcome[i] = "full"

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(logs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcome.values()) == ["full"] * 3 + ["ok"] * 5  # the cap held across racing writers
    ids = _ids(open_log(registry))
    assert sorted(ids) == sorted(100 + i for i, o in outcome.items() if o == "ok")  # each once


def test_sidecar_segments_stay_bounded_and_readers_follow_generations(s3):
    registry = f"s3://skewless/side-{next(_prefixes)}"
    log, reader = open_log(registry), open_log(registry)
    first = reader.read(Position())
    for n in range(150):
        log.write([_up(n % 5, year_slot=n)], max_items=5)
    head = json.loads(open_store(registry).get("sidecar/HEAD")[0])
    assert len(head["segments"]) <= COMPACT_RATIO * 5 + COMPACT_FLOOR + 1 and head["generation"] >= 1
    again = reader.read(first.position)
    assert again.restarted
    latest = {e["item_id"]: e["item"]["year_slot"] for e in again.entries}
    assert latest == {i: 145 + i for i in range(5)}
    assert reader.read(again.position).entries == []  # nothing new after it


_SIDECAR_CRASH = """
import os, signal, sys
from core.storage.sidecar_log import open_log, served_by_catalog
log = open_log(sys.argv[1])
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[2] == "write":  # the segment is put, HEAD not yet swapped
    log._swap = die
    log.write([{"op": "upsert", "item_id": 77, "item": {"year_slot": 7}}], max_items=10)
else:  # compaction: archive and new segment written, HEAD not yet swapped
    log.compact(served_by_catalog({1: {"year_slot": 1}}), base_build="b9", before_replace=die)
"""


@pytest.mark.parametrize("where", ["write", "compact"])
def test_sidecar_segments_a_kill_loses_nothing_and_doubles_nothing(s3, where):
    registry = f"s3://skewless/side-{next(_prefixes)}"
    log = open_log(registry)
    log.write(
        [{"op": "upsert", "item_id": 1, "item": {"year_slot": 1}}, _up(2), _up(2, year_slot=2)], max_items=10
    )
    log.write([{"op": "delete", "item_id": 3}], max_items=10)
    before = _ids(open_log(registry))
    p = subprocess.run([sys.executable, "-c", _SIDECAR_CRASH, registry, where], cwd=REPO, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert p.returncode == -9, p.stderr.decode()
    assert (
        _ids(open_log(registry)) == before == [1, 2, 2, 3]
    )  # the log as it was: the killed change is not in it
    fresh = open_log(registry)
    fresh.write([_up(4)], max_items=10)
    stats = fresh.compact(served_by_catalog({1: {"year_slot": 1}, 3: {"year_slot": 3}}), base_build="b9")
    assert stats["served"] == 1 and sorted(_ids(open_log(registry))) == [
        2,
        3,
        4,
    ]  # each id once, latest entry


def test_a_dataset_written_to_the_bucket_is_read_in_place_and_replaced_whole(s3):
    url = f"s3://skewless/ds-{next(_prefixes)}/catalog"
    rows = pa.table(
        {"item_id": pa.array(range(10), pa.int64()), "year_slot": pa.array(range(10), pa.int64())}
    )
    write_dataset(url, split_table(rows, 3), kind="catalog", source={"test": 1})
    assert [f.name for f in partition_files(url)] == [part_name(i) for i in range(3)]
    assert read_table(url)["item_id"].to_pylist() == list(range(10))
    with pytest.raises(DatasetError, match="already exists"):
        write_dataset(url, [rows], kind="catalog", source={"test": 2})
    write_dataset(url, [rows.slice(0, 4)], kind="catalog", source={"test": 3}, overwrite=True)
    assert read_dataset_manifest(url, "catalog")["source"] == {"test": 3}
    assert [f.name for f in partition_files(url)] == [part_name(0)]  # no partition of the old one left
