"""A model skewless did not train, with features unlike MovieLens (examples/shop), through the whole
path: package, validate, skew check, rebuild, serve over HTTP (table users, users sent as features,
/score with broadcast on and off, a sidecar item, malformed features), and a canary of its next version.
Every answer is checked against the same package run in-process."""

from __future__ import annotations

import secrets

import numpy as np
import pytest
import requests
import torch

from core.contract.towers import load_package
from core.storage.datasets import read_table
from core.storage.registry import Registry
from examples.shop import model as shop
from tests.integration.conftest import rebuild, run_module, serve_deploy, summary, wait_for

TOKEN = secrets.token_urlsafe(24)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
APPS = {"on": {"broadcast": True}, "off": {"broadcast": False}}


@pytest.fixture(scope="module")
def shop_world(ray_head, tmp_path_factory, serve_port):
    root = tmp_path_factory.mktemp("shop")
    pkg_a = shop.package(root / "packages", seed=0)
    pkg_b = shop.package(root / "packages", seed=0, perturb=0.01)  # its next version
    data = root / "data"
    shop.write_data(data, items=3000, n_users=200, parts=3, holdout_from=pkg_a)
    registry = root / "registry"
    v = run_module("jobs.validate_package", pkg_a, "--catalog", data / "catalog", "--users", data / "users")
    assert "SUMMARY" in v.stdout
    skew = run_module("jobs.skew_check", "--packages", pkg_a, pkg_b, "--data", data, "--registry", registry,
                      check=False)  # fmt: skip
    assert skew.returncode == 0, skew.stdout[-2000:] + skew.stderr[-2000:]
    build_a = summary(rebuild(ray_head, pkg_a, data / "catalog", registry, "--index", "flat"))["build_id"]
    token_file = root / "admin_token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    apps = [
        {"name": f"shop-{name}", "route_prefix": f"/shop-{name}", "import_path": "serve_app.app:build_app",
         "args": {"registry": str(registry), "poll_interval_s": 0.3, "batch_wait_timeout_s": 0.02,
                  "admin_token_file": str(token_file), **args},
         "deployments": [{"name": "Recommender", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}]}
        for name, args in APPS.items()
    ]  # fmt: skip
    base = serve_deploy(ray_head, serve_port, apps, root / "serve.json")

    def healthy():
        try:
            return all(requests.get(f"{base}/shop-{n}/healthz", timeout=5).status_code == 200 for n in APPS)
        except requests.RequestException:
            return False

    wait_for(healthy, 240, "the shop applications to report healthy", interval_s=1)
    return {"base": base, "registry": registry, "data": data, "a": load_package(pkg_a), "b": load_package(pkg_b),
            "pkg_b": pkg_b, "build_a": build_a, "catalog": read_table(data / "catalog"),
            "users": read_table(data / "users")}  # fmt: skip


def post(w, app: str, path: str, body: dict, **kw) -> requests.Response:
    return requests.post(f"{w['base']}/shop-{app}{path}", json=body, timeout=30, **kw)


def features(users, row: int) -> dict:
    return {c: users[c][row].as_py() for c in ("segment", "spend", "interests", "searches")}


