"""The storage layer on a local directory: the same create-only and compare-and-swap contract the
object stores give (tests/integration/test_object_store.py runs it against a real S3 server)."""

import threading
from pathlib import Path

import pytest

from core.storage.store import CREATE, AlreadyExists, Uri, VersionConflict, location, open_store


def test_create_only_has_one_winner_among_racing_writers(tmp_path):
    st = open_store(tmp_path)
    won, barrier = [], threading.Barrier(8)

    def create(i: int) -> None:
        barrier.wait()
        try:
            st.put("obj", f"writer {i}".encode(), mode=CREATE)
            won.append(i)
        except AlreadyExists:
            pass

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and st.get("obj")[0] == f"writer {won[0]}".encode()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temp file left behind


def test_compare_and_swap_refuses_a_stale_version(tmp_path):
    st = open_store(tmp_path)
    st.put("ptr", b"1", mode=CREATE)
    _, v1 = st.get("ptr")
    st.put("ptr", b"2", mode=v1)
    with pytest.raises(VersionConflict):
        st.put("ptr", b"3", mode=v1)
    _, v2 = st.get("ptr")
    assert v2 != v1 and st.get("ptr")[0] == b"2"
    assert [k for k, _ in st.list("")] == ["ptr"]  # the lock and temp files are not objects


def test_locations_are_paths_or_urls_and_anything_else_is_refused():
    assert location("data/catalog") == Path("data/catalog")
    u = location("s3://bucket/data/catalog")
    assert isinstance(u, Uri) and u.name == "catalog" and u.parent == "s3://bucket/data"
    assert u.parent / "users" == "s3://bucket/data/users"
    with pytest.raises(ValueError, match="expected a local path, s3://... or gs://..."):
        location("hdfs://namenode/data")
