"""The Ray-free half of the rebuild, in-process: preflight, the gates, the embedder, and
build_and_publish on an in-process worker pool (core.rebuild.worker.LocalPool, the same calls the job's Ray
actors get) with a crash injected at every phase (what `ray job stop`'s SIGKILL can interrupt)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pytest
import torch

from core.ann import index as ann
from core.contract.package import read_manifest, write_package
from core.contract.spec import ContractError
from core.contract.towers import load_package
from core.quality import compare as cmp
from core.rebuild.build import (
    NOT_COMPARED,
    CompareOptions,
    ComparisonRefused,
    IndexOptions,
    build_and_publish,
    embed_settings,
    preflight,
    query_sets,
)
from core.rebuild.embed import Embedder, embedding_table, embeddings_to_numpy
from core.rebuild.parts import embed_locally
from core.rebuild.queries import mix, mix_positions
from core.rebuild.validate import ValidationError, check_embedded
from core.rebuild.worker import LocalPool, Worker
from core.storage.build_dir import BuildDir
from core.storage.datasets import DATASET_MANIFEST, DatasetError, split_table, write_dataset
from core.storage.registry import POINTER, Registry
from examples.movielens import export
from examples.movielens.features import MOVIELENS_GENRES, USERS_DATASET_SCHEMA, encode_item_rows
from examples.movielens.model import TwoTower
from tests.unit.tiny_build import CFG, SCHEMA, make_build, make_checkpoint

N_ITEMS, N_USERS = 240, 60
# Flat: exact, so recall is 1.0 and the tests are about the rebuild's steps, not index tuning
OPTS = IndexOptions(kind="flat", max_queries=200)
PHASES = (
    "part_committed",
    "embedded",
    "validated",
    "index_written",
    "compared",
    "build_committed",
    "pointer_temp_written",
    "published",
)


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing on the way out may treat it as a handled error."""


