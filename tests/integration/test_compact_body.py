"""POST /score with the compact Arrow body, through Serve's real HTTP ingress (either mode); behind the
fast ingress, a sharded build too.

One application, one replica, a long batch wait and a batch size of 8: eight concurrent requests, Arrow
and JSON, land in ONE batch (the replica's /stats counts it), so the test sees both forms share a batch
and a bad request among them fail alone.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from core.serving.broadcast import BroadcastConfig, ScoreRequest, score_batch
from core.serving.compact_body import ARROW_STREAM, encode_rows
from core.serving.live_build import load_build
from core.storage.datasets import read_table
from core.storage.registry import Registry
from tests.integration.conftest import rebuild, serve_deploy, summary, wait_for

ARROW = {"content-type": ARROW_STREAM}


@pytest.fixture(scope="module")
def app(ray_head, ml_data, checkpoints, registry_with_a, tmp_path_factory, serve_port):
    registry, build = registry_with_a("reg-compact")
    spec = {
        "name": "compact",
        "route_prefix": "/c",
        "import_path": "serve_app.app:build_app",
        "args": {"registry": str(registry), "max_batch_size": 8, "batch_wait_timeout_s": 2.0,
                 "max_candidates": 500},
        "deployments": [{"name": "Recommender", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}],
    }  # fmt: skip
    base = serve_deploy(ray_head, serve_port, [spec], tmp_path_factory.mktemp("serve") / "serve.yaml") + "/c"

    _wait_healthy(base, "the compact-body app")
    users = read_table(ml_data / "users")["user_id"].to_numpy()
    return {"base": base, "build": build, "users": users, "items": read_table(ml_data / "catalog")["item_id"].to_numpy()}  # fmt: skip


def _wait_healthy(base: str, what: str) -> None:
    def healthy():
        try:
            return requests.get(f"{base}/healthz", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    wait_for(healthy, 240, f"{what} to report healthy", interval_s=1)


def _rows(app, rng, n):
    return rng.choice(app["users"][:5], n), rng.choice(app["items"], n)


def _json(users, items):
    return {"rows": [[int(u), int(i)] for u, i in zip(users, items, strict=True)]}


def test_arrow_rows_score_as_the_same_json_rows(app):
    users, items = _rows(app, np.random.default_rng(0), 40)
    a = requests.post(f"{app['base']}/score", data=encode_rows(users, items), headers=ARROW, timeout=30)
    j = requests.post(f"{app['base']}/score", json=_json(users, items), timeout=30)
    assert a.status_code == j.status_code == 200, (a.text, j.text)
    assert a.json()["build_id"] == app["build"] and len(a.json()["scores"]) == 40
    np.testing.assert_allclose(a.json()["scores"], j.json()["scores"], atol=1e-5)


def _arrow_table(columns: dict) -> bytes:
    import pyarrow as pa

    t = pa.table(columns)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    return sink.getvalue().to_pybytes()


def test_malformed_arrow_bodies_get_a_4xx_naming_what_is_wrong(app):
    import pyarrow as pa

    good = encode_rows([1, 2], [1, 2])
    cases = {
        "empty": (b"", 422, "empty body"),
        "not arrow": (b'{"rows": [[1, 1]]}', 422, "not a readable arrow ipc stream"),
        "truncated": (good[: len(good) // 2], 422, "not a readable arrow ipc stream"),
        "missing column": (
            _arrow_table({"user_id": pa.array([1], pa.int64())}),
            422,
            "expected exactly the columns",
        ),
        "extra column": (
            _arrow_table(
                {
                    "user_id": pa.array([1], pa.int64()),
                    "item_id": pa.array([1], pa.int64()),
                    "x": pa.array([1]),
                }
            ),
            422,
            "expected exactly the columns",
        ),  # fmt: skip
        "string ids": (
            _arrow_table({"user_id": pa.array([1], pa.int64()), "item_id": pa.array(["1"])}),
            422,
            "column item_id has type string; expected int64",
        ),  # fmt: skip
        "int32 ids": (
            _arrow_table({"user_id": pa.array([1], pa.int32()), "item_id": pa.array([1], pa.int64())}),
            422,
            "column user_id has type int32",
        ),  # fmt: skip
        "nulls": (
            _arrow_table(
                {"user_id": pa.array([1, None], pa.int64()), "item_id": pa.array([1, 2], pa.int64())}
            ),
            422,
            "1 null",
        ),  # fmt: skip
        "zero rows": (encode_rows([], []), 422, "0 rows"),
        "too many rows": (encode_rows(np.ones(501, np.int64), np.ones(501, np.int64)), 413, "over the limit"),
        "unknown item": (
            encode_rows([int(app["users"][0])], [424242424]),
            404,
            "unknown item_id(s) [424242424]",
        ),
    }
    for name, (body, status, fragment) in cases.items():
        r = requests.post(f"{app['base']}/score", data=body, headers=ARROW, timeout=30)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert fragment.lower() in r.json()["detail"].lower(), (name, r.text)
    r = requests.post(f"{app['base']}/score", data=good, headers={"content-type": "text/csv"}, timeout=30)
    assert r.status_code == 415 and ARROW_STREAM in r.text


def test_arrow_and_json_requests_share_one_batch_and_a_bad_one_fails_alone(app):
    rng = np.random.default_rng(1)
    jobs = []
    for k in range(8):
        users, items = _rows(app, rng, int(rng.integers(1, 30)))
        if k == 5:  # unknown item id: fails inside the batch, alone
            items[0] = 424242424
        jobs.append(("arrow" if k % 2 else "json", users, items))
    before = requests.get(f"{app['base']}/stats", timeout=10).json().get("batches", 0)
    start = threading.Barrier(len(jobs))

    def send(job):
        kind, users, items = job
        start.wait()
        if kind == "arrow":
            return requests.post(
                f"{app['base']}/score", data=encode_rows(users, items), headers=ARROW, timeout=30
            )
        return requests.post(f"{app['base']}/score", json=_json(users, items), timeout=30)

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(send, jobs))
    after = requests.get(f"{app['base']}/stats", timeout=10).json()["batches"]
    assert after - before == 1, f"expected the 8 requests in one batch, got {after - before} batches"
    for k, ((kind, users, items), r) in enumerate(zip(jobs, results, strict=True)):
        if k == 5:
            assert r.status_code == 404 and "424242424" in r.text, r.text
            continue
        assert r.status_code == 200, (kind, r.text)
        ref = requests.post(f"{app['base']}/score", json=_json(users, items), timeout=30).json()["scores"]
        np.testing.assert_allclose(r.json()["scores"], ref, atol=1e-5)


@pytest.mark.skipif(
    os.environ.get("SKEWLESS_INGRESS") != "fast",
    reason="the default ingress serves sharded builds in tests/integration/test_sharded_serving.py",
)
def test_a_sharded_build_behind_the_fast_ingress_answers_as_its_merged_build(
    ray_head, ml_data, checkpoints, new_registry, tmp_path_factory, serve_port
):
    """Serve's throughput-optimized mode runs the handles' router on the replica's event loop, where a
    response cannot be waited for synchronously: the ingress's readiness probe of its shards must still
    go through (it did not, and the app never became healthy), and the answers equal the merged build's."""
    registry = new_registry("reg-sharded-fast")
    build = summary(rebuild(ray_head, checkpoints[0], ml_data / "catalog", registry, "--users", ml_data / "users",
                            "--layout", "sharded", "--shards", "2"))["build_id"]  # fmt: skip
    small = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}
    spec = {"name": "sharded-fast", "route_prefix": "/sf", "import_path": "serve_app.app:build_app",
            "args": {"registry": str(registry), "shards": 2, "poll_interval_s": 0.3},
            "deployments": [{"name": n, **small} for n in ("Recommender", "Shard0", "Shard1")]}  # fmt: skip
    base = serve_deploy(ray_head, serve_port, [spec], tmp_path_factory.mktemp("serve") / "sf.json") + "/sf"

    _wait_healthy(base, "the sharded app behind the fast ingress")
    merged = load_build(Registry(registry).build_dir(build))
    users = np.asarray(merged.user_ids[:8])
    want, _ = merged.search(np.asarray(merged.user_emb[merged.user_rows(users)[0]]), 10)
    for u, ids in zip(users, want, strict=True):
        r = requests.post(f"{base}/retrieve", json={"user_id": int(u), "k": 10}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["build_id"] == build and body["item_ids"] == ids.tolist()
        assert body["coverage"] == {"answered": 2, "shards": 2, "full": True}
    items = np.asarray(merged.item_ids)[:: max(1, len(merged.item_ids) // 30)][:30]
    r = requests.post(
        f"{base}/score", data=encode_rows(np.full(len(items), users[0]), items), headers=ARROW, timeout=30
    )
    assert r.status_code == 200, r.text
    (ref,), _ = score_batch(
        merged, [ScoreRequest(np.full(len(items), users[0]), items)], BroadcastConfig(enabled=False)
    )
    np.testing.assert_allclose(r.json()["scores"], ref.scores, atol=1e-5)
