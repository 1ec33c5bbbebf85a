"""The whole path on object storage, against a real S3-compatible server (tests/s3server.py; the
Ray head and every worker get its endpoint and credentials from their environment, as cluster nodes
get theirs): data prepared into the bucket and model packages uploaded to it, two rebuilds that read
the package and the catalog from it and write their builds to it, Serve replicas that follow the
bucket's CURRENT and serve /retrieve and /score from verified cached copies, a sidecar write that a
replica started after it reads from the bucket's segment log, a rollback, gc, and a rebuild killed
during its upload, then resumed on another node from the parts in the bucket. The jobs and the Ray processes keep separate node caches, so the replicas fetch and verify
each build from the bucket as they would on another node."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import requests

from core.storage.registry import Registry
from core.storage.store import CREATE, open_store
from tests.integration.conftest import run_module, serve_deploy, summary, wait_for

BUCKET = "s3://skewless/e2e"
TOKEN = secrets.token_urlsafe(24)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FRESH_ID = 9_100_001
ITEM = {"item_id": FRESH_ID, "genre_ids": [1, 3], "year_slot": 40, "title_tokens": [5, 9], "tag_tokens": []}


@pytest.fixture(scope="module")
def on_s3(s3, ray_head, movielens_dir, checkpoints, skew_results, serve_port, tmp_path_factory):
    env = ray_head["env"]
    # the same data the packages were trained on, prepared straight into the bucket
    run_module("examples.movielens.prepare", "movielens", "--movielens", movielens_dir, "--out", f"{BUCKET}/data",
               "--partitions", "8", env=env)  # fmt: skip
    packages = [f"{BUCKET}/packages/{c.name}" for c in checkpoints]
    for local, url in zip(checkpoints, packages, strict=True):
        run_module("jobs.upload", local, url, env=env)
    registry = f"{BUCKET}/registry"
    store = open_store(registry)
    for f in sorted(Path(skew_results).rglob("*.json")):  # the family's passed skew check, as verdict objects
        store.put(f"skew/{f.relative_to(skew_results).as_posix()}", f.read_bytes(), mode=CREATE)
    catalog = f"{BUCKET}/data/catalog"
    job_env = {
        **env,
        "SKEWLESS_CACHE_DIR": str(tmp_path_factory.mktemp("job-cache")),
    }  # the driver's own cache
    builds = []
    for package, extra in ((packages[0], ()), (packages[1], ("--force",))):
        p = run_module("jobs.rebuild_index", "--package", package, "--catalog", catalog, "--registry", registry,
                       "--address", ray_head["gcs"], "--index", "flat", *extra, env=job_env)  # fmt: skip
        builds.append(summary(p))
    token_file = tmp_path_factory.mktemp("secret-s3") / "admin_token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    app = {"name": "s3", "route_prefix": "/", "import_path": "serve_app.app:build_app",
           "args": {"registry": registry, "poll_interval_s": 0.2, "max_sidecar_items": 5, "admin_token_file": str(token_file)},
           "deployments": [{"name": "Recommender", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}]}  # fmt: skip
    cfg = tmp_path_factory.mktemp("serve-s3") / "serve.json"
    base = serve_deploy(ray_head, serve_port, [app], cfg)
    return {"base": base, "registry": registry, "builds": builds, "env": env, "job_env": job_env, "app": app,
            "cfg": cfg, "ray_head": ray_head, "port": serve_port, "packages": packages, "gcs": ray_head["gcs"]}  # fmt: skip


def _live_on_every_replica(base: str, build_id: str) -> bool:
    try:
        return all(
            requests.get(f"{base}/healthz", timeout=5).json().get("build_id") == build_id for _ in range(6)
        )
    except (requests.RequestException, ValueError):
        return False


def test_rebuilds_read_the_bucket_and_publish_to_it(on_s3):
    a, b = on_s3["builds"]
    reg = Registry(on_s3["registry"])
    assert reg.current() == b["build_id"] and reg.list_builds() == sorted([a["build_id"], b["build_id"]])
    m = reg.manifest(b["build_id"])
    assert m.catalog.path.startswith(f"{BUCKET}/data/catalog")  # read in place, not copied
    assert m.files and all(meta["sha256"] for meta in m.files.values())  # what replicas verify against
    assert a["checkpoint_version"] != b["checkpoint_version"]
    assert list(reg.store.list("staging/")) == []  # each rebuild's parts, staged in the bucket, are gone


def test_a_replica_serves_the_bucket_build_and_one_started_after_a_sidecar_write_reads_it(on_s3):
    base, b = on_s3["base"], on_s3["builds"][1]
    wait_for(lambda: _live_on_every_replica(base, b["build_id"]), 240, "the replica on the bucket's build")
    r = requests.post(f"{base}/retrieve", json={"user_id": 1, "k": 10}, timeout=10)
    assert r.status_code == 200 and r.json()["build_id"] == b["build_id"] and len(r.json()["item_ids"]) == 10
    items = r.json()["item_ids"]
    r = requests.post(f"{base}/score", json={"user_id": 1, "item_ids": items}, timeout=10)
    assert r.status_code == 200 and len(r.json()["scores"]) == 10, r.text
    r = requests.post(f"{base}/items", json={"items": [ITEM]}, headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    assert open_store(on_s3["registry"]).exists("sidecar/HEAD")
    # a second replica, started after the write: it loads the build and the log from the bucket
    on_s3["app"]["deployments"][0]["num_replicas"] = 2
    serve_deploy(on_s3["ray_head"], on_s3["port"], [on_s3["app"]], on_s3["cfg"])
    seen: dict[str, int] = {}

    def both_replicas_have_it() -> bool:  # GET /items/{id} answers from the replica's own view of the log
        got = requests.get(f"{base}/items/{FRESH_ID}", timeout=10)
        seen[requests.get(f"{base}/version", timeout=10).json()["replica"]] = got.status_code
        return len(seen) == 2 and set(seen.values()) == {200}

    wait_for(both_replicas_have_it, 240, "the fresh item on the new replica too, read from the bucket's log")


def test_rollback_and_gc_on_the_bucket(on_s3):
    a, b = on_s3["builds"]
    reg = f"--registry={on_s3['registry']}"
    out = run_module("jobs.registry", reg, "rollback", env=on_s3["env"]).stdout
    assert f"{b['build_id']} -> {a['build_id']}" in out
    wait_for(
        lambda: _live_on_every_replica(on_s3["base"], a["build_id"]), 60, "both replicas back on build A"
    )
    out = run_module(
        "jobs.registry", reg, "gc", "--rollback-window=0", "--keep-extra=0", env=on_s3["env"]
    ).stdout
    assert b["build_id"] in out  # neither live nor a rollback target of A
    assert Registry(on_s3["registry"]).list_builds() == [a["build_id"]]


def test_a_rebuild_killed_during_its_upload_leaves_current_on_a_complete_build(on_s3, tmp_path):
    """SIGKILL after the second file of the build went up: CURRENT and the build list are as before,
    what was uploaded is no build to any reader; another node resumes it, reusing every part the
    bucket holds, and publishes it. (gc of such uploads: test_object_store.py)"""
    reg = Registry(on_s3["registry"], cache=tmp_path / "reader")
    before = (reg.pointer(), reg.list_builds())
    p = run_module("tests.integration.crash_rebuild", "file_uploaded#2", "--", "--package", on_s3["packages"][1],
                   "--catalog", f"{BUCKET}/data/catalog", "--registry", on_s3["registry"], "--address", on_s3["gcs"],
                   "--force", "--index", "flat", env=on_s3["job_env"], check=False)  # fmt: skip
    assert p.returncode == -9 and p.stdout.count("phase file_uploaded") == 2, p.stdout[-3000:]
    assert (reg.pointer(), reg.list_builds()) == before
    killed = {k.split("/")[1] for k, _ in reg.store.list("builds/")} - set(before[1])
    assert len(killed) == 1  # its objects are there, without a manifest
    staged = {k.split("/")[1] for k, _ in reg.store.list("staging/")}
    assert staged == killed  # its parts stay in the bucket for --resume (gc removes them once stale)
    # another node (its own cache: no staging directory of this build there) resumes it from the bucket
    build_id = killed.pop()
    other = {**on_s3["job_env"], "SKEWLESS_CACHE_DIR": str(tmp_path / "other-node")}
    s = summary(run_module("jobs.rebuild_index", "--package", on_s3["packages"][1], "--catalog", f"{BUCKET}/data/catalog",
                           "--registry", on_s3["registry"], "--address", on_s3["gcs"], "--force", "--resume", build_id,
                           "--index", "flat", env=other))  # fmt: skip
    assert s["build_id"] == build_id == reg.current()
    assert (
        s["parts"]["embedded"] == 0 and s["parts"]["reused"] == s["parts"]["items"] + s["parts"]["users"] > 0
    )
    assert list(reg.store.list("staging/")) == []
