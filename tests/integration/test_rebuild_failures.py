"""Crashes at injected points and bad inputs: CURRENT always names a complete, loadable build."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pytest
import torch

from core.contract.package import read_manifest
from core.storage.build_dir import BuildDir
from core.storage.datasets import read_table, split_table, write_dataset
from core.storage.registry import POINTER, Registry
from examples.movielens.checkpoint import load_checkpoint
from examples.movielens.export import export_model
from examples.movielens.features import bucket_ids
from examples.movielens.train import checkpoint_of
from tests.integration.builds import check_build, current_build
from tests.integration.conftest import rebuild, run_module, summary


@pytest.fixture(scope="module")
def live(ml_data, registry_with_a):
    """A registry whose live build came from checkpoint A."""
    registry, build = registry_with_a("reg-live")
    return {
        "registry": registry,
        "build": build,
        "ids": set(read_table(ml_data / "catalog")["item_id"].to_pylist()),
    }


def _assert_untouched(live, checkpoints, pointer_before: bytes):
    reg = live["registry"]
    assert (reg / POINTER).read_bytes() == pointer_before
    assert current_build(reg) == live["build"]
    check_build(
        reg,
        live["build"],
        checkpoint_version=read_manifest(checkpoints[0]).version,
        catalog_ids=live["ids"],
    )


@pytest.mark.parametrize("phase", ["embedded", "index_written", "build_committed", "pointer_temp_written"])
def test_sigkill_at_each_phase_leaves_current_on_a_complete_build(
    phase, live, ray_head, ml_data, checkpoints
):
    before = (live["registry"] / POINTER).read_bytes()
    p = run_module(
        "tests.integration.crash_rebuild", phase, "--", "--checkpoint", checkpoints[1], "--catalog", ml_data / "catalog",
        "--registry", live["registry"], "--address", ray_head["gcs"], "--index", "flat", env=ray_head["env"],
        check=False,
    )  # fmt: skip
    assert p.returncode == -9, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"phase {phase}" in p.stdout
    _assert_untouched(live, checkpoints, before)
    staged = [d for d in (live["registry"] / "builds").iterdir() if d.name.startswith(".tmp-")]
    if phase in ("embedded", "index_written"):
        assert staged, "the killed build should have left its staging directory behind"
    removed = Registry(live["registry"]).gc(rollback_window=2, keep_extra=10)
    assert {d.name for d in staged} <= set(removed)  # gc clears what the dead job half-wrote
    _assert_untouched(live, checkpoints, before)


def _bad_catalog(ml_data, tmp_path, transform):
    table = transform(read_table(ml_data / "catalog"))
    out = tmp_path / "bad" / "catalog"
    parts = split_table(table, 4) if table.num_rows else [table]
    write_dataset(out, parts, kind="catalog", source={"test": True})
    return out


def _corrupt_copy(package, tmp_path):
    bad = tmp_path / "corrupt" / package.name
    shutil.copytree(package, bad)
    graph = bad / "item.graph.json"
    graph.write_bytes(graph.read_bytes().replace(b"aten.relu", b"aten.tanh", 1))
    return bad


def _nan_checkpoint(package, tmp_path, ml_data=None):
    """The package's model with NaN in its item tower: in the id-embedding rows of five catalog items
    (their vectors are NaN, the rest are fine: the gate names them), else in a bias (every vector is
    NaN: the package's own trial batch refuses it before any partition is embedded)."""
    ck = load_checkpoint(checkpoint_of(package, tmp_path))
    tower = ck.model.item_tower
    with torch.no_grad():
        if ml_data is None:
            tower.mlp[-1].bias[0] = float("nan")
        else:
            ids = read_table(ml_data / "catalog")["item_id"].to_numpy()[:5]
            tower.id_emb.weight[torch.from_numpy(bucket_ids(ids, ck.schema.item_id_buckets))] = float("nan")
    return export_model(ck.model, tmp_path / "nan", family="ml-two-tower", metadata={})


def _cast(t: pa.Table, name: str, typ) -> pa.Table:
    return t.set_column(t.column_names.index(name), name, t[name].cast(typ))


def _genre_past_vocabulary(t: pa.Table) -> pa.Table:
    genres = t["genre_ids"].to_pylist()
    genres[7] = [999]
    return t.set_column(t.column_names.index("genre_ids"), "genre_ids", pa.array(genres, t["genre_ids"].type))


BAD_INPUTS = {
    "missing package": (
        lambda ck, ml, tmp: (tmp / "no-such-package", ml / "catalog"),
        "does not exist",
    ),
    "corrupted package": (
        lambda ck, ml, tmp: (_corrupt_copy(ck, tmp), ml / "catalog"),
        "item graph sha256 is not the manifest's",
    ),
    "duplicate ids": (
        lambda ck, ml, tmp: (ck, _bad_catalog(ml, tmp, lambda t: pa.concat_tables([t, t.slice(0, 5)]))),
        "item_id must be unique; 5 duplicates",
    ),
    "missing columns": (
        lambda ck, ml, tmp: (ck, _bad_catalog(ml, tmp, lambda t: t.drop_columns(["title_tokens"]))),
        "missing declared input column(s) ['title_tokens']",
    ),
    "empty catalog": (
        lambda ck, ml, tmp: (ck, _bad_catalog(ml, tmp, lambda t: t.slice(0, 0))),
        "is empty (0 rows)",
    ),
    "column of another type": (
        lambda ck, ml, tmp: (ck, _bad_catalog(ml, tmp, lambda t: _cast(t, "year_slot", pa.float64()))),
        "column 'year_slot': expected int64 scalar in [0, 132), found Arrow type double",
    ),
    "id past its vocabulary": (
        lambda ck, ml, tmp: (ck, _bad_catalog(ml, tmp, _genre_past_vocabulary)),
        "column 'genre_ids': expected list of int64 (at most 21) in [0, 21), found value 999 outside [0, 21)",
    ),
    "NaN embeddings": (
        lambda ck, ml, tmp: (_nan_checkpoint(ck, tmp, ml), ml / "catalog"),
        "vectors contain NaN or infinity",
    ),
    "a package that embeds to NaN": (
        lambda ck, ml, tmp: (_nan_checkpoint(ck, tmp), ml / "catalog"),
        "item tower gives (2, 64) (finite: False) for 2 rows",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_nonzero_names_the_problem_and_publishes_nothing(
    case, live, ray_head, ml_data, checkpoints, tmp_path
):
    make, message = BAD_INPUTS[case]
    checkpoint, catalog = make(checkpoints[0], ml_data, tmp_path)
    before = (live["registry"] / POINTER).read_bytes()
    builds_before = Registry(live["registry"]).list_builds()
    # --force-unchecked: these checkpoints are new versions with no skew check; the gate is tested elsewhere
    p = rebuild(
        ray_head, checkpoint, catalog, live["registry"], "--no-users", "--force-unchecked", check=False
    )
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    assert message in p.stderr, p.stderr[-3000:]
    _assert_untouched(live, checkpoints, before)
    assert Registry(live["registry"]).list_builds() == builds_before
    assert not [d for d in (live["registry"] / "builds").iterdir() if d.name.startswith(".tmp-")]


def test_nan_vectors_are_reported_with_example_ids(live, ray_head, ml_data, checkpoints, tmp_path):
    p = rebuild(
        ray_head,
        _nan_checkpoint(checkpoints[0], tmp_path, ml_data),
        ml_data / "catalog",
        live["registry"],
        "--no-users",
        "--force-unchecked",  # a new version with no skew check; the gate is tested in test_skew.py
        check=False,
    )
    assert p.returncode == 2
    # refused by the first worker whose partition it is, naming the partition, the count and example ids
    assert "vectors contain NaN or infinity (e.g. item_id [" in p.stderr and "catalog partition" in p.stderr


def _parts_committed(registry, build_id: str) -> dict[str, int]:
    parts = registry / "builds" / f".tmp-{build_id}" / "parts"
    return {d.name: (d / "part.json").stat().st_ino for d in parts.iterdir() if not d.name.startswith(".")}


def test_a_killed_rebuild_resumes_reusing_its_committed_parts_bit_identically(
    ray_head, ml_data, checkpoints, new_registry, live_a, tmp_path
):
    """SIGKILL after three committed partitions; resume: the committed ones are reused, not re-embedded,
    and the published vectors equal an uninterrupted build's bit for bit. A resume with another
    checkpoint or a changed catalog is refused naming what differs, and leaves the staged parts alone."""
    users = ("--users", ml_data / "users")
    ref_reg, ref_build = live_a  # the uninterrupted build: package A, this catalog and these users
    registry = new_registry("reg-resume")
    p = run_module(
        "tests.integration.crash_rebuild", "part_committed#3", "--", "--checkpoint", checkpoints[0], "--catalog",
        ml_data / "catalog", *users, "--registry", registry, "--address", ray_head["gcs"], env=ray_head["env"],
        check=False,
    )  # fmt: skip
    assert p.returncode == -9, p.stdout[-2000:] + p.stderr[-2000:]
    build_id = next(x for x in p.stdout.splitlines() if x.startswith("rebuild ")).split()[1].rstrip(":")
    other = rebuild(ray_head, checkpoints[1], ml_data / "catalog", registry, *users, "--resume", build_id,
                    "--force-unchecked", check=False)  # fmt: skip
    assert other.returncode == 2 and "checkpoint version: staged" in other.stderr, other.stderr[-2000:]
    committed = _parts_committed(registry, build_id)  # (the killed driver's actors are gone by now)
    assert len(committed) >= 3 and current_build(registry) is None
    changed = _bad_catalog(ml_data, tmp_path, lambda t: t.slice(1))
    moved = rebuild(ray_head, checkpoints[0], changed, registry, *users, "--resume", build_id, check=False)
    assert moved.returncode == 2 and "catalog fingerprint: staged" in moved.stderr, moved.stderr[-2000:]
    assert _parts_committed(registry, build_id) == committed  # refusals touch nothing

    resumed = rebuild(ray_head, checkpoints[0], ml_data / "catalog", registry, *users, "--resume", build_id)
    s = summary(resumed)
    assert s["build_id"] == build_id == current_build(registry)
    assert s["parts"]["reused"] == len(committed) and s["parts"]["embedded"] == 16 - len(committed)
    redone = {x.split()[1].rstrip(":") for x in resumed.stdout.splitlines() if x.startswith("part ")}
    assert redone and not redone & set(committed)  # no committed partition was embedded again
    a = BuildDir(Registry(ref_reg).build_dir(ref_build))
    b = BuildDir(Registry(registry).build_dir(build_id))
    for x, y in zip(
        a.open_items() + a.open_users(a.read_manifest()),
        b.open_items() + b.open_users(b.read_manifest()),
        strict=True,
    ):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
