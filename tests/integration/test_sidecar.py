"""The fresh-item sidecar through real HTTP: upsert, retrieve within a second, delete, survive replica
restarts, and move to the next build re-embedded by its checkpoint."""

from __future__ import annotations

import time

import numpy as np
import pyarrow.compute as pc
import pytest
import requests

from core.checkpoint import read_manifest
from core.datasets import read_table
from core.live_build import load_build
from core.registry import Registry
from core.sidecar import embed_items
from tests.integration.conftest import rebuild, serve_deploy, summary, wait_for

FRESH_ID = 9_000_001


def _app(registry, max_k: int = 1000) -> dict:
    return {
        "name": "sidecar",
        "route_prefix": "/",
        "import_path": "serve_app.app:build_app",
        "args": {"registry": str(registry), "poll_interval_s": 0.2, "max_sidecar_items": 5, "max_k": max_k},
        "deployments": [{"name": "Recommender", "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.1}}],
    }


@pytest.fixture(scope="module")
def app(ray_head, ml_data, checkpoints, new_registry, serve_port, tmp_path_factory):
    registry = new_registry("reg-sidecar")
    build_a = summary(rebuild(ray_head, checkpoints[0], ml_data / "catalog", registry))["build_id"]
    cfg = tmp_path_factory.mktemp("serve-sidecar") / "serve.yaml"
    base = serve_deploy(ray_head, serve_port, [_app(registry)], cfg)

    def healthy():
        try:
            return requests.get(f"{base}/healthz", timeout=5).json().get("build_id") == build_a
        except (requests.RequestException, ValueError):
            return False

    wait_for(healthy, 240, "the sidecar app on build A", interval_s=1)
    catalog = read_table(ml_data / "catalog")
    return {"base": base, "registry": registry, "build_a": build_a, "catalog": catalog, "cfg": cfg, "ray_head": ray_head, "port": serve_port,
            "users": read_table(ml_data / "users")["user_id"].to_pylist()}  # fmt: skip


def _retrieve(app, user, k=50):
    r = requests.post(f"{app['base']}/retrieve", json={"user_id": user, "k": k}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _relevant_user(app, item: dict) -> int:
    """The user for whom this item ranks highest against the base catalog (by the live build's own
    towers): a user whose history makes it relevant."""
    b = load_build(Registry(app["registry"]).build_dir(app["build_a"]))
    v = embed_items(b, [item])[0]
    u = np.asarray(b.user_emb)  # (U, D)
    rank = ((u @ np.asarray(b.item_emb).T) > (u @ v)[:, None]).sum(axis=1)  # base items scoring above it
    return int(b.user_ids[int(np.argmin(rank))])


def _twin_of_top_item(app, user) -> dict:
    """A new item with the same features as this user's current top result: relevant to them."""
    top = _retrieve(app, user, k=1)["item_ids"][0]
    row = app["catalog"].filter(pc.equal(app["catalog"]["item_id"], top)).to_pylist()[0]
    return {
        "item_id": FRESH_ID,
        "title": row["title"],
        "genres": row["genres"],
        "year": row["year"],
        "tags": row["tags"],
    }


def _all_replicas(app, path, n=2, tries=60):
    seen = {}
    for _ in range(tries):
        r = requests.get(f"{app['base']}{path}", timeout=10)
        v = requests.get(f"{app['base']}/version", timeout=10).json()
        seen[v["replica"]] = r
        if len(seen) == n:
            break
    return seen


def test_upsert_is_retrieved_within_a_second_then_delete_removes_it(app):
    item = _twin_of_top_item(app, app["users"][0])
    user = _relevant_user(app, item)
    r = requests.post(f"{app['base']}/items", json={"items": [item]}, timeout=10)
    assert r.status_code == 200, r.text
    t0 = time.monotonic()
    wait_for(
        lambda: all(FRESH_ID in _retrieve(app, user)["item_ids"] for _ in range(6)),
        1.0,
        "the fresh item on every replica",
        interval_s=0.05,
    )
    assert time.monotonic() - t0 < 1.0
    got = _retrieve(app, user)
    assert got["sources"][got["item_ids"].index(FRESH_ID)] == "sidecar" and got["build_id"] == app["build_a"]

    r = requests.delete(f"{app['base']}/items/{FRESH_ID}", timeout=10)
    assert r.status_code == 200, r.text
    wait_for(
        lambda: all(FRESH_ID not in _retrieve(app, user)["item_ids"] for _ in range(6)),
        1.0,
        "the deleted item to vanish",
        interval_s=0.05,
    )


def test_bad_items_and_a_full_sidecar_get_clear_errors(app):
    r = requests.post(f"{app['base']}/items", json={"items": [{"item_id": "x", "title": "t"}]}, timeout=10)
    assert r.status_code == 422 and "item_id" in r.text
    r = requests.post(f"{app['base']}/items", json={"items": []}, timeout=10)
    assert r.status_code == 422
    many = [{"item_id": 9_100_000 + i, "title": f"filler {i}"} for i in range(6)]
    r = requests.post(f"{app['base']}/items", json={"items": many}, timeout=10)
    assert r.status_code == 507 and "sidecar is full" in r.text and "of 5 items" in r.text


def test_replica_restart_keeps_the_sidecar(app):
    item = _twin_of_top_item(app, app["users"][1]) | {"item_id": FRESH_ID + 1}
    assert requests.post(f"{app['base']}/items", json={"items": [item]}, timeout=10).status_code == 200
    before = {r.json()["replica"] for r in _all_replicas(app, "/version").values()}
    # A changed argument makes Serve replace every replica: new processes that start from the log.
    serve_deploy(app["ray_head"], app["port"], [_app(app["registry"], max_k=1001)], app["cfg"])

    def replaced():
        now = {r.json()["replica"] for r in _all_replicas(app, "/version").values()}
        return len(now) == 2 and not (now & before)

    wait_for(replaced, 180, "both replicas to be replaced", interval_s=1)
    for r in _all_replicas(app, f"/items/{FRESH_ID + 1}").values():
        assert r.status_code == 200 and r.json()["source"] == "sidecar", r.text


def test_swap_re_embeds_sidecar_items_with_the_new_checkpoint(app, ray_head, ml_data, checkpoints):
    item = _twin_of_top_item(app, app["users"][2]) | {"item_id": FRESH_ID + 2}
    assert requests.post(f"{app['base']}/items", json={"items": [item]}, timeout=10).status_code == 200
    version_b = read_manifest(checkpoints[1])["version"]
    build_b = summary(rebuild(ray_head, checkpoints[1], ml_data / "catalog", app["registry"]))["build_id"]
    wait_for(
        lambda: {r.json()["build_id"] for r in _all_replicas(app, "/version").values()} == {build_b},
        60,
        "every replica on build B",
    )
    for r in _all_replicas(app, f"/items/{FRESH_ID + 2}").values():
        assert r.status_code == 200, r.text
        assert r.json() == {
            "item_id": FRESH_ID + 2,
            "build_id": build_b,
            "embedded_by": version_b,
            "source": "sidecar",
        }
    got = _retrieve(app, app["users"][2], k=1000)
    assert got["checkpoint_version"] == version_b and FRESH_ID + 2 in got["item_ids"]