def expected_top(m, w, user_row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The package in-process: the user's vector against every catalog item, exact."""
    u = m.user_vectors(w["users"].slice(user_row, 1))[0]
    scores = m.item_vectors(w["catalog"]) @ u
    order = np.argsort(-scores, kind="stable")[:k]
    return w["catalog"]["item_id"].to_numpy()[order], scores[order]


def assert_same_top(body: dict, ids: np.ndarray, scores: np.ndarray) -> None:
    np.testing.assert_allclose(body["scores"], scores, rtol=0, atol=1e-4)
    assert set(body["item_ids"]) == set(ids.tolist()) or np.allclose(
        body["scores"][-1], scores[-1], atol=1e-4
    )


def test_retrieve_for_table_users_and_users_sent_as_features_equals_the_package(shop_world):
    w = shop_world
    for row in (0, 7, 150):
        uid = int(w["users"]["user_id"][row].as_py())
        r = post(w, "on", "/retrieve", {"user_id": uid, "k": 10})
        assert r.status_code == 200, r.text
        assert r.json()["build_id"] == w["build_a"] and r.json()["user_source"] == "table"
        assert_same_top(r.json(), *expected_top(w["a"], w, row, 10))
        # a user the build never embedded, described by the same features: the same answer
        r = post(
            w, "off", "/retrieve", {"user_id": 10**12 + row, "features": features(w["users"], row), "k": 10}
        )
        assert r.status_code == 200, r.text
        assert r.json()["user_source"] == "features"
        assert_same_top(r.json(), *expected_top(w["a"], w, row, 10))


@pytest.mark.parametrize("app", ["on", "off"])
def test_score_equals_the_package_scorer_with_broadcast_on_and_off(shop_world, app):
    w, m = shop_world, shop_world["a"]
    rows = [3, 3, 9, 40]  # a repeated user: broadcast computes it once
    items = w["catalog"]["item_id"].to_numpy()[:60]
    item_x = torch.from_numpy(m.item_vectors(w["catalog"].slice(0, 60)))
    for row in rows:
        uid = int(w["users"]["user_id"][row].as_py())
        r = post(w, app, "/score", {"user_id": uid, "item_ids": items.tolist()})
        assert r.status_code == 200, r.text
        u = torch.from_numpy(m.user_vectors(w["users"].slice(row, 1))).expand(60, -1)
        np.testing.assert_allclose(r.json()["scores"], m.scores(u, item_x).numpy(), rtol=0, atol=1e-5)
    r = post(
        w, app, "/score", {"user_id": 10**12, "features": features(w["users"], 5), "item_ids": items.tolist()}
    )
    assert r.status_code == 200, r.text
    u = torch.from_numpy(m.user_vectors(w["users"].slice(5, 1))).expand(60, -1)
    np.testing.assert_allclose(r.json()["scores"], m.scores(u, item_x).numpy(), rtol=0, atol=1e-5)


def test_a_sidecar_item_with_the_models_features_is_served(shop_world):
    w = shop_world
    ids, _ = expected_top(w["a"], w, 0, 1)
    best = w["catalog"].filter(np.asarray(w["catalog"]["item_id"].to_numpy() == ids[0]))
    item = {c: best[c][0].as_py() for c in ("category", "price", "dense", "tokens")}
    new_id = 10**9 + 1
    r = post(w, "on", "/items", {"items": [{"item_id": new_id, **item}]}, headers=AUTH)
    assert r.status_code in (200, 202), r.text

    def served():
        uid = int(w["users"]["user_id"][0].as_py())
        body = post(w, "on", "/retrieve", {"user_id": uid, "k": 3}).json()
        return new_id in body.get("item_ids", []) and body

    body = wait_for(served, 30, "the sidecar item in the top-3 of the user whose top-1 it copies")
    assert body["sources"][body["item_ids"].index(new_id)] == "sidecar"
    r = requests.delete(f"{w['base']}/shop-on/items/{new_id}", headers=AUTH, timeout=30)
    assert r.status_code in (200, 202), r.text
    wait_for(lambda: not served(), 30, "the deleted sidecar item gone")  # the next tests see the base alone


@pytest.mark.parametrize(
    "bad,field",
    [
        ({"segment": shop.SEGMENTS}, "segment"),  # past its vocabulary
        ({"spend": "a lot"}, "spend"),
        ({"interests": [0.0] * (shop.DENSE - 1)}, "interests"),  # fixed length
        ({"searches": [1] * 9}, "searches"),  # ragged, longer than declared
    ],
)
def test_malformed_features_get_a_422_naming_the_field(shop_world, bad, field):
    w = shop_world
    body = {"user_id": 10**12, "features": {**features(w["users"], 1), **bad}, "k": 5}
    r = post(w, "on", "/retrieve", body)
    assert r.status_code == 422 and field in r.text, r.text
    item = {"item_id": 5, "category": 1, "price": 1.0, "dense": [0.0] * shop.DENSE, "tokens": [1] * 13}
    r = post(w, "on", "/items", {"items": [item]}, headers=AUTH)
    assert r.status_code == 422 and "tokens" in r.text, r.text


def test_its_next_version_as_a_canary_answers_each_user_from_one_build(shop_world, ray_head):
    w = shop_world
    b = summary(rebuild(ray_head, w["pkg_b"], w["data"] / "catalog", w["registry"], "--index", "flat"))
    assert b["published"] and b["comparison"]["passed"], b  # close to A: the gate lets it through
    run_module("jobs.registry", "--registry", w["registry"], "rollback")  # B committed, A live
    run_module("jobs.registry", "--registry", w["registry"], "canary", b["build_id"], "--percent", "50")

    def canary_up():
        v = requests.get(f"{w['base']}/shop-on/version", timeout=5).json()
        return (v.get("canary") or {}).get("build_id") == b["build_id"]

    wait_for(canary_up, 60, "the canary build on the replica")
    by_build = {w["build_a"]: w["a"], b["build_id"]: w["b"]}
    served: dict[int, str] = {}
    for row in range(0, 200, 5):
        uid = int(w["users"]["user_id"][row].as_py())
        body = post(w, "on", "/retrieve", {"user_id": uid, "k": 5}).json()
        assert body["build_id"] in by_build, body
        assert_same_top(body, *expected_top(by_build[body["build_id"]], w, row, 5))  # one build end to end
        served[row] = body["build_id"]
    assert set(served.values()) == set(by_build), served  # both builds serve a share of the users
    for row, build in list(served.items())[:10]:  # and each user stays on the build they were routed to
        uid = int(w["users"]["user_id"][row].as_py())
        assert post(w, "on", "/retrieve", {"user_id": uid, "k": 5}).json()["build_id"] == build
    run_module("jobs.registry", "--registry", w["registry"], "abort")
    assert Registry(w["registry"]).pointer().canary is None