def _items(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = [
        {
            "item_id": 1000 + 7 * i,  # sparse ids: nothing may assume ids are row numbers
            "title": f"movie {i} part {i % 5}",
            "genres": "|".join(rng.choice(MOVIELENS_GENRES[1:], size=1 + i % 3, replace=False)),
            "year": None if i % 17 == 0 else 1950 + i % 70,
            "tags": f"tag{i % 11} tag{i % 13}",
        }
        for i in range(n)
    ]
    return encode_item_rows(rows, SCHEMA)


def _users(n: int, item_ids: np.ndarray, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    hist = [rng.choice(item_ids, size=1 + u % SCHEMA.history_len).tolist() for u in range(n)]
    # the tower's input (the last items) and what the user has seen (for masking and popularity)
    return pa.Table.from_pydict(
        {"user_id": np.arange(5, 5 + 3 * n, 3), "history": hist, "seen_item_ids": hist},
        schema=USERS_DATASET_SCHEMA,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A checkpoint, a catalog and a users dataset (two partitions each), and their embedded tables."""
    root = tmp_path_factory.mktemp("tiny-rebuild")
    ck_path = make_checkpoint(root / "checkpoints")
    items = _items(N_ITEMS)
    users = _users(N_USERS, items["item_id"].to_numpy())
    src = {"test": True}
    write_dataset(root / "catalog", split_table(items, 2), kind="catalog", source=src)
    write_dataset(root / "users", split_table(users, 2), kind="users", source=src)
    emb = Embedder(ck_path)
    return {
        "root": root,
        "ck_path": ck_path,
        "ck": emb.model,
        "items": items,
        "users": users,
        "item_emb": emb.items(items),
        "user_emb": emb.users(users),
    }


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _staging_of_a_killed_job(reg: Registry, build_id: str, monkeypatch):
    """A staging directory whose owner process has exited (as after SIGKILL), so `gc` may remove it."""
    pid = _dead_pid()
    with monkeypatch.context() as m:
        m.setattr(os, "getpid", lambda: pid)
        return reg.staging(build_id)


def _live_registry(tmp_path, tiny) -> Registry:
    reg = Registry(tmp_path / "registry")
    make_build(reg.root, "old-build", tiny["ck_path"], n_items=50, n_users=10)
    reg.publish("old-build", expected_seq=0)
    return reg


# The live build of these tests is random vectors over other ids: the comparison gate runs, records,
# and (forced) lets the build through; test_the_comparison_gate_* runs it unforced.
FORCED = CompareOptions(force=True)


def _finalize(tiny, reg, staging, build_id, users: bool = True, opts=OPTS, on_phase=None, packages=None,
              compare=FORCED, progress=lambda _m: None):  # fmt: skip
    """`packages`: what each embedding actor loads (parts go round-robin over them); default the build's."""
    inputs = preflight(tiny["ck_path"], tiny["root"] / "catalog", tiny["root"] / "users" if users else None)
    seq = reg.pointer().seq
    settings = embed_settings(inputs.package, "fp32", 64)
    embedders = [Embedder(str(p), threads=1) for p in packages or [tiny["ck_path"]]]
    embed = embed_locally(embedders, BuildDir(staging).parts_dir, settings)
    return build_and_publish(
        inputs, embed, lambda: LocalPool([Worker(threads=1)]), reg, staging, build_id, seq, opts, settings, {},
        {"nice": 0}, on_phase=on_phase, progress=progress, compare=compare,
    )  # fmt: skip


def _assert_loadable(reg: Registry, build_id: str, items: int) -> None:
    b = BuildDir(reg.build_dir(build_id))
    m = b.read_manifest()
    assert m.build_id == build_id and m.index.ntotal == items == len(b.open_items()[0])
    assert b.load_index(m).ntotal == items
    assert read_manifest(b.checkpoint_path).version == m.checkpoint_version


# ---- preflight ---------------------------------------------------------------------------------------


def _catalog(tmp_path, table, name="catalog"):
    parts = split_table(table, 2) if table.num_rows else [table]
    write_dataset(tmp_path / name, parts, kind="catalog", source={"test": True})
    return tmp_path / name


def test_preflight_accepts_matching_inputs_and_counts_them(tiny):
    inputs = preflight(tiny["ck_path"], tiny["root"] / "catalog", tiny["root"] / "users")
    assert inputs.package.version == tiny["ck"].version
    assert inputs.catalog_manifest["row_count"] == N_ITEMS and len(inputs.catalog_files) == 2
    assert inputs.users_manifest["row_count"] == N_USERS and len(inputs.user_files) == 2
    no_users = preflight(tiny["ck_path"], tiny["root"] / "catalog", None)
    assert no_users.users_manifest is None and no_users.user_files == []


def test_preflight_refuses_a_missing_or_corrupted_package(tiny, tmp_path):
    with pytest.raises(ContractError, match="does not exist"):
        preflight(tmp_path / "no-such-package", tiny["root"] / "catalog", None)
    bad = tmp_path / "corrupt" / tiny["ck_path"].name
    shutil.copytree(tiny["ck_path"], bad)
    graph = bad / "item.graph.json"
    graph.write_bytes(graph.read_bytes().replace(b"aten.relu", b"aten.tanh", 1))
    with pytest.raises(ContractError, match="item graph sha256 is not the manifest's"):
        preflight(bad, tiny["root"] / "catalog", None)


def test_preflight_refuses_missing_columns_naming_them(tiny, tmp_path):
    catalog = _catalog(tmp_path, tiny["items"].drop_columns(["title_tokens"]))
    with pytest.raises(ValueError, match=r"missing declared input column\(s\) \['title_tokens'\]"):
        preflight(tiny["ck_path"], catalog, None)
    users = tmp_path / "users"
    write_dataset(users, [tiny["users"].select(["user_id"])], kind="users", source={"test": True})
    with pytest.raises(
        ValueError, match=r"users partition .* missing declared input column\(s\) \['history'\]"
    ):
        preflight(tiny["ck_path"], tiny["root"] / "catalog", users)


def test_preflight_refuses_a_row_count_that_disagrees_with_the_partitions(tiny, tmp_path):
    catalog = _catalog(tmp_path, tiny["items"])
    m = json.loads((catalog / DATASET_MANIFEST).read_text())
    m["row_count"] += 1
    (catalog / DATASET_MANIFEST).write_text(json.dumps(m))
    with pytest.raises(DatasetError, match=f"says {N_ITEMS + 1:,} rows but the partitions hold {N_ITEMS:,}"):
        preflight(tiny["ck_path"], catalog, None)


def test_preflight_refuses_a_column_of_another_type_naming_declared_and_found(tiny, tmp_path):
    items = tiny["items"]
    as_float = items.set_column(items.column_names.index("year_slot"), "year_slot",
                                items["year_slot"].cast(pa.float64()))  # fmt: skip
    with pytest.raises(
        ValueError, match=r"column 'year_slot': expected int64 scalar in \[0, 132\), found Arrow type double"
    ):
        preflight(tiny["ck_path"], _catalog(tmp_path, as_float), None)
    users = tmp_path / "users"
    flat = tiny["users"].set_column(1, "history", pa.array(np.arange(N_USERS)))
    write_dataset(users, [flat], kind="users", source={"test": True})
    with pytest.raises(ValueError, match=r"users partition .*column 'history': expected list of int64"):
        preflight(tiny["ck_path"], tiny["root"] / "catalog", users)


def test_preflight_refuses_an_empty_catalog(tiny, tmp_path):
    catalog = _catalog(tmp_path, tiny["items"].slice(0, 0))
    with pytest.raises(DatasetError, match=r"is empty \(0 rows\)"):
        preflight(tiny["ck_path"], catalog, None)


# ---- the gates ---------------------------------------------------------------------------------------


def _embedded(n: int, version: str = "v1", seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(100, 100 + 2 * n, 2))  # unsorted, as Ray Data writes them
    return embedding_table(ids, rng.standard_normal((n, 4)).astype(np.float32), version, "item_id")


def _check(table, rows, version="v1"):
    return check_embedded(
        table, id_name="item_id", expected_version=version, expected_rows=rows, what="catalog"
    )


def test_check_embedded_returns_rows_sorted_by_id_and_aligned():
    t = _embedded(50)
    ids, x = _check(t, 50)
    assert (np.diff(ids) > 0).all() and x.shape == (50, 4)
    by_id = dict(zip(t["item_id"].to_pylist(), embeddings_to_numpy(t), strict=True))
    np.testing.assert_array_equal(x, np.stack([by_id[i] for i in ids.tolist()]))


def test_check_embedded_refuses_rows_from_more_than_one_checkpoint():
    mixed = pa.concat_tables([_embedded(10, "v1"), _embedded(3, "v2", seed=1)])
    with pytest.raises(
        ValidationError, match=r"must all carry checkpoint version 'v1'; found \['v1', 'v2'\]"
    ):
        _check(mixed, 13)
    with pytest.raises(ValidationError, match=r"found \['v2'\]"):
        _check(_embedded(10, "v2"), 10)
    with pytest.raises(ValidationError, match=r"found \[\]"):
        _check(_embedded(10).slice(0, 0), 0)


def test_check_embedded_refuses_a_wrong_row_count():
    with pytest.raises(ValidationError, match="expected 51 embedded rows .*, got 50"):
        _check(_embedded(50), 51)
    with pytest.raises(ValidationError, match="expected 49 embedded rows"):
        _check(_embedded(50), 49)


def test_check_embedded_refuses_duplicate_ids_naming_them():
    t = _embedded(20)
    dup = pa.concat_tables([t, t.slice(0, 3)])
    first = sorted(t["item_id"].to_pylist()[:3])
    with pytest.raises(
        ValidationError, match=re.escape(f"item_id must be unique; 3 duplicates, e.g. {first}")
    ):
        _check(dup, 23)


def test_check_embedded_refuses_non_finite_vectors_naming_ids():
    t = _embedded(20)
    x = embeddings_to_numpy(t).copy()
    x[4, 1], x[7, 0] = np.nan, np.inf
    bad = embedding_table(t["item_id"].to_numpy(), x, "v1", "item_id")
    ids = sorted([t["item_id"][4].as_py(), t["item_id"][7].as_py()])
    with pytest.raises(
        ValidationError, match=re.escape(f"2 vectors contain NaN or infinity (e.g. item_id {ids})")
    ):
        _check(bad, 20)


# ---- the embedder ------------------------------------------------------------------------------------


def test_embedder_items_carry_one_version_and_match_the_package(tiny):
    out, ck = tiny["item_emb"], tiny["ck"]
    assert out.num_rows == N_ITEMS and out["item_id"].to_pylist() == tiny["items"]["item_id"].to_pylist()
    assert set(out["checkpoint_version"].cast(pa.string()).to_pylist()) == {ck.version}
    x = embeddings_to_numpy(out)
    assert x.shape == (N_ITEMS, CFG.embed_dim) and x.dtype == np.float32
    np.testing.assert_allclose(x, ck.item_vectors(tiny["items"]), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def test_embedder_users_carry_one_version_and_match_the_package(tiny):
    out, ck, users = tiny["user_emb"], tiny["ck"], tiny["users"]
    assert out["user_id"].to_pylist() == users["user_id"].to_pylist()
    assert set(out["checkpoint_version"].cast(pa.string()).to_pylist()) == {ck.version}
    x = embeddings_to_numpy(out)
    assert x.shape == (N_USERS, CFG.embed_dim)
    np.testing.assert_allclose(x, ck.user_vectors(users), atol=1e-6)


def test_embedder_refuses_batches_without_the_tower_columns(tiny):
    emb = Embedder(tiny["ck_path"])
    with pytest.raises(
        ValueError, match=r"catalog batch is missing declared input column\(s\) \['tag_tokens'\]"
    ):
        emb.items(tiny["items"].drop_columns(["tag_tokens"]))
    with pytest.raises(ValueError, match=r"users batch is missing declared input column\(s\) \['history'\]"):
        emb.users(tiny["users"].select(["user_id"]))


# ---- which queries tune and gate the index -----------------------------------------------------------


def test_without_users_the_queries_are_seeded_item_mixtures(tiny):
    xb = embeddings_to_numpy(tiny["item_emb"])
    tune, hold, info = query_sets(None, xb, 200, seed=0)
    assert info == {"source": "item_mixtures", "tuning": 100, "holdout": 100}
    positions, offsets = mix_positions(len(xb), 200, seed=0)
    np.testing.assert_allclose(np.concatenate([tune, hold]), mix(xb[positions], offsets), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(tune, axis=1), 1.0, atol=1e-5)
    lengths = np.diff(np.append(offsets, len(positions)))
    assert lengths.min() == 1 and lengths.max() > 1  # single items and mixtures both
    assert not np.array_equal(mix_positions(len(xb), 200, seed=1)[0][:50], positions[:50])


def test_with_users_the_queries_are_disjoint_user_embeddings(tiny):
    xu = embeddings_to_numpy(tiny["user_emb"])
    tune, hold, info = query_sets(xu, embeddings_to_numpy(tiny["item_emb"]), 200, seed=0)
    assert info == {"source": "users", "tuning": N_USERS // 2, "holdout": N_USERS - N_USERS // 2}
    rows = {r.tobytes(): i for i, r in enumerate(xu)}
    picked = [rows[r.tobytes()] for r in np.concatenate([tune, hold])]
    assert len(set(picked)) == N_USERS  # every user once: tuning and held-out sets are disjoint


# ---- build_and_publish ----------------------------------------------------------------------------------------


def test_finalize_with_users_publishes_tables_and_records_the_queries(tiny, tmp_path):
    reg = _live_registry(tmp_path, tiny)
    staging = reg.staging("b-users")
    m = _finalize(tiny, reg, staging, "b-users")
    assert reg.current() == "b-users" and not staging.exists()
    _assert_loadable(reg, "b-users", N_ITEMS)
    assert m.users.row_count == N_USERS and m.homogeneity["user_rows"] == N_USERS
    assert m.quality["queries"] == {"source": "users", "tuning": N_USERS // 2, "holdout": N_USERS // 2}
    b = BuildDir(reg.build_dir("b-users"))
    assert reg.manifest("b-users").quality == m.quality
    ids, xu = b.open_users(m)
    assert len(ids) == N_USERS and (np.diff(ids) > 0).all() and xu.shape == (N_USERS, CFG.embed_dim)


def test_finalize_without_users_publishes_a_build_tuned_on_item_mixtures(tiny, tmp_path):
    reg = _live_registry(tmp_path, tiny)
    staging = reg.staging("b-no-users")
    m = _finalize(tiny, reg, staging, "b-no-users", users=False)
    assert reg.current() == "b-no-users"
    _assert_loadable(reg, "b-no-users", N_ITEMS)
    m = reg.manifest("b-no-users")
    assert m.users is None and not m.has_users and m.homogeneity["user_rows"] == 0
    assert m.quality["queries"] == {"source": "item_mixtures", "tuning": 100, "holdout": 100}
    assert m.quality["tuning_queries"] == 100 and m.quality["holdout_queries"] == 100
    b = BuildDir(reg.build_dir("b-no-users"))
    assert not b.table_path("user_ids").exists() and not b.table_path("user_embeddings").exists()
    assert len(b.open_users(m)[0]) == 0


def test_finalize_without_users_still_refuses_a_held_out_recall_below_target(tiny, tmp_path, monkeypatch):
    real = ann.build_tuned

    def below_target(*args, **kwargs):
        idx, spec, quality, t = real(*args, **kwargs)
        low = {"recall_at_k": 0.5, "recall_lower_95": 0.47, "tuning_reached_target": False}
        return idx, spec, {**quality, **low}, t

    monkeypatch.setattr(ann, "build_tuned", below_target)
    reg = _live_registry(tmp_path, tiny)
    before, builds = (reg.root / POINTER).read_bytes(), reg.list_builds()
    staging = reg.staging("b-low")
    with pytest.raises(
        ValidationError,
        match=r"recall@10 0\.5000 \(95% lower bound 0\.4700 over \d+ item_mixtures queries\) is below",
    ):
        _finalize(tiny, reg, staging, "b-low", users=False)
    assert (reg.root / POINTER).read_bytes() == before and reg.list_builds() == builds


@pytest.mark.parametrize("phase", PHASES)
def test_a_crash_at_each_phase_leaves_current_on_a_complete_build(phase, tiny, tmp_path, monkeypatch):
    reg = _live_registry(tmp_path, tiny)
    pointer_before, builds_before = (reg.root / POINTER).read_bytes(), reg.list_builds()
    staging = _staging_of_a_killed_job(reg, "b-new", monkeypatch)

    def crash(name: str) -> None:
        if name == phase:
            raise Killed(name)

    with pytest.raises(Killed):
        _finalize(tiny, reg, staging, "b-new", on_phase=crash)

    pointer = json.loads((reg.root / POINTER).read_text())  # whole, valid JSON at every phase
    committed = phase in ("build_committed", "pointer_temp_written", "published")
    assert staging.exists() != committed
    for b in reg.list_builds():  # whatever is listed is complete and loadable: no half build visible
        _assert_loadable(reg, b, N_ITEMS if b == "b-new" else 50)
    assert reg.list_builds() == sorted(builds_before + (["b-new"] if committed else []))
    if phase == "published":
        assert pointer["build_id"] == reg.current() == "b-new"
    else:
        assert (reg.root / POINTER).read_bytes() == pointer_before and pointer["build_id"] == "old-build"

    removed = reg.gc(rollback_window=2, keep_extra=0)
    leftover = staging.name if not committed else "b-new"
    assert (leftover in removed) == (phase != "published")  # a published build is live: kept
    assert not any(p.name.startswith(".") for p in reg.builds.iterdir())
    assert not list(reg.root.glob(f".{POINTER}.tmp-*"))  # nor a pointer temp killed before its replace
    _assert_loadable(reg, reg.current(), N_ITEMS if phase == "published" else 50)

    retry = reg.staging("b-retry")  # the job run again
    _finalize(tiny, reg, retry, "b-retry")
    assert reg.current() == "b-retry"
    _assert_loadable(reg, "b-retry", N_ITEMS)
    assert reg.pointer().stack[-2] == ("b-new" if phase == "published" else "old-build")


class _NoYearItemProgram(export.ItemProgram):
    """The same parameters, another forward (the year field zeroed): new code, same weights."""

    def forward(self, item_id, genre_ids, genre_ids_offsets, year_slot, title_tokens, title_tokens_offsets,
                tag_tokens, tag_tokens_offsets):  # fmt: skip
        return super().forward(item_id, genre_ids, genre_ids_offsets, year_slot * 0, title_tokens,
                               title_tokens_offsets, tag_tokens, tag_tokens_offsets)  # fmt: skip


def _changed_code_package(root, src) -> object:
    """The tiny model of `src` re-exported with a changed item-tower forward and the same weights."""
    torch.manual_seed(0)  # make_checkpoint's seed: the same weights
    model = TwoTower(SCHEMA, CFG).eval()
    return write_package(root, family="tiny", item_tower=_NoYearItemProgram(model),
                         user_tower=export.UserProgram(model), item_inputs=export.item_inputs(SCHEMA),
                         user_inputs=export.user_inputs(SCHEMA), scorer_user=export.ScorerUser(model),
                         scorer_pair=export.ScorerPair(model))  # fmt: skip


def test_changed_code_with_the_same_weights_is_another_version_and_is_not_mixed_in(tiny, tmp_path):
    """A changed forward is a new version (the same code and weights again keep theirs), and the
    rebuild refuses to mix its vectors with the old version's, as it refuses other versions'."""
    again = make_checkpoint(tmp_path / "again", seed=0)
    assert load_package(again).version == tiny["ck"].version  # re-exported elsewhere: same version
    changed = _changed_code_package(tmp_path / "changed", tiny["ck_path"])
    assert load_package(changed).version != tiny["ck"].version
    reg = _live_registry(tmp_path, tiny)
    with pytest.raises(ValidationError, match=f"found .*'{load_package(changed).version}'"):
        _finalize(tiny, reg, reg.staging("b-mixed"), "b-mixed", packages=[tiny["ck_path"], changed])
    assert reg.current() == "old-build" and reg.list_builds() == ["old-build"]


def test_a_worker_that_embeds_with_another_checkpoint_fails_the_build_before_anything_is_written(
    tiny, tmp_path
):
    """Two workers, one loaded with another checkpoint: its parts are refused where they are embedded."""
    reg = _live_registry(tmp_path, tiny)
    staging = reg.staging("b-mixed")
    other = make_checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(ValidationError, match=f"found .*'{load_package(other).version}'"):
        _finalize(tiny, reg, staging, "b-mixed", packages=[tiny["ck_path"], other])
    assert reg.current() == "old-build" and reg.list_builds() == ["old-build"]
    assert not BuildDir(staging).index_path.exists()


def test_the_comparison_gate_refuses_an_unrelated_build_commits_it_unpublished_and_names_the_numbers(
    tiny, tmp_path
):
    reg = _live_registry(tmp_path, tiny)
    before = (reg.root / POINTER).read_bytes()
    staging = reg.staging("b-unrelated")
    with pytest.raises(ComparisonRefused, match=r"top-10 overlap with live build old-build 0\.0 < 0\.3") as e:
        _finalize(tiny, reg, staging, "b-unrelated", compare=CompareOptions())
    assert (reg.root / POINTER).read_bytes() == before  # CURRENT untouched
    m = reg.manifest("b-unrelated")  # committed, not live: it can be canaried
    assert m.comparison == e.value.comparison and m.comparison["passed"] is False
    assert m.comparison["base"]["build_id"] == "old-build" and not m.comparison["forced"]
    assert m.comparison["checked"] == ["live build"]  # no held-out data: the floor said it did not check
    forced = _finalize(tiny, reg, reg.staging("b-forced"), "b-forced")
    assert reg.current() == "b-forced" and forced.comparison["forced"] and not forced.comparison["passed"]


def _popular_holdout(tiny, path):
    """Held-out interactions for the tiny users: each user's 10 most popular items (over every user's
    history) they have not seen, so the popularity ranking finds them all and a model that learnt
    nothing (the tiny checkpoint is untrained) finds few."""
    users = tiny["users"]
    ev = cmp.EvalUsers(users["user_id"].to_numpy(), None,
                       [np.asarray(h) for h in users["seen_item_ids"].to_pylist()], None, {})  # fmt: skip
    popularity = cmp.item_popularity(tiny["root"] / "users")
    top = cmp.popularity_top_k(np.sort(tiny["items"]["item_id"].to_numpy()), popularity, ev, 10)
    t = pa.table({"user_id": np.repeat(ev.user_ids, 10), "item_id": top.reshape(-1)})
    write_dataset(path, [t], kind="interactions", source={"test": True})
    return path


def test_a_first_build_from_an_untrained_model_is_refused_by_the_quality_floor_committed_unpublished(
    tiny, tmp_path
):
    reg = Registry(tmp_path / "registry")  # no live build: only the floor's baselines to compare with
    gate = CompareOptions(holdout=_popular_holdout(tiny, tmp_path / "test"))
    refused = (r"\(no live build\) quality floor: held-out Recall@10 0\.\d+ over 60 users is 0\.\d+x the "
               r"popularity ranking's 1\.0 \(floor 0\.5x\) and [\d.]+x a random ranking's 0\.04\d+ \(floor 10\.0x\)")  # fmt: skip
    with pytest.raises(ComparisonRefused, match=refused) as e:
        _finalize(tiny, reg, reg.staging("b-first"), "b-first", compare=gate)
    assert reg.current() is None and reg.list_builds() == ["b-first"]  # committed, not live
    c = reg.manifest("b-first").comparison
    assert c == e.value.comparison and c["base"] is None and c["not_compared"] == "no live build"
    assert not c["passed"] and not c["forced"] and len(c["refused_for"]) == 1
    assert c["checked"] == ["quality floor"]
    f = c["quality_floor"]
    assert f["users"] == N_USERS and f["popularity_recall_at_k"] == 1.0 and f["lift_over_popularity"] < 0.5
    forced = _finalize(
        tiny, reg, reg.staging("b-forced"), "b-forced", compare=dataclasses.replace(gate, force=True)
    )
    assert reg.current() == "b-forced" and forced.comparison["forced"] and not forced.comparison["passed"]


def test_without_held_out_data_or_with_the_gate_off_the_build_says_what_was_not_checked(tiny, tmp_path):
    reg, said = Registry(tmp_path / "registry"), []
    m = _finalize(
        tiny, reg, reg.staging("b-first"), "b-first", compare=CompareOptions(), progress=said.append
    )
    assert reg.current() == "b-first" and m.comparison["passed"] and m.comparison["base"] is None
    assert m.comparison["quality_floor"] == {"checked": False, "why": "no held-out data"}
    assert m.comparison["checked"] == [] and m.comparison["not_compared"] == "no live build"
    assert "quality floor: not checked, no held-out data" in said
    assert "comparison gate: PASSED (checked: nothing)" in said
    off = _finalize(tiny, reg, reg.staging("b-off"), "b-off", compare=CompareOptions(enabled=False),
                    progress=said.append)  # fmt: skip
    assert reg.current() == "b-off" and off.comparison == {"skipped": NOT_COMPARED}
    assert said[-1] == NOT_COMPARED  # said, as well as recorded
