"""The distributed rebuild's middle without Ray: shard planning, the sharded and merged layouts on an
in-process pool of several workers, the cross-partition uniqueness gate, the memory plan, and a resume
after a crash between partition commits."""

from __future__ import annotations

import dataclasses

import faiss
import numpy as np
import pyarrow as pa
import pytest

from core.ann import index as ann
from core.ann import ivf_lists
from core.rebuild import assemble as asm
from core.rebuild import shards as sh
from core.rebuild.build import IndexOptions, build_and_publish, embed_settings, preflight
from core.rebuild.embed import Embedder, embeddings_to_numpy
from core.rebuild.parts import embed_locally
from core.rebuild.validate import ValidationError
from core.rebuild.worker import LocalPool, Worker
from core.serving.live_build import load_build
from core.storage.build_dir import BuildDir
from core.storage.datasets import split_table, write_dataset
from core.storage.registry import Registry
from tests.unit.test_rebuild import Killed, _items, _users
from tests.unit.tiny_build import make_checkpoint

N = 600
SHARDED = IndexOptions(kind="ivf", layout="sharded", shards=3, max_queries=200)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Catalog partitions whose id ranges overlap (rows shuffled before the split), and users."""
    root = tmp_path_factory.mktemp("assemble")
    ck = make_checkpoint(root / "checkpoints")
    items = _items(N)
    shuffled = items.take(np.random.default_rng(3).permutation(N))
    users = _users(120, items["item_id"].to_numpy())
    write_dataset(root / "catalog", split_table(shuffled, 4), kind="catalog", source={})
    write_dataset(root / "users", split_table(users, 2), kind="users", source={})
    return {"root": root, "ck": ck, "items": items}


def _build(data, tmp_path, name, opts, workers=2, on_phase=None, registry=None):
    reg = registry or Registry(tmp_path / "registry")
    inputs = preflight(data["ck"], data["root"] / "catalog", data["root"] / "users")
    staging = reg.staging(name) if not (reg.builds / f".tmp-{name}").exists() else reg.builds / f".tmp-{name}"
    settings = embed_settings(inputs.package, "fp32", 64)
    embed = embed_locally([Embedder(str(data["ck"]), threads=1)], BuildDir(staging).parts_dir, settings)
    m = build_and_publish(
        inputs, embed, lambda: LocalPool([Worker(threads=1, node=f"node-{i}") for i in range(workers)]), reg,
        staging, name, reg.pointer().seq, opts, settings, {}, {}, on_phase=on_phase, progress=lambda _m: None,
    )  # fmt: skip
    return reg, m


def test_ranges_cut_at_part_edges_when_parts_are_disjoint_else_at_sampled_quantiles():
    disjoint = [{"key": f"p{i}", "rows": 100, "id_min": 100 * i, "id_max": 100 * i + 99,
                 "id_sample": list(range(100 * i, 100 * i + 100, 2))} for i in range(6)]  # fmt: skip
    assert sh.plan_ranges(disjoint, 3) == [(0, 200), (200, 400), (400, 600)]
    assert sh.disjoint(disjoint)
    rng = np.random.default_rng(0)
    ids = rng.permutation(np.arange(10_000))
    overlapping = []
    for i, chunk in enumerate(np.array_split(ids, 4)):
        c = np.sort(chunk)
        sample = c[np.linspace(0, len(c) - 1, 64).astype(int)].tolist()
        overlapping.append(
            {"key": f"p{i}", "rows": len(c), "id_min": int(c[0]), "id_max": int(c[-1]), "id_sample": sample}
        )
    ranges = sh.plan_ranges(overlapping, 4)
    assert not sh.disjoint(overlapping) and len(ranges) == 4
    assert ranges[0][0] == 0 and ranges[-1][1] == 10_000
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))  # contiguous, disjoint
    sizes = np.diff([r[0] for r in ranges] + [ranges[-1][1]])
    assert sizes.min() > 1500  # about equal in rows


def test_a_sharded_build_answers_as_one_index_over_the_same_vectors(data, tmp_path):
    reg, m = _build(data, tmp_path, "b-sharded", SHARDED)
    assert m.index.layout == "sharded" and len(m.index.shards) == 3
    assert {s["node"] for s in m.index.shards} == {"node-0", "node-1"}  # shards 0, 2 on one, 1 on the other
    assert sum(s["rows"] for s in m.index.shards) == N == m.index.ntotal
    b = BuildDir(reg.build_dir("b-sharded"))
    assert not b.index_path.exists() and not b.parts_dir.exists() and not b.resume_path.exists()
    # the table: every catalog id once, sorted, each vector the checkpoint's own
    ids, x = (np.array(a) for a in b.open_items())
    assert ids.tolist() == sorted(data["items"]["item_id"].to_pylist())
    want = embeddings_to_numpy(Embedder(data["ck"]).items(data["items"]))
    order = np.argsort(data["items"]["item_id"].to_numpy())
    np.testing.assert_allclose(x, want[order], atol=1e-6)
    # the served index (shards searched as one) vs one index of the shards merged, same setting
    served = b.load_index(m)
    one = ann.load(b.shard_index_path(0))
    for s in (1, 2):
        one.merge_from(ann.load(b.shard_index_path(s)), 0)
    xq = np.array(b.open_users(m)[1])
    params = faiss.SearchParametersIVF(nprobe=m.index.search_params["nprobe"])
    D, I = served.search(xq, 10, params=params)
    D1, I1 = one.search(xq, 10, params=params)
    np.testing.assert_array_equal(I, I1)
    np.testing.assert_allclose(D, D1, rtol=1e-6)
    assert m.quality["recall_at_k"] >= 0.95 and m.quality["selection"] == "requested"


def test_a_merged_build_from_shards_equals_the_sharded_one(data, tmp_path):
    reg, sharded = _build(data, tmp_path, "b-s", SHARDED)
    _, merged = _build(data, tmp_path, "b-m", dataclasses.replace(SHARDED, layout="merged"), registry=reg)
    assert merged.index.layout == "merged" and merged.index.search_params == sharded.index.search_params
    a, b = BuildDir(reg.build_dir("b-s")), BuildDir(reg.build_dir("b-m"))
    assert b.index_path.exists() and not b.shard_index_path(0).exists()
    xq = np.array(a.open_users(sharded)[1])
    p = faiss.SearchParametersIVF(nprobe=sharded.index.search_params["nprobe"])
    np.testing.assert_array_equal(a.load_index(sharded).search(xq, 10, params=p)[1],
                                  b.load_index(merged).search(xq, 10, params=p)[1])  # fmt: skip


def test_the_refit_gives_every_shard_the_same_centroids_the_means_of_their_lists_over_all_shards(
    data, tmp_path
):
    opts = dataclasses.replace(SHARDED, kind="auto")  # above 200k items `auto` is the refit prior
    reg, m = _build(data, tmp_path, "b-refit", opts)
    assert m.index.refit and m.index.kmeans_iters == 6 and m.index.layout == "sharded"
    assert m.index.factory.endswith(",SQfp16")
    b = BuildDir(reg.build_dir("b-refit"))
    shards = [ann.load(b.shard_index_path(s["shard"])) for s in m.index.shards]
    cents = [
        faiss.extract_index_ivf(x).quantizer.reconstruct_n(0, faiss.extract_index_ivf(x).nlist)
        for x in shards
    ]
    for c in cents[1:]:
        np.testing.assert_array_equal(c, cents[0])  # one quantizer for all shards, as trained
    sums = sum(ivf_lists.list_sums(x)[0] for x in shards)
    full = np.linalg.norm(sums, axis=1) > 0
    assert full.sum() > 10  # lists hold rows from several shards: the means are over all of them
    np.testing.assert_allclose(cents[0][full], sums[full] / np.linalg.norm(sums[full], axis=1, keepdims=True),
                               atol=1e-6)  # fmt: skip
    assert m.quality["recall_at_k"] >= 0.95
    # served: the shards' hits as one merged index finds them, scored exactly from the items table
    live = load_build(reg.build_dir("b-refit"))
    one = ann.load(b.shard_index_path(0))
    for s in m.index.shards[1:]:
        one.merge_from(ann.load(b.shard_index_path(s["shard"])), 0)
    xq = np.array(b.open_users(m)[1])
    I, D = live.search(xq, 10)
    _, I1 = one.search(xq, 10, params=faiss.SearchParametersIVF(nprobe=m.index.search_params["nprobe"]))
    assert all(set(a) == set(c) for a, c in zip(I, I1, strict=True))
    ids, x = (np.array(a) for a in b.open_items())
    np.testing.assert_allclose(D, np.einsum("qd,qkd->qk", xq, x[np.searchsorted(ids, I)]), rtol=1e-5)


def test_an_id_in_two_partitions_is_refused_before_anything_is_published(data, tmp_path):
    root = tmp_path / "dup"
    items = _items(N)
    dup = items.slice(0, 5)  # the first five ids again, in another partition
    parts = split_table(items, 3) + [pa.concat_tables([dup, _items(8, seed=1).slice(0, 0)])]
    write_dataset(root / "catalog", parts, kind="catalog", source={})
    write_dataset(root / "users", split_table(_users(40, items["item_id"].to_numpy()), 1), kind="users", source={})  # fmt: skip
    d = {**data, "root": root}
    with pytest.raises(ValidationError, match=r"item_id must be unique; 5 duplicates across partitions"):
        _build(d, tmp_path, "b-dup", SHARDED)
    assert Registry(tmp_path / "registry").current() is None


def test_the_memory_plan_merges_what_fits_and_shards_what_does_not():
    gib = 2**30
    small = asm.plan_index(1_000_000, 64, "auto", "auto", 4 * gib, 0, 2)
    assert (small.layout, small.spec.factory, small.shards) == ("merged", "IVF6144,SQfp16", 2)
    big = asm.plan_index(50_000_000, 64, "auto", "auto", 7 * gib, 0, 4)
    assert big.layout == "sharded" and big.shards >= 4 and big.spec.factory == "IVF16384,Flat"
    with pytest.raises(ValidationError, match="over the --memory-budget"):
        asm.plan_index(50_000_000, 64, "auto", "merged", 7 * gib, 0, 4)
    with pytest.raises(ValidationError, match="add workers or raise the budget"):
        asm.plan_index(50_000_000, 64, "auto", "sharded", 4 * gib, 0, 2)
    assert asm.plan_index(9_742, 64, "auto", "auto", 4 * gib, 0, 1).small  # every family measured
    assert (
        asm.plan_index(50_000_000, 64, "auto", "sharded", 7 * gib, 8, 4, nlist=4096).spec.factory
        == "IVF4096,Flat"
    )


def test_a_build_killed_between_partition_commits_resumes_to_the_same_vectors(data, tmp_path):
    ref_reg, _ = _build(data, tmp_path / "ref", "b-ref", SHARDED)
    reg = Registry(tmp_path / "registry")
    seen = []

    def crash(name):
        if name == "part_committed":
            seen.append(name)
            if len(seen) == 2:
                raise Killed(name)

    with pytest.raises(Killed):
        _build(data, tmp_path, "b-res", SHARDED, on_phase=crash, registry=reg)
    parts = reg.builds / ".tmp-b-res" / "parts"
    committed = {p.name: p.stat().st_ino for p in parts.iterdir() if not p.name.startswith(".")}
    assert len(committed) == 2
    _, m = _build(data, tmp_path, "b-res", SHARDED, registry=reg)
    assert m.parts["reused"] == 2 and m.parts["embedded"] == 4  # 4 catalog + 2 users partitions
    a, b = BuildDir(ref_reg.build_dir("b-ref")), BuildDir(reg.build_dir("b-res"))
    for x, y in zip(a.open_items() + a.open_users(m), b.open_items() + b.open_users(m), strict=True):
        assert x.tobytes() == y.tobytes()
