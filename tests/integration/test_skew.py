"""The version-skew check as a readiness gate: matrix, storage, publish gate and its override."""

from __future__ import annotations

import json

import numpy as np

from core.contract.package import read_manifest
from core.storage.registry import Registry
from tests.integration.conftest import rebuild, run_module, summary


def _result(stdout: str) -> dict:
    info = json.loads(next(x for x in stdout.splitlines() if x.startswith("SKEW "))[5:])
    return json.loads(open(info["path"]).read()) | {"_path": info["path"]}


def test_unrelated_versions_fail_the_check_and_the_diagonal_dominates(
    ml_data, checkpoints, scratch_checkpoint, tmp_path
):
    p = run_module(
        "jobs.skew_check",
        "--checkpoints",
        checkpoints[0],
        scratch_checkpoint,
        "--data",
        ml_data,
        "--registry",
        tmp_path,
        check=False,
    )
    assert p.returncode == 3, p.stdout + p.stderr
    res = _result(p.stdout)
    recall, overlap = np.array(res["recall"]), np.array(res["overlap"])
    assert recall.shape == (2, 2) and not res["passed"]
    for i in range(2):  # per index version: its own query tower retrieves at least as well as the other's
        assert recall[i, i] >= recall[1 - i, i]
        assert overlap[i, i] == 1.0 and overlap[1 - i, i] < 0.5  # unrelated spaces barely overlap
    assert res["_path"].startswith(str(tmp_path / "skew" / "ml-two-tower"))
    assert (tmp_path / "skew" / "ml-two-tower" / (res["check_id"] + ".png")).stat().st_size > 1000
    assert "FAILED" in p.stdout and "Recall@10" in p.stdout


def test_warm_started_versions_pass(skew_results, checkpoints):
    (path,) = list((skew_results / "ml-two-tower").glob("*.json"))
    res = json.loads(path.read_text())
    assert res["passed"] and res["versions"] == [read_manifest(c).version for c in checkpoints]
    assert max(p["relative_drop"] for p in res["pairs"].values()) <= 0.2


def test_gate_blocks_an_unchecked_version_and_force_allows_it_on_record(
    ray_head, ml_data, scratch_checkpoint, new_registry
):
    registry = new_registry("reg-gate")  # holds a passed check for (A, B) only
    p = rebuild(ray_head, scratch_checkpoint, ml_data / "catalog", registry, check=False)
    assert p.returncode == 2 and "skew gate" in p.stderr and "--force-unchecked" in p.stderr
    assert Registry(registry).current() is None and Registry(registry).list_builds() == []

    out = rebuild(ray_head, scratch_checkpoint, ml_data / "catalog", registry, "--force-unchecked")
    m = Registry(registry).manifest(summary(out)["build_id"])
    assert m.skew_gate["status"] == "forced" and Registry(registry).current() == m.build_id


def test_checked_version_publishes_with_the_check_on_record(ray_head, ml_data, checkpoints, new_registry):
    registry = new_registry("reg-gate-ok")
    out = rebuild(ray_head, checkpoints[1], ml_data / "catalog", registry)
    gate = Registry(registry).manifest(summary(out)["build_id"]).skew_gate
    assert gate["status"] == "passed" and read_manifest(checkpoints[1]).version in gate["versions"]


def test_skew_check_runs_through_ray_job_submit(ray_head, ml_data, checkpoints, tmp_path):
    from tests.conftest import REPO
    from tests.integration.conftest import ray_cli

    p = ray_cli(
        "job", "submit", "--address", ray_head["dashboard"], "--working-dir", str(REPO), "--",
        "python", "-m", "jobs.skew_check", "--checkpoints", str(checkpoints[0]), str(checkpoints[1]),
        "--data", str(ml_data), "--registry", str(tmp_path),
        env=ray_head["env"], timeout=600,
    )  # fmt: skip
    assert "PASSED" in p.stdout and "succeeded" in p.stdout.lower()
    assert len(list((tmp_path / "skew" / "ml-two-tower").glob("*.json"))) == 1
