"""Serving through Serve's real HTTP proxy, deployed with `serve deploy` as users do.

Several applications share one registry: the main one (2 replicas, broadcast on), a per-row
reference (broadcast off), one per cap policy (cap of 2 unique users per batch) and a metered one.
A last one serves a build made without users (`--no-users`) from its own registry: by features only.
The builds run the MovieLens example's model packages: a user's features are its user tower's declared
columns (user_id, history), validated against the package and shown in /openapi.json.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from core.contract.package import read_manifest
from core.storage.datasets import read_table
from tests.integration.builds import current_build
from tests.integration.conftest import rebuild, run_module, serve_deploy, summary, wait_for

APPS = {
    "main": {"route": "/", "replicas": 2, "args": {"broadcast": True}},
    "perrow": {"route": "/perrow", "replicas": 1, "args": {"broadcast": False}},
    "split": {
        "route": "/split",
        "replicas": 1,
        "args": {"max_unique_users_per_batch": 2, "cap_policy": "split"},
    },
    "reject": {
        "route": "/reject",
        "replicas": 1,
        "args": {"max_unique_users_per_batch": 2, "cap_policy": "reject"},
    },
    "fallback": {
        "route": "/fallback",
        "replicas": 1,
        "args": {"max_unique_users_per_batch": 2, "cap_policy": "fallback"},
    },
    "metered": {"route": "/metered", "replicas": 1, "args": {}},
    "nousers": {"route": "/nousers", "replicas": 1, "args": {}, "registry": "nousers"},
}


@pytest.fixture(scope="module")
def serving(ray_head, ml_data, checkpoints, new_registry, registry_with_a, tmp_path_factory, serve_port):
    registry, build_a = registry_with_a("reg-serve")
    registries = {"nousers": new_registry("reg-nousers")}
    p = rebuild(ray_head, checkpoints[0], ml_data / "catalog", registries["nousers"], "--no-users")
    build_nu = summary(p)["build_id"]
    apps = [
        {
            "name": name,
            "route_prefix": spec["route"],
            "import_path": "serve_app.app:build_app",
            "args": {
                "registry": str(registries.get(spec.get("registry"), registry)),
                "poll_interval_s": 0.3,
                "batch_wait_timeout_s": 0.03,
                "max_candidates": 500,
                **spec["args"],
            },
            "deployments": [
                {
                    "name": "Recommender",
                    "num_replicas": spec["replicas"],
                    "ray_actor_options": {"num_cpus": 0.1},
                }
            ],
        }
        for name, spec in APPS.items()
    ]
    base = serve_deploy(ray_head, serve_port, apps, tmp_path_factory.mktemp("serve") / "serve.yaml")

    def all_healthy():
        try:
            return all(
                requests.get(f"{base}{s['route'].rstrip('/')}/healthz", timeout=5).status_code == 200
                for s in APPS.values()
            )
        except requests.RequestException:  # proxy not up yet, or the app still deploying
            return False

    wait_for(all_healthy, 240, "all Serve applications to report healthy", interval_s=1)
    catalog = read_table(ml_data / "catalog")["item_id"].to_numpy()
    users = read_table(ml_data / "users")
    return {"base": base, "registry": registry, "build_a": build_a, "items": catalog, "ready_at": time.monotonic(),
            "users": users["user_id"].to_numpy(), "histories": users["history"].to_pylist(),
            "nousers": {"registry": registries["nousers"], "build": build_nu}}  # fmt: skip


def url(serving, app, path):
    return f"{serving['base']}{APPS[app]['route'].rstrip('/')}{path}"


def post(serving, app, path, body, **kw):
    return requests.post(url(serving, app, path), json=body, timeout=30, **kw)


def test_score_and_retrieve_answer_on_the_movielens_build(serving, checkpoints):
    version = read_manifest(checkpoints[0]).version
    items = serving["items"][:20].tolist()
    r = post(serving, "main", "/score", {"user_id": int(serving["users"][0]), "item_ids": items})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (
        len(body["scores"]) == 20
        and body["build_id"] == serving["build_a"]
        and body["checkpoint_version"] == version
    )
    rows = [[int(serving["users"][i % 3]), it] for i, it in enumerate(items)]
    r = post(serving, "main", "/score", {"rows": rows})
    assert r.status_code == 200 and len(r.json()["scores"]) == 20

    r = post(serving, "main", "/retrieve", {"user_id": int(serving["users"][0]), "k": 10})
    assert r.status_code == 200, r.text
    got = r.json()
    assert len(got["item_ids"]) == 10 and set(got["item_ids"]) <= set(serving["items"].tolist())
    assert got["scores"] == sorted(got["scores"], reverse=True) and got["build_id"] == serving["build_a"]
    v = requests.get(url(serving, "main", "/version"), timeout=10).json()
    assert v["build_id"] == serving["build_a"] and v["checkpoint_version"] == version and v["since"]


def _random_requests(serving, rng, n):
    users = rng.choice(serving["users"], 5, replace=False)  # few users: repeats within and across requests
    out = []
    for k in range(n):
        items = rng.choice(serving["items"], int(rng.integers(1, 80))).tolist()
        if k % 2:
            out.append({"rows": [[int(rng.choice(users)), it] for it in items]})
        else:
            out.append({"user_id": int(rng.choice(users)), "item_ids": items})
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_broadcast_equals_per_row_on_concurrent_randomized_batches(serving, seed):
    reqs = _random_requests(serving, np.random.default_rng(seed), 40)
    with ThreadPoolExecutor(16) as pool:
        on = list(pool.map(lambda b: post(serving, "main", "/score", b), reqs))
        off = list(pool.map(lambda b: post(serving, "perrow", "/score", b), reqs))
    for a, b in zip(on, off, strict=True):
        assert a.status_code == b.status_code == 200, (a.text, b.text)
        assert np.max(np.abs(np.array(a.json()["scores"]) - np.array(b.json()["scores"]))) <= 1e-5


JSON = {"content-type": "application/json"}
BAD = {
    "malformed json": (dict(data="{not json", headers={"content-type": "application/json"}), 422, "json"),
    "wrong type": (dict(json={"user_id": "abc", "item_ids": [1]}), 422, "user_id"),
    "both forms": (dict(json={"user_id": 1, "item_ids": [1], "rows": [[1, 1]]}), 422, "not both"),
    "empty candidates": (dict(json={"user_id": 1, "item_ids": []}), 422, "item_ids"),
    "too many candidates": (dict(json={"user_id": 1, "item_ids": [1] * 501}), 413, "exceed the limit of 500"),
    "unknown user": (
        dict(json={"user_id": 987654321, "item_ids": [1]}),
        404,
        "unknown user_id(s) [987654321] in build",
    ),
    "unknown user, how to send features": (
        dict(json={"user_id": 987654321, "item_ids": [1]}),
        404,
        "send the user's `features` (user_id, history",
    ),
    "unknown item": (
        dict(json={"user_id": 1, "item_ids": [1, 424242424]}),
        404,
        "unknown item_id(s) [424242424]",
    ),
    # bodies that passed pydantic but not numpy (they answered 500):
    "user id 2^63": (
        dict(data='{"user_id": 9223372036854775808, "item_ids": [1]}', headers=JSON),
        422,
        "user_id",
    ),
    "item id 10^30": (
        dict(data='{"user_id": 1, "item_ids": [1, 1' + "0" * 30 + "]}", headers=JSON),
        422,
        "item_ids",
    ),
    "row id below int64": (dict(data='{"rows": [[-9223372036854775809, 1]]}', headers=JSON), 422, "rows"),
    "NaN user": (dict(data='{"user_id": NaN, "item_ids": [1]}', headers=JSON), 422, "user_id"),
    "Infinity item": (dict(data='{"user_id": 1, "item_ids": [Infinity]}', headers=JSON), 422, "item_ids"),
    # a string escape that decodes to a lone surrogate: the body is not valid unicode text
    "lone surrogate key": (
        dict(data='{"user_id": 1, "item_ids": [1], "\\ud800": 1}', headers=JSON),
        422,
        "unicode",
    ),
    "lone surrogate value": (
        dict(data='{"user_id": "\\udfff", "item_ids": [1]}', headers=JSON),
        422,
        "user_id",
    ),
    # user features, validated against the serving build's package: 422 naming the field
    "features not an object": (dict(json={"features": [1, 2], "item_ids": [1]}), 422, "features"),
    "features float id": (dict(json={"features": {"user_id": 1, "history": [1.5]}, "item_ids": [1]}), 422,
                          '"features", "history", 0'),
    "features past the vocab": (dict(json={"features": {"user_id": 1, "history": [-1]}, "item_ids": [1]}),
                                422, '"features", "history", 0'),
    "features history too long": (
        dict(json={"features": {"user_id": 1, "history": list(range(51))}, "item_ids": [1]}), 422,
        '"features", "history"'),
    "features missing a column": (dict(json={"features": {"user_id": 1}, "item_ids": [1]}), 422,
                                  '"features", "history"'),
    "features undeclared column": (
        dict(json={"features": {"user_id": 1, "history": [], "age": 3}, "item_ids": [1]}), 422,
        '"features", "age"'),
    "features NaN": (dict(data='{"features": {"user_id": 1, "history": [NaN]}, "item_ids": [1]}', headers=JSON),
                     422, '"features", "history", 0'),
    "features of another user": (
        dict(json={"user_id": 2, "features": {"user_id": 1, "history": []}, "item_ids": [1]}), 422,
        "differs from the request's user_id 2"),
}  # fmt: skip


def test_each_bad_input_gets_its_4xx_while_concurrent_good_requests_succeed(serving):
    good = {"user_id": int(serving["users"][3]), "item_ids": serving["items"][:30].tolist()}
    expected = post(serving, "perrow", "/score", good).json()["scores"]
    jobs = [("good", None)] * 12 + [(name, spec) for name, spec in BAD.items()] * 2
    np.random.default_rng(0).shuffle(jobs)

    def send(job):
        name, spec = job
        if spec is None:
            return name, post(serving, "main", "/score", good)
        return name, requests.post(url(serving, "main", "/score"), timeout=30, **spec[0])

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(send, jobs))
    for name, r in results:
        if name == "good":
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(r.json()["scores"], expected, atol=1e-5)
        else:
            _, status, fragment = BAD[name]
            assert r.status_code == status, (name, r.status_code, r.text)
            assert fragment.lower() in r.text.lower(), (name, r.text)


@pytest.mark.parametrize("path", ["/score", "/retrieve"])
def test_a_body_nested_100000_deep_gets_a_4xx_not_a_500(serving, path):
    # the JSON parser's RecursionError answered 500 on /score; FastAPI's own parsing of /retrieve gives 400
    deep = "[" * 100_000 + "]" * 100_000
    r = requests.post(url(serving, "main", path), data=deep, headers=JSON, timeout=30)
    assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
    if path == "/score":
        assert r.status_code == 422 and "nested too deeply" in r.text, r.text


def _distinct_user_burst(serving, app, n=10):
    users = serving["users"][10 : 10 + n]
    bodies = [
        {"user_id": int(u), "item_ids": serving["items"][i * 5 : i * 5 + 5].tolist()}
        for i, u in enumerate(users)
    ]
    start = threading.Barrier(n)

    def send(b):
        start.wait()
        return post(serving, app, "/score", b)

    with ThreadPoolExecutor(n) as pool:
        return bodies, list(pool.map(send, bodies))


@pytest.mark.parametrize("app", ["split", "fallback"])
def test_cap_split_and_fallback_answer_every_request_with_reference_scores(serving, app):
    for _ in range(5):  # batches form by timing; repeat until a burst lands in one batch past the cap
        bodies, res = _distinct_user_burst(serving, app)
        for b, r in zip(bodies, res, strict=True):
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(
                r.json()["scores"], post(serving, "perrow", "/score", b).json()["scores"], atol=1e-5
            )
        stats = requests.get(url(serving, app, "/stats"), timeout=10).json()
        if stats.get(f"cap_{app}", 0) >= 1:
            break
    assert stats.get(f"cap_{app}", 0) >= 1, stats
    if app == "split":
        assert stats["unique_users"] >= 10  # every user still looked up, in sub-batches of <= 2


def test_cap_reject_answers_429_with_a_reason_and_retry_after(serving):
    for _ in range(5):  # batches form by timing; retry until a burst lands in one batch
        _, res = _distinct_user_burst(serving, "reject")
        rejected = [r for r in res if r.status_code == 429]
        if rejected:
            break
    assert rejected, "no batch exceeded the cap of 2 unique users"
    assert all(r.status_code in (200, 429) for r in res)
    assert "unique-user cap 2" in rejected[0].text and rejected[0].headers.get("retry-after") == "1"


def _scrape(ray_head) -> str:
    return requests.get(ray_head["metrics"], timeout=10).text


def _metric_sum(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_endpoint_reports_custom_metrics_consistent_with_traffic(serving, ray_head):
    # 12 requests x 7 rows, all from 2 users: rows 84, at most 2 unique users per batch.
    users = serving["users"][20:22]
    bodies = [{"user_id": int(users[i % 2]), "item_ids": serving["items"][:7].tolist()} for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        assert all(
            r.status_code == 200 for r in pool.map(lambda b: post(serving, "metered", "/score", b), bodies)
        )

    def scraped():
        # Each replica exports on its own schedule: wait until every app's numbers have arrived.
        text = _scrape(ray_head)
        ready = (
            _metric_sum(text, "ray_skewless_scored_rows_total", application="metered") >= 84
            and _metric_sum(text, "ray_skewless_cap_events_total", application="reject", policy="reject") >= 1
            and _metric_sum(text, "ray_skewless_cap_events_total", application="split", policy="split") >= 1
        )
        return text if ready else None

    text = wait_for(scraped, 90, "the apps' custom metrics to reach the metrics endpoint", interval_s=2)
    rows = _metric_sum(text, "ray_skewless_scored_rows_total", application="metered")
    unique = _metric_sum(text, "ray_skewless_batch_unique_users_total", application="metered")
    lookups = _metric_sum(text, "ray_skewless_user_table_lookups_total", application="metered")
    assert rows == 84
    assert 2 <= unique == lookups < rows / 2  # deduplicated: each batch looks each user up once
    assert _metric_sum(text, "ray_skewless_cap_events_total", application="reject", policy="reject") >= 1
    assert _metric_sum(text, "ray_skewless_cap_events_total", application="split", policy="split") >= 1
    assert (
        _metric_sum(text, "ray_skewless_live_build", application="main", build_id=serving["build_a"]) == 2
    )  # 2 replicas
    assert "ray_serve_batch_execution_time_ms" in text or "serve_batch_execution_time_ms" in text


def test_swap_publish_then_rollback_under_load_fails_nothing(serving, ray_head, ml_data, checkpoints):
    registry, build_a = serving["registry"], serving["build_a"]
    body = {"user_id": int(serving["users"][1]), "item_ids": serving["items"][:50].tolist()}
    seen, failures, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            r = post(serving, "main", "/score", body)
            if r.status_code != 200:
                failures.append((r.status_code, r.text))
            else:
                seen.append(r.json()["build_id"])

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        build_b = summary(rebuild(ray_head, checkpoints[1], ml_data / "catalog", registry))["build_id"]
        serving["build_b"] = build_b  # committed, A live again below: the canary test ramps it in
        wait_for(lambda: build_b in seen[-20:], 60, "responses from the new build")
        run_module("jobs.registry", "--registry", registry, "rollback")
        assert current_build(registry) == build_a
        n_before = len(seen)
        wait_for(
            lambda: len(seen) > n_before + 50 and set(seen[-40:]) == {build_a},
            60,
            "responses from the rolled-back build",
        )
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert set(seen) == {build_a, build_b} and len(seen) > 100
    replicas = {}
    for _ in range(60):  # reach every replica of the main app
        v = requests.get(url(serving, "main", "/version"), timeout=10).json()
        replicas[v["replica"]] = v["build_id"]
        if len(replicas) == APPS["main"]["replicas"]:
            break
    assert len(replicas) == 2 and set(replicas.values()) == {build_a}


def test_retrieve_refuses_non_finite_k_and_ids_beyond_int64_with_a_4xx(serving):
    for data, field in (
        ('{"user_id": 1, "k": Infinity}', "k"),
        ('{"user_id": 1, "k": NaN}', "k"),
        ('{"user_id": 18446744073709551616, "k": 3}', "user_id"),
        ('{"features": {"user_id": 1, "history": [1e400]}, "k": 3}', "history"),
        ('{"features": {"user_id": 1.5, "history": []}, "k": 3}', "user_id"),
    ):
        r = requests.post(url(serving, "main", "/retrieve"), data=data, headers=JSON, timeout=10)
        assert r.status_code == 422 and field in r.text, (data, r.status_code, r.text)
    for path in ("/items/9223372036854775808", "/items/-99999999999999999999"):
        r = requests.get(url(serving, "main", path), timeout=10)
        assert r.status_code == 422, (path, r.status_code, r.text)


def _features_reference(registry, build_id, user_id, history, items):
    """What the build's own towers give for these features, computed in-process from the published
    artifacts."""
    import torch

    from core.contract.encode import rows_table
    from core.serving.live_build import load_build
    from core.storage.registry import Registry

    b = load_build(Registry(registry).build_dir(build_id))
    u = b.feature_vectors(rows_table([{"user_id": user_id, "history": history}], b.model.user_inputs, {}))
    rows, missing = b.item_rows(np.asarray(items, np.int64))
    assert not missing.any()
    with torch.inference_mode():
        scores = b.model.scores(
            torch.from_numpy(np.repeat(u, len(items), 0)), torch.from_numpy(np.asarray(b.item_emb[rows]))
        )
    return b, u[0], scores.numpy()


def test_a_build_without_users_is_served_by_features_over_http(serving):
    nu = serving["nousers"]
    history = [int(i) for i in serving["items"][[5, 17, 42, 99]]] + [987654321]  # any id: hashed
    features = {"user_id": 0, "history": history}
    items = serving["items"][200:230].tolist()
    r = post(serving, "nousers", "/retrieve", {"features": features, "k": 10})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["build_id"] == nu["build"] and got["user_source"] == "features"
    b, u, ref_scores = _features_reference(nu["registry"], nu["build"], 0, history, items)
    assert not b.manifest.has_users and b.manifest.quality["queries"]["source"] == "item_mixtures"
    ids, scores = b.search(u[None, :], 10)  # the same index, search setting and query tower, in-process
    assert got["item_ids"] == ids[0].tolist()
    np.testing.assert_allclose(got["scores"], scores[0], atol=1e-4)
    r = post(serving, "nousers", "/score", {"features": features, "item_ids": items})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["scores"], ref_scores, atol=1e-4)
    r = post(serving, "nousers", "/retrieve", {"user_id": int(serving["users"][0]), "k": 5})
    assert r.status_code == 404 and "send the user's `features` (user_id, history" in r.text
    r = post(
        serving, "nousers", "/score", {"features": {"user_id": 0, "history": [2**62]}, "item_ids": items}
    )
    assert r.status_code == 422 and '"features", "history", 0' in r.text and "less than" in r.text


def test_a_user_missing_from_the_table_is_scored_by_features_in_a_batch_with_table_users(serving):
    new_user = 10**12  # not in the build's user table
    history = [int(i) for i in serving["items"][[1, 2, 3]]]
    items = serving["items"][:40].tolist()
    known = {"user_id": int(serving["users"][4]), "item_ids": items}
    by_features = {
        "user_id": new_user,
        "features": {"user_id": new_user, "history": history},
        "item_ids": items,
    }
    bad = {"features": {"user_id": 5, "history": [-3]}, "item_ids": items}  # fails alone, never its batch
    bodies = [by_features, known, bad] * 6
    with ThreadPoolExecutor(len(bodies)) as pool:
        res = list(pool.map(lambda b: post(serving, "main", "/score", b), bodies))
    assert all(r.status_code == 200 for r in res[0::3] + res[1::3]), [
        r.text for r in res if r.status_code != 200
    ]
    assert all(r.status_code == 422 and "history" in r.text for r in res[2::3])
    _, _, ref = _features_reference(serving["registry"], serving["build_a"], new_user, history, items)
    for r in res[0::3]:
        np.testing.assert_allclose(r.json()["scores"], ref, atol=1e-4)
    expected_known = post(serving, "perrow", "/score", known).json()["scores"]
    for r in res[1::3]:
        np.testing.assert_allclose(r.json()["scores"], expected_known, atol=1e-5)
    # a table user sending its own features is embedded from them instead of its table row
    u = int(serving["users"][4])
    own = serving["histories"][4]
    r = post(serving, "main", "/retrieve", {"user_id": u, "features": {"user_id": u, "history": own}, "k": 5})
    assert r.status_code == 200 and r.json()["user_source"] == "features", r.text


def test_openapi_shows_the_live_builds_declared_inputs(serving):
    doc = requests.get(url(serving, "main", "/openapi.json"), timeout=10).json()
    schemas = doc["components"]["schemas"]
    user = schemas["UserFeatures"]
    assert user["required"] == ["user_id", "history"] and user["additionalProperties"] is False
    assert user["properties"]["history"]["maxItems"] == 50 and serving["build_a"]  # the package's history_len
    assert set(schemas["Item"]["properties"]) == {
        "item_id",
        "genre_ids",
        "year_slot",
        "title_tokens",
        "tag_tokens",
    }
    ref = "#/components/schemas/UserFeatures"
    assert schemas["RetrieveBody"]["properties"]["features"]["anyOf"][0]["$ref"] == ref
    score = doc["paths"]["/score"]["post"]["requestBody"]["content"]
    assert score["application/json"]["schema"]["properties"]["features"]["anyOf"][0]["$ref"] == ref
    assert "application/vnd.apache.arrow.stream" in score
    assert schemas["ItemsBody"]["properties"]["items"]["items"]["$ref"] == "#/components/schemas/Item"


def test_state_gauges_stay_on_the_dashboard_long_after_they_were_set(serving, ray_head, checkpoints):
    # Ray's metrics agent drops a gauge series that is not set again within two export intervals: these
    # were gone for good ~20 s after they were set. Now every replica re-sets them at each poll, so they
    # are there in every window, long after the swap (one scrape may still land on an export the agent
    # received late on a loaded machine: each window waits up to 30 s for a complete scrape).
    time.sleep(max(0.0, serving["ready_at"] + 35 - time.monotonic()))
    build_a, version_a = serving["build_a"], read_manifest(checkpoints[0]).version

    def complete():
        text = _scrape(ray_head)
        live = _metric_sum(text, "ray_skewless_live_build", application="main", build_id=build_a)
        # checkpoint A is in the family's passed skew check
        passed = _metric_sum(
            text, "ray_skewless_skew_check_passed", application="main", checkpoint_version=version_a
        )
        age = [float(x.rsplit(" ", 1)[1]) for x in text.splitlines()
               if x.startswith("ray_skewless_live_build_age_seconds{") and 'application="main"' in x
               and f'build_id="{build_a}"' in x]  # fmt: skip
        ok = live == 2 and passed == 2 and len(age) == 2 and all(0 < a < 3600 for a in age)
        return ok and "ray_skewless_sidecar_items{" in text

    for window in range(3):
        if window:
            time.sleep(10)
        wait_for(complete, 30, f"the state gauges of both replicas in scrape window {window}", interval_s=1)


def test_fuzzed_requests_from_the_apps_own_openapi_never_get_a_5xx(serving):
    """Every operation of /openapi.json, bodies generated to its schema and against it (bounded)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(url(serving, "main", "/openapi.json"))
    base = url(serving, "main", "")
    failures, calls = [], []

    def fuzz(op, mode):
        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def run(data):
            case = data.draw(op.as_strategy(generation_mode=mode))
            resp = case.call(base_url=base, timeout=30)
            calls.append(resp.status_code)
            if resp.status_code >= 500 and not (resp.status_code == 503 and resp.headers.get("retry-after")):
                failures.append((op.label, mode.value, case.body, resp.status_code, resp.text[:300]))

        try:
            run()
        except Unsatisfiable:  # e.g. no invalid request exists for a route without parameters
            assert mode == GenerationMode.NEGATIVE, op.label

    for result in schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(result.ok(), mode)
    assert failures == [], failures[:5]
    assert len(calls) >= 100 and any(400 <= c < 500 for c in calls)  # it really sent requests, bad ones too


