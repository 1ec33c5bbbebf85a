"""Sharded serving on a local multi-node cluster, through Serve's real HTTP proxy.

Two worker nodes join the session's head, each with room for two shard replicas (`shard_host`). A
4-shard MovieLens build (Flat shards: exact search) is served by one application whose shard
deployments Shard0..Shard3 run on the worker nodes, and by a second ingress with broadcast off over the
same shards (`shard_app`) that allows partial retrievals (`shard_partial`). Answers are checked against
the merged build computed in this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from core.serving.broadcast import BroadcastConfig, ScoreRequest, score_batch
from core.serving.live_build import load_build
from core.storage.registry import Registry
from tests.conftest import REPO
from tests.integration.conftest import (
    free_port,
    kill_session,
    ray_cli,
    rebuild,
    run_module,
    serve_deploy,
    summary,
    wait_for,
)

SHARDS = 4


@pytest.fixture(scope="module")
def worker_nodes(ray_head, tmp_path_factory):
    """Two nodes joined to the session's head, two shard slots each; stopped (killed) at the end."""
    logs = tmp_path_factory.mktemp("nodes")
    procs = []
    for i in range(2):
        temp = tempfile.mkdtemp(prefix="rn-", dir="/tmp")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", f"--address={ray_head['gcs']}", "--block",
             "--num-cpus=2", '--resources={"shard_host": 2}', f"--temp-dir={temp}", "--disable-usage-stats",
             f"--dashboard-agent-listen-port={free_port()}"],
            env=ray_head["env"], cwd=REPO, stdout=open(logs / f"node-{i}.log", "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
            start_new_session=True,
        ))  # fmt: skip

    def alive() -> int:
        p = ray_cli("list", "nodes", "--address", ray_head["dashboard"], "--format", "json", "--filter",
                    "state=ALIVE", env=ray_head["env"], check=False, timeout=60)  # fmt: skip
        return len(json.loads(p.stdout)) if p.returncode == 0 else 0

    try:
        wait_for(lambda: alive() >= 3, 180, "two worker nodes to join the head", interval_s=2)
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
            kill_session(p.pid)


@pytest.fixture(scope="module")
def sharded(ray_head, worker_nodes, ml_data, checkpoints, new_registry, tmp_path_factory, serve_port):
    registry = new_registry("reg-sharded")
    s = summary(rebuild(ray_head, checkpoints[0], ml_data / "catalog", registry, "--users", ml_data / "users",
                        "--layout", "sharded", "--shards", str(SHARDS)))  # fmt: skip
    build = s["build_id"]
    assert s["layout"] == "sharded" and s["shards"] == SHARDS
    shard_deps = [{"name": f"Shard{i}", "num_replicas": 1,
                   "ray_actor_options": {"num_cpus": 0.1, "resources": {"shard_host": 1}}} for i in range(SHARDS)]  # fmt: skip
    ingress = {"name": "Recommender", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}
    # a shard call that takes 3 s is retried: a request facing a dead shard replica answers 503 within ~10 s
    common = {
        "registry": str(registry),
        "poll_interval_s": 0.3,
        "max_candidates": 500,
        "shard_timeout_s": 3.0,
    }
    apps = [
        {"name": "sharded", "route_prefix": "/s", "import_path": "serve_app.app:build_app",
         "args": {**common, "broadcast": True}, "deployments": [ingress, *shard_deps]},
        {"name": "sharded-perrow", "route_prefix": "/p", "import_path": "serve_app.app:build_app",
         "args": {**common, "broadcast": False, "shard_app": "sharded", "shard_partial": True},
         "deployments": [ingress]},
    ]  # fmt: skip
    base = serve_deploy(ray_head, serve_port, apps, tmp_path_factory.mktemp("serve") / "serve.json")

    def healthy():
        try:
            return all(requests.get(f"{base}{r}/healthz", timeout=5).status_code == 200 for r in ("/s", "/p"))
        except requests.RequestException:
            return False

    wait_for(healthy, 300, "both sharded ingresses to serve the build", interval_s=1)
    merged = load_build(Registry(registry).build_dir(build))  # the same vectors as one index, in-process
    yield {"base": base, "build": build, "registry": registry, "merged": merged}
    # before the worker nodes go: Serve would keep trying to restart replicas that need them
    ray_cli("serve", "shutdown", "-y", "--address", ray_head["dashboard"], env=ray_head["env"], check=False)


