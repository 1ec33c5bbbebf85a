"""The rebuild job end to end: `ray job submit`, second checkpoint + rollback, multi-node placement."""

from __future__ import annotations

import json
import urllib.request
import uuid

import pytest

from core.contract.package import read_manifest
from core.rebuild.build import IndexOptions
from core.storage.build_dir import BuildDir
from core.storage.datasets import read_table
from core.storage.registry import Registry
from tests.conftest import REPO
from tests.integration.builds import check_build, current_build
from tests.integration.conftest import ray_cli, rebuild, run_module, summary, wait_for


@pytest.fixture(scope="module")
def catalog_ids(ml_data) -> set[int]:
    return set(read_table(ml_data / "catalog")["item_id"].to_pylist())


@pytest.fixture(scope="module")
def submitted(ray_head, ml_data, checkpoints, new_registry):
    """Rebuild with checkpoint A through the real `ray job submit` path."""
    registry = new_registry("reg-submit")
    sid = f"skewless-rebuild-{uuid.uuid4().hex[:8]}"
    ray_cli(
        "job", "submit", "--address", ray_head["dashboard"], "--working-dir", str(REPO), "--submission-id", sid, "--no-wait",
        "--", "python", "-m", "jobs.rebuild_index", "--checkpoint", str(checkpoints[0]), "--catalog", str(ml_data / "catalog"),
        "--registry", str(registry),
        env=ray_head["env"],
    )  # fmt: skip

    def terminal():
        status = job_status(ray_head, sid)
        return status if status in ("SUCCEEDED", "FAILED", "STOPPED") else None

    status = wait_for(terminal, 600, f"job {sid} to finish", interval_s=2)
    cli_status = ray_cli("job", "status", sid, "--address", ray_head["dashboard"], env=ray_head["env"]).stdout
    logs = ray_cli("job", "logs", sid, "--address", ray_head["dashboard"], env=ray_head["env"]).stdout
    return {"sid": sid, "status": status, "cli_status": cli_status, "logs": logs, "registry": registry}


def job_status(ray_head: dict, sid: str) -> str:
    """The job's status from the dashboard's Jobs API (what the dashboard's Jobs page shows)."""
    req = urllib.request.Request(
        f"{ray_head['dashboard']}/api/jobs/{sid}",
        headers={"Authorization": f"Bearer {ray_head['env']['RAY_AUTH_TOKEN']}"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["status"]


def test_ray_job_submit_publishes_all_items_from_one_checkpoint(
    submitted, ray_head, checkpoints, catalog_ids
):
    assert submitted["status"] == "SUCCEEDED", submitted["logs"][-3000:]
    assert "succeeded" in submitted["cli_status"].lower()  # what `ray job status` reports

    build = current_build(submitted["registry"])
    version_a = read_manifest(checkpoints[0]).version
    checked = check_build(submitted["registry"], build, checkpoint_version=version_a, catalog_ids=catalog_ids)
    assert len(catalog_ids) == 9_742
    assert checked["recall_at_10"] >= 0.95
    assert f"published {build}" in submitted["logs"] and "SUMMARY " in submitted["logs"]


def test_the_dashboard_shows_the_embedding_operator_with_its_rows(submitted, ray_head):
    """The dashboard's Ray Data API (what its Ray Data view shows) lists the rebuild's ONE embedding
    execution: its operator with every partition (8 of items, 8 of users) as a row; the job log has
    Ray Data's progress; the SUMMARY counts attempts, retries and actor restarts."""
    job = _dashboard_get(ray_head, f"/api/jobs/{submitted['sid']}")
    got = _dashboard_get(ray_head, f"/api/data/datasets/{job['job_id']}")
    [ds] = [d for d in got["datasets"] if d["dataset"].startswith("skewless_embed")]
    assert ds["state"] == "FINISHED" and ds["progress"] == ds["total"] == 16, ds
    [op] = [o for o in ds["operators"] if "PartEmbedder" in o["operator"]]
    assert op["state"] == "FINISHED" and op["progress"] == 16, op
    assert "Running Dataset: skewless_embed" in submitted["logs"]
    s = json.loads(
        next(x for x in submitted["logs"].splitlines() if x.startswith("SUMMARY "))[len("SUMMARY ") :]
    )
    assert s["embedding"] == {"parts": 16, "attempts": 16, "retries": 0, "actors": 1, "actor_restarts": 0}


def _dashboard_get(ray_head: dict, path: str) -> dict:
    req = urllib.request.Request(
        f"{ray_head['dashboard']}{path}",
        headers={"Authorization": f"Bearer {ray_head['env']['RAY_AUTH_TOKEN']}"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_second_checkpoint_publishes_then_one_rollback_restores_the_first(
    submitted, ray_head, ml_data, checkpoints, catalog_ids
):
    registry = submitted["registry"]
    first = current_build(registry)
    out = rebuild(ray_head, checkpoints[1], ml_data / "catalog", registry)
    second = summary(out)["build_id"]
    assert current_build(registry) == second != first
    version_b = read_manifest(checkpoints[1]).version
    check_build(registry, second, checkpoint_version=version_b, catalog_ids=catalog_ids)

    run_module("jobs.registry", "--registry", registry, "rollback")
    assert current_build(registry) == first
    version_a = read_manifest(checkpoints[0]).version
    check_build(registry, first, checkpoint_version=version_a, catalog_ids=catalog_ids)
    listing = run_module("jobs.registry", "--registry", registry, "list").stdout
    assert f"* {first}" in listing and f"  {second}" in listing


def test_a_build_without_users_is_tuned_on_item_mixtures_and_published(
    ray_head, ml_data, checkpoints, new_registry, catalog_ids
):
    """--no-users: no user tables, and the index is tuned and gated on the user tower over sampled
    histories (real queries), not on item vectors; --nice reaches the actors and the driver unharmed."""
    registry = new_registry("reg-no-users")
    out = rebuild(
        ray_head,
        checkpoints[0],
        ml_data / "catalog",
        registry,
        "--no-users",
        "--nice",
        "5",
        "--index",
        "auto",
    )
    build = summary(out)["build_id"]
    assert current_build(registry) == build
    version_a = read_manifest(checkpoints[0]).version
    checked = check_build(registry, build, checkpoint_version=version_a, catalog_ids=catalog_ids)
    m = checked["manifest"]
    assert m.users is None and m.homogeneity["user_rows"] == 0
    half = IndexOptions.max_queries // 2
    assert m.quality["queries"] == {"source": "item_mixtures", "tuning": half, "holdout": half}
    assert m.quality["recall_at_k"] >= m.quality["target"] == 0.95
    assert m.run["nice"] == 5
    b = BuildDir(Registry(registry).build_dir(build))
    assert not b.table_path("user_ids").exists() and not b.parts_dir.exists()


def test_submit_without_the_token_is_refused(ray_head, ml_data, checkpoints, tmp_path):
    """Documents Ray 2.60's token auth: a client without the token cannot submit."""
    env = {k: v for k, v in ray_head["env"].items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "no-token")
    p = ray_cli("job", "list", "--address", ray_head["dashboard"], env=env, check=False)
    assert p.returncode != 0 and "authentication" in (p.stdout + p.stderr).lower()