def _replicas_report(serving, want) -> bool:
    """True once every replica of the main app answers /version with `want(version)`."""
    seen = {}
    for _ in range(40):
        v = requests.get(url(serving, "main", "/version"), timeout=10).json()
        seen[v["replica"]] = want(v)
        if len(seen) == APPS["main"]["replicas"]:
            break
    return len(seen) == APPS["main"]["replicas"] and all(seen.values())


def test_canary_routes_a_stable_share_of_users_under_load_then_abort_and_promote(
    ray_head, serving, ml_data, checkpoints
):
    from core.serving import canary
    from core.serving.live_build import load_build
    from core.storage.registry import Registry

    registry, build_a = serving["registry"], serving["build_a"]
    build_b = serving.get("build_b")  # package B's build, committed by the swap test
    if build_b is None:  # this test alone
        build_b = summary(rebuild(ray_head, checkpoints[1], ml_data / "catalog", registry))["build_id"]
        run_module("jobs.registry", "--registry", registry, "rollback")  # B committed, A live
    users = [int(u) for u in serving["users"]]
    log, failures, stop = [], [], threading.Event()  # log: (t, user, build, replica, item_ids)

    def client(seed: int):
        rng = np.random.default_rng(seed)
        s = requests.Session()
        while not stop.is_set():
            u = users[rng.integers(len(users))]
            try:
                r = s.post(url(serving, "main", "/retrieve"), json={"user_id": u, "k": 10}, timeout=30)
            except requests.RequestException as e:
                failures.append(repr(e))
                continue
            if r.status_code != 200:
                failures.append((r.status_code, r.text[:200]))
                continue
            b = r.json()
            assert b["build_id"] == r.headers["x-skewless-build"]
            log.append((time.monotonic(), u, b["build_id"], r.headers["x-skewless-replica"], b["item_ids"]))

    def window(seconds: float, users: int = 0) -> list:
        """What was answered from now on: `seconds` of it, or until `users` distinct users (at most 60 s),
        so a slower machine still sees enough users for the share to mean something."""
        t0 = time.monotonic()
        time.sleep(seconds)
        while len({x[1] for x in log if x[0] >= t0}) <= users and time.monotonic() - t0 < 60:
            time.sleep(0.5)
        return [x for x in log if x[0] >= t0]

    def registry_cmd(*args):
        print(run_module("jobs.registry", "--registry", registry, *args).stdout.strip())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        registry_cmd("canary", build_b, "--percent", "10")
        wait_for(lambda: _replicas_report(serving, lambda v: (v["canary"] or {}).get("percent") == 10.0), 60,
                 "both replicas to serve the canary")  # fmt: skip
        during = window(12, users=450)
        registry_cmd("abort")
        wait_for(lambda: _replicas_report(serving, lambda v: v["canary"] is None), 60, "the canary to end")
        aborted = window(4)
        registry_cmd("canary", build_b, "--percent", "10")
        wait_for(lambda: _replicas_report(serving, lambda v: v["canary"] is not None), 60, "the canary again")
        registry_cmd("promote")
        wait_for(lambda: _replicas_report(serving, lambda v: v["build_id"] == build_b and v["canary"] is None),
                 60, "the promoted build on every replica")  # fmt: skip
        promoted = window(4)
    finally:
        stop.set()
        for t in threads:
            t.join()
        registry_cmd("rollback")  # A live again for the tests that follow
    assert failures == []
    by_user: dict[int, set] = {}
    for _, u, b, _, _ in during:
        by_user.setdefault(u, set()).add(b)
    assert all(len(b) == 1 for b in by_user.values()), "a user was served by both builds"
    in_canary = {u for u, b in by_user.items() if b == {build_b}}
    assert in_canary == {u for u in by_user if canary.in_canary(u, build_b, 10)}  # the stable hash decides
    share = len(in_canary) / len(by_user)
    assert len(by_user) > 400 and 0.07 <= share <= 0.13, (len(by_user), share)
    assert len({x[3] for x in during}) == 2  # both replicas answered, with the same routing
    reg = Registry(registry)
    builds = {b: load_build(reg.build_dir(b)) for b in (build_a, build_b)}
    for _, u, b, _, ids in during[:: max(1, len(during) // 40)]:  # each answer wholly from the build it names
        rows, _ = builds[b].user_rows(np.array([u]))
        assert ids == builds[b].retrieve(rows, 10)[0][0].tolist()
    assert aborted and {x[2] for x in aborted} == {build_a}
    assert promoted and {x[2] for x in promoted} == {build_b}

    def by_build():  # the request metrics carry the build that served them (exported every few seconds)
        text = requests.get(ray_head["metrics"], timeout=10).text
        return any(x.startswith("ray_skewless_request_latency_ms") and f'build_id="{build_b}"' in x
                   for x in text.splitlines())  # fmt: skip

    wait_for(by_build, 60, "request latency labelled by the canary build")