def test_a_four_shard_build_answers_as_the_merged_build_from_shards_on_two_nodes(sharded):
    base, merged, build = sharded["base"], sharded["merged"], sharded["build"]
    info = requests.get(f"{base}/s/shards", timeout=30).json()["shards"]
    rows = {e["shard"]: e["rows"] for e in merged.manifest.index.shards}
    assert [x["shard"] for x in info] == list(range(SHARDS)), info
    assert all(x["builds"] == {build: rows[x["shard"]]} for x in info), info  # each holds its rows only
    assert len({x["node"] for x in info}) == 2, info  # spread over the two worker nodes
    print("shard replicas' resident memory (MiB):", [x["rss_mib"] for x in info])

    users = np.asarray(merged.user_ids[:40])
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda u: requests.post(f"{base}/s/retrieve", json={"user_id": int(u), "k": 10},
                                                    timeout=30), users))  # fmt: skip
    ids, scores = merged.search(np.asarray(merged.user_emb[merged.user_rows(users)[0]]), 10)
    for r, want_ids, want_scores in zip(got, ids, scores, strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["build_id"] == build and body["item_ids"] == want_ids.tolist()
        np.testing.assert_allclose(body["scores"], want_scores, atol=1e-5)


@pytest.mark.parametrize("route", ["/s", "/p"])
def test_scores_equal_the_unsharded_per_row_scores_with_broadcast_on_and_off(sharded, route):
    base, merged = sharded["base"], sharded["merged"]
    rng = np.random.default_rng(0)
    users, items = np.asarray(merged.user_ids[:5]), np.asarray(merged.item_ids)
    bodies = [{"rows": [[int(rng.choice(users)), int(i)] for i in rng.choice(items, 60)]} for _ in range(24)]
    bodies[7] = {
        "user_id": int(users[0]),
        "item_ids": [int(items[0]), 10**12],
    }  # an unknown item: fails alone
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda b: requests.post(f"{base}{route}/score", json=b, timeout=30), bodies))
    for k, (b, r) in enumerate(zip(bodies, got, strict=True)):
        if k == 7:
            assert r.status_code == 404 and "unknown item_id(s) [1000000000000]" in r.text, r.text
            continue
        assert r.status_code == 200, r.text
        rows = np.asarray(b["rows"], np.int64)
        (want,), _ = score_batch(
            merged, [ScoreRequest(rows[:, 0], rows[:, 1])], BroadcastConfig(enabled=False)
        )
        assert np.max(np.abs(np.asarray(r.json()["scores"]) - want.scores)) <= 1e-5
    stats = requests.get(f"{base}{route}/stats", timeout=10).json()
    assert stats["broadcast"] == (route == "/s")
    if route == "/s":  # one lookup per unique user per batch, not per row
        assert stats["user_lookups"] < stats["rows"]
    else:
        assert stats["user_lookups"] == stats["rows"]


class _Load:
    """Clients sending /score and /retrieve for a few users until stopped; every answer kept."""

    def __init__(
        self, base: str, bodies: list[dict], users: list[int], threads: int = 4, score_frac: float = 0.5
    ):
        self.base, self.bodies, self.users, self.score_frac = base, bodies, users, score_frac
        self.answers: list[tuple] = []  # (kind, index, status, json or text, retry-after)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(t,)) for t in range(threads)]

    def _run(self, t: int) -> None:
        rng = np.random.default_rng(t)
        while not self.stop.is_set():
            k = int(rng.integers(len(self.bodies)))
            u = int(rng.integers(len(self.users)))
            kind = "score" if rng.random() < self.score_frac else "retrieve"
            try:
                if kind == "score":
                    r = requests.post(f"{self.base}/score", json=self.bodies[k], timeout=60)
                else:
                    k = u
                    r = requests.post(
                        f"{self.base}/retrieve", json={"user_id": self.users[u], "k": 10}, timeout=60
                    )
            except requests.RequestException as e:  # recorded: a check below fails on it
                self.answers.append((kind, k, -1, repr(e), None))
                continue
            body = r.json() if r.status_code == 200 else r.text
            self.answers.append((kind, k, r.status_code, body, r.headers.get("retry-after")))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()

    def builds_since(self, n: int) -> set:
        return {a[3]["build_id"] for a in self.answers[n:] if a[2] == 200}


def _references(merged_by_build: dict, bodies: list[dict], users: list[int]) -> dict:
    """Per build: each body's per-row scores and each user's top-10, computed in-process."""
    out = {}
    for build, b in merged_by_build.items():
        scores = []
        for body in bodies:
            rows = np.asarray(body["rows"], np.int64)
            (res,), _ = score_batch(b, [ScoreRequest(rows[:, 0], rows[:, 1])], BroadcastConfig(enabled=False))
            scores.append(res.scores)
        ids, _ = b.search(np.asarray(b.user_emb[b.user_rows(np.asarray(users))[0]]), 10)
        out[build] = {"scores": scores, "top": ids}
    return out


def _check_answers(answers: list[tuple], refs: dict) -> dict:
    """Every 200 names a build and equals that build's answer (so no answer mixes builds); returns counts."""
    counts = {"ok": 0, "503": 0}
    for kind, k, status, body, retry_after in answers:
        if status == 503:
            assert retry_after, body
            counts["503"] += 1
            continue
        assert status == 200, (kind, status, body)
        ref = refs[body["build_id"]]
        if kind == "score":
            assert np.max(np.abs(np.asarray(body["scores"]) - ref["scores"][k])) <= 1e-5, body["build_id"]
        else:
            assert body["item_ids"] == ref["top"][k].tolist(), body["build_id"]
        counts["ok"] += 1
    return counts


def _load_inputs(merged) -> tuple[list[dict], list[int]]:
    rng = np.random.default_rng(3)
    users = [int(u) for u in np.asarray(merged.user_ids)[rng.choice(len(merged.user_ids), 60, replace=False)]]
    items = np.asarray(merged.item_ids)
    bodies = [{"rows": [[u, int(i)] for i in rng.choice(items, 40)]} for u in users[:20]]
    return bodies, users


def test_publish_canary_promote_and_rollback_of_sharded_builds_under_load_fail_nothing(
    sharded, ray_head, ml_data, checkpoints
):
    registry, build_a, merged_a = sharded["registry"], sharded["build"], sharded["merged"]
    bodies, users = _load_inputs(merged_a)
    reg = ["jobs.registry", "--registry", registry]
    with _Load(f"{sharded['base']}/s", bodies, users) as load:
        wait_for(lambda: len(load.answers) > 20, 60, "answers under load")
        b = summary(rebuild(ray_head, checkpoints[1], ml_data / "catalog", registry, "--users", ml_data / "users",
                            "--layout", "sharded", "--shards", str(SHARDS)))["build_id"]  # fmt: skip
        wait_for(
            lambda: load.builds_since(len(load.answers) - 20) == {b}, 90, "every answer from B (published)"
        )
        run_module(*reg, "rollback")
        wait_for(lambda: load.builds_since(len(load.answers) - 20) == {build_a}, 90, "A again (rolled back)")
        run_module(*reg, "canary", b, "--percent", "10")
        wait_for(lambda: load.builds_since(len(load.answers) - 60) == {build_a, b}, 90, "B for ~10% of users")
        run_module(*reg, "promote")
        wait_for(lambda: load.builds_since(len(load.answers) - 20) == {b}, 90, "B for every user (promoted)")
        run_module(*reg, "rollback")
        wait_for(lambda: load.builds_since(len(load.answers) - 20) == {build_a}, 90, "A again (rolled back)")
    merged_b = load_build(Registry(registry).build_dir(b))
    counts = _check_answers(load.answers, _references({build_a: merged_a, b: merged_b}, bodies, users))
    print("answers under publish/rollback/canary/promote/rollback:", counts)
    assert counts["503"] == 0 and counts["ok"] > 200
    canaried = {a[1] for a in load.answers if a[0] == "retrieve" and a[2] == 200 and a[3]["build_id"] == b}
    assert canaried, "no retrieval answered by B"


def test_a_killed_shard_replica_costs_503s_with_retry_after_never_an_incomplete_answer(sharded):
    base, merged, build = sharded["base"], sharded["merged"], sharded["build"]
    assert Registry(sharded["registry"]).current() == build
    bodies, users = _load_inputs(merged)
    victim = next(x for x in requests.get(f"{base}/s/shards", timeout=30).json()["shards"] if x["shard"] == 2)
    with _Load(f"{base}/s", bodies, users) as load:
        wait_for(lambda: len(load.answers) > 20, 60, "answers under load")
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = len(load.answers)

        def recovered():
            info = requests.get(f"{base}/s/shards", timeout=30).json()["shards"]
            back = info[2].get("pid") not in (None, victim["pid"]) and build in info[2].get("builds", {})
            return (
                back and len(load.answers) > killed_at + 20 and all(a[2] == 200 for a in load.answers[-20:])
            )

        wait_for(recovered, 180, "Serve to restart the shard replica and answers to be whole again")
    counts = _check_answers(load.answers, _references({build: merged}, bodies, users))
    print("answers around a killed shard replica (one replica per shard):", counts)
    assert counts["ok"] > 40


def test_a_stalled_shard_gives_503s_or_with_shard_partial_answers_flagged_by_their_coverage(sharded):
    """Shard 2's replica frozen (SIGSTOP): its calls time out. The strict ingress (/s) answers 503 +
    Retry-After; the one with `shard_partial` (/p) answers retrievals from the three other shards, flagged
    `coverage` 3/4, equal to the exact top-10 over the items outside shard 2; both whole again after."""
    base, merged, build = sharded["base"], sharded["merged"], sharded["build"]
    bodies, users = _load_inputs(merged)
    victim = next(x for x in requests.get(f"{base}/s/shards", timeout=30).json()["shards"] if x["shard"] == 2)
    lo, hi = next((e["id_lo"], e["id_hi"]) for e in merged.manifest.index.shards if e["shard"] == 2)
    deep, _ = merged.search(np.asarray(merged.user_emb[merged.user_rows(np.asarray(users))[0]]), 200)
    without = [[int(i) for i in row if not lo <= i < hi][:10] for row in deep]

    def partial(answers):
        return [a for a in answers if a[2] == 200 and not a[3]["coverage"]["full"]]

    with (
        _Load(f"{base}/s", bodies, users, threads=2) as strict,
        _Load(f"{base}/p", bodies, users, score_frac=0) as part,
    ):
        wait_for(lambda: len(strict.answers) > 10 and len(part.answers) > 10, 60, "answers under load")
        os.kill(victim["pid"], signal.SIGSTOP)
        try:
            wait_for(lambda: any(a[2] == 503 for a in strict.answers) and len(partial(part.answers)) >= 2,
                     90, "503s from /s and partial answers from /p while shard 2 is frozen")  # fmt: skip
        finally:
            os.kill(victim["pid"], signal.SIGCONT)
        n_s, n_p = len(strict.answers), len(part.answers)
        wait_for(lambda: len(strict.answers) > n_s + 10 and len(part.answers) > n_p + 10
                 and all(a[2] == 200 for a in strict.answers[-10:] + part.answers[-10:])
                 and not partial(part.answers[-10:]), 120, "whole answers again")  # fmt: skip
    counts = _check_answers(strict.answers, _references({build: merged}, bodies, users))
    refs = _references({build: merged}, bodies, users)[build]["top"]
    flagged = {"full": 0, "partial": 0}
    for kind, k, status, body, _ in part.answers:
        assert kind == "retrieve" and status == 200, (status, body)  # partial instead of a 503
        cov = body["coverage"]
        assert (
            body["build_id"] == build
            and cov["shards"] == SHARDS
            and cov["full"] == (cov["answered"] == SHARDS)
        )
        if cov["full"]:
            assert body["item_ids"] == refs[k].tolist()
        else:  # only shard 2 was stalled: the exact top-10 of the other three shards' items
            assert cov["answered"] == SHARDS - 1 and body["item_ids"] == without[k], (body, without[k])
        flagged["partial" if not cov["full"] else "full"] += 1
    print("a stalled shard: strict ingress", counts, "| partial-answers ingress", flagged)
    assert counts["503"] >= 1 and flagged["partial"] >= 2
    stats = requests.get(f"{base}/p/stats", timeout=10).json()
    assert stats["partial_answers"] >= flagged["partial"]
