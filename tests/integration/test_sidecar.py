"""The fresh-item sidecar through real HTTP: upsert, retrieve within a second, delete, survive replica
restarts, and move to the next build re-embedded by its model package. An item is its item_id and the
item tower's declared columns (the MovieLens example: genre_ids, year_slot, title_tokens, tag_tokens),
validated against the live build's package."""

from __future__ import annotations

import json
import secrets
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import requests

from core.contract.package import read_manifest
from core.contract.towers import load_package
from core.serving.live_build import load_build
from core.serving.sidecar import embed_items, embeddable
from core.storage.datasets import read_table, write_dataset
from core.storage.registry import Registry
from core.storage.sidecar_log import Position, SidecarLog, entry_problem
from tests.integration.conftest import rebuild, serve_deploy, summary, wait_for

FRESH_ID = 9_000_001
POLL_S = 0.2
TOKEN = secrets.token_urlsafe(24)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# The example package's declared item columns (small values: inside every declared vocabulary)
COLUMNS = ("genre_ids", "year_slot", "title_tokens", "tag_tokens")
GOOD = {"genre_ids": [1, 3], "year_slot": 40, "title_tokens": [5, 9], "tag_tokens": []}


def _item(item_id: int, **kw) -> dict:
    return {"item_id": item_id, **GOOD, **kw}


def _app(registry, token_file, max_k: int = 1000) -> dict:
    return {
        "name": "sidecar",
        "route_prefix": "/",
        "import_path": "serve_app.app:build_app",
        "args": {"registry": str(registry), "poll_interval_s": POLL_S, "max_sidecar_items": 5, "max_k": max_k,
                 "admin_token_file": str(token_file)},
        "deployments": [{"name": "Recommender", "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.1}}],
    }  # fmt: skip


@pytest.fixture(scope="module")
def app(ray_head, ml_data, checkpoints, registry_with_a, serve_port, tmp_path_factory):
    registry, build_a = registry_with_a("reg-sidecar")
    secret_dir = tmp_path_factory.mktemp("secret")
    token_file = secret_dir / "admin_token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    cfg = tmp_path_factory.mktemp("serve-sidecar") / "serve.yaml"
    base = serve_deploy(ray_head, serve_port, [_app(registry, token_file)], cfg)

    def healthy():
        try:
            return requests.get(f"{base}/healthz", timeout=5).json().get("build_id") == build_a
        except (requests.RequestException, ValueError):
            return False

    wait_for(healthy, 240, "the sidecar app on build A", interval_s=1)
    catalog = read_table(ml_data / "catalog")
    return {"base": base, "registry": registry, "build_a": build_a, "catalog": catalog, "cfg": cfg, "ray_head": ray_head, "port": serve_port,
            "users": read_table(ml_data / "users")["user_id"].to_pylist(), "token_file": token_file}  # fmt: skip


def _retrieve(app, user, k=50):
    r = requests.post(f"{app['base']}/retrieve", json={"user_id": user, "k": k}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _relevant_user(app, item: dict) -> tuple[int, int]:
    """The user for whom this item ranks highest against the base catalog (by the live build's own
    towers), and a top-k depth that holds it: (user id, k). A twin under a new id embeds apart from
    its original (the id is a tower input), so its best rank is not always in the first few."""
    b = load_build(Registry(app["registry"]).build_dir(app["build_a"]))
    v = embed_items(b, [item])[0]
    u = np.asarray(b.user_emb)  # (U, D)
    rank = ((u @ np.asarray(b.item_emb).T) > (u @ v)[:, None]).sum(axis=1)  # base items scoring above it
    best = int(np.argmin(rank))
    return int(b.user_ids[best]), max(50, int(rank[best]) + 10)


def _twin_of_top_item(app, user) -> dict:
    """A new item with the same features as this user's current top result: relevant to them."""
    top = _retrieve(app, user, k=1)["item_ids"][0]
    row = app["catalog"].filter(pc.equal(app["catalog"]["item_id"], top)).to_pylist()[0]
    return {"item_id": FRESH_ID, **{c: row[c] for c in COLUMNS}}


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
    user, k = _relevant_user(app, item)
    r = requests.post(f"{app['base']}/items", json={"items": [item]}, headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    t0 = time.monotonic()

    def from_sidecar(got: dict) -> bool:
        ids = got["item_ids"]
        return (
            FRESH_ID in ids
            and got["sources"][ids.index(FRESH_ID)] == "sidecar"
            and got["build_id"] == app["build_a"]
        )

    # every answer checked, in runs of 6 (the router may send a short run to one replica only; an
    # answer checked after the wait could come from the other, which had not ticked yet)
    wait_for(
        lambda: all(from_sidecar(_retrieve(app, user, k)) for _ in range(6)),
        1.0,
        "the fresh item, from the sidecar, on every replica",
        interval_s=0.05,
    )
    assert time.monotonic() - t0 < 1.0

    r = requests.delete(f"{app['base']}/items/{FRESH_ID}", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    wait_for(
        lambda: all(FRESH_ID not in _retrieve(app, user, k)["item_ids"] for _ in range(6)),
        1.0,
        "the deleted item to vanish",
        interval_s=0.05,
    )


def test_bad_items_and_a_full_sidecar_get_clear_errors(app):
    r = requests.post(f"{app['base']}/items", json={"items": [_item("x")]}, headers=AUTH, timeout=10)
    assert r.status_code == 422 and '"items", 0, "item_id"' in r.text
    r = requests.post(f"{app['base']}/items", json={"items": []}, headers=AUTH, timeout=10)
    assert r.status_code == 422
    many = [_item(9_100_000 + i, year_slot=i) for i in range(6)]
    r = requests.post(f"{app['base']}/items", json={"items": many}, headers=AUTH, timeout=10)
    assert r.status_code == 507 and "sidecar is full" in r.text and "of 5 items" in r.text


def test_replica_restart_keeps_the_sidecar(app):
    item = _twin_of_top_item(app, app["users"][1]) | {"item_id": FRESH_ID + 1}
    assert (
        requests.post(f"{app['base']}/items", json={"items": [item]}, headers=AUTH, timeout=10).status_code
        == 200
    )
    before = {r.json()["replica"] for r in _all_replicas(app, "/version").values()}
    # A changed argument makes Serve replace every replica: new processes that start from the log.
    serve_deploy(
        app["ray_head"], app["port"], [_app(app["registry"], app["token_file"], max_k=1001)], app["cfg"]
    )

    def replaced():
        now = {r.json()["replica"] for r in _all_replicas(app, "/version").values()}
        return len(now) == 2 and not (now & before)

    wait_for(replaced, 180, "both replicas to be replaced", interval_s=1)
    for r in _all_replicas(app, f"/items/{FRESH_ID + 1}").values():
        assert r.status_code == 200 and r.json()["source"] == "sidecar", r.text


def test_swap_re_embeds_sidecar_items_with_the_new_checkpoint(app, ray_head, ml_data, checkpoints):
    item = _twin_of_top_item(app, app["users"][2]) | {"item_id": FRESH_ID + 2}
    assert (
        requests.post(f"{app['base']}/items", json={"items": [item]}, headers=AUTH, timeout=10).status_code
        == 200
    )
    version_b = read_manifest(checkpoints[1]).version
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


def test_sidecar_writes_need_the_admin_token_which_no_log_line_shows(app, ray_head):
    item = _item(9_200_000)
    url = f"{app['base']}/items"
    r = requests.post(url, json={"items": [item]}, timeout=10)
    assert r.status_code == 401 and r.headers.get("www-authenticate") == "Bearer", r.text
    r = requests.post(url, json={"items": [item]}, headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert r.status_code == 403 and "not valid" in r.text
    r = requests.delete(f"{url}/{FRESH_ID + 1}", headers={"Authorization": f"Basic {TOKEN}"}, timeout=10)
    assert r.status_code == 403
    assert _retrieve(app, app["users"][0])["build_id"]  # reading routes stay open
    r = requests.post(url, json={"items": [item]}, headers=AUTH, timeout=10)
    assert r.status_code == 200 and r.json()["applied"] is True, r.text
    assert requests.delete(f"{url}/9200000", headers=AUTH, timeout=10).status_code == 200
    # every log file of the cluster: the replicas' logs among them, and no line with the token
    logs = [p for p in (ray_head["session_dir"] / "logs").glob("**/*") if p.is_file()]
    replica_logs = [p for p in logs if "replica_sidecar" in p.name]
    assert replica_logs and any(
        "sidecar writes need the admin token" in p.read_text(errors="replace") for p in replica_logs
    )
    leaked = [p for p in logs if TOKEN.encode() in p.read_bytes()]
    assert leaked == []


# Items the item tower cannot take (in a log, they would poison every replica's follower): a 422 names
# the field, and nothing of the request is written
UNENCODABLE = {
    "id beyond int64": (_item(2**63), '"items", 0, "item_id"'),
    "id far beyond int64": (_item(10**30), '"items", 0, "item_id"'),
    "negative id (the tower hashes ids in [0, 2^62))": (_item(-5), '"items", 0, "item_id"'),
    "year slot past its vocabulary": (_item(9_300_001, year_slot=10**10), '"items", 0, "year_slot"'),
    "text for tokens": (_item(9_300_002, title_tokens="bad \ud800 text"), '"items", 0, "title_tokens"'),
    "a float id in a list": (_item(9_300_003, genre_ids=[1.5]), '"items", 0, "genre_ids", 0'),
    "a declared column missing": ({"item_id": 9_300_004, "genre_ids": [1]}, '"items", 0, "year_slot"'),
    "an undeclared column": (_item(9_300_005, title="t"), '"items", 0, "title"'),
}


def _post_raw(app, body: dict, headers=AUTH):
    # json.dumps escapes a lone surrogate as \ud800, which is valid JSON that decodes to it again
    return requests.post(f"{app['base']}/items", data=json.dumps(body), timeout=10,
                         headers={**headers, "content-type": "application/json"})  # fmt: skip


def test_unencodable_items_get_422_and_a_poisoned_log_never_stops_later_writes_or_swaps(
    app, ray_head, ml_data, checkpoints
):
    log_path = SidecarLog(app["registry"]).path
    before = log_path.read_bytes()
    for name, (item, loc) in UNENCODABLE.items():
        r = _post_raw(app, {"items": [item, _item(9_300_100)]})
        assert r.status_code == 422 and loc in r.text, (name, r.status_code, r.text)
        assert '"items", 1' not in r.text  # the good neighbour is not named
    assert log_path.read_bytes() == before  # nothing written, not even the good neighbour
    # A log that already holds such entries (written by an older version, or by hand); the undeclared
    # column alone would still embed (the tower reads only its declared columns), so it is left out:
    poison = [item for name, (item, _) in UNENCODABLE.items() if name != "an undeclared column"]
    with open(log_path, "ab") as f:
        for item in poison:
            features = {k: v for k, v in item.items() if k != "item_id"}
            entry = {"op": "upsert", "item_id": item["item_id"], "item": features}
            f.write((json.dumps(entry) + "\n").encode())
    fresh = _item(9_300_200, title_tokens=[7, 7, 7])
    r = requests.post(f"{app['base']}/items", json={"items": [fresh]}, headers=AUTH, timeout=10)
    assert r.status_code == 200 and r.json()["applied"] is True, r.text
    t0 = time.monotonic()
    wait_for(
        lambda: all(x.status_code == 200 and x.json()["source"] == "sidecar"
                    for x in _all_replicas(app, f"/items/{fresh['item_id']}").values()),
        1.0, "the valid upsert on every replica", interval_s=0.05,
    )  # fmt: skip
    assert time.monotonic() - t0 < 1.0
    versions = [r.json() for r in _all_replicas(app, "/version").values()]
    # skipped and counted (a log rewrite archives the ones the log itself refuses, so a replica that
    # replays it counts only the rest), and never served
    assert all(v["sidecar_skipped_entries"] >= 1 for v in versions), versions
    for item in poison:
        if isinstance(item.get("item_id"), int) and 0 <= item["item_id"] < 2**63:
            got = requests.get(f"{app['base']}/items/{item['item_id']}", timeout=10)
            assert got.status_code != 200 or got.json().get("source") != "sidecar", got.text
    # a newly published build reaches /score AND /retrieve on every replica
    build_c = summary(rebuild(ray_head, checkpoints[0], ml_data / "catalog", app["registry"]))["build_id"]
    user = app["users"][3]
    item_ids = app["catalog"]["item_id"].to_pylist()[:5]

    def everywhere():
        got = set()
        for _ in range(12):
            got.add(_retrieve(app, user)["build_id"])
            s = requests.post(
                f"{app['base']}/score", json={"user_id": user, "item_ids": item_ids}, timeout=10
            )
            got.add(s.json()["build_id"])
        return got == {build_c}

    wait_for(everywhere, 60, "both routes of every replica on the new build", interval_s=0.5)


def test_a_rebuild_whose_catalog_holds_the_sidecar_items_folds_them_and_frees_the_cap(
    app, ray_head, ml_data, checkpoints, tmp_path
):
    url = f"{app['base']}/items"
    fillers = [_item(9_400_000 + i, tag_tokens=[i + 1]) for i in range(5)]
    for f in fillers:  # fill the cap (5) with what is not yet in the base
        r = requests.post(url, json={"items": [f]}, headers=AUTH, timeout=10)
        if r.status_code == 507:
            break
        assert r.status_code == 200, r.text
    r = requests.post(url, json={"items": [_item(9_499_999)]}, headers=AUTH, timeout=10)
    assert r.status_code == 507 and "sidecar is full" in r.text
    # The next catalog: the old one plus every item the sidecar serves, with the same features
    log = SidecarLog(app["registry"])
    latest: dict[int, dict | None] = {}
    for e in log.read(Position()).entries:
        if entry_problem(e) is None:
            latest[e["item_id"]] = e["item"] if e["op"] == "upsert" else None
    # what the live package can embed; the rest (the poisoned entries above) the fold archives too
    inputs = load_package(checkpoints[0]).item_inputs
    latest = {i: it for i, it in latest.items() if it is not None and embeddable(
        {"item_id": i, "item": it}, inputs, "item_id")}  # fmt: skip
    base = read_table(ml_data / "catalog")
    fresh = pa.Table.from_pylist([{**it, "item_id": i} for i, it in latest.items()], schema=base.schema)
    catalog = tmp_path / "movielens-next" / "catalog"
    write_dataset(catalog, [base, fresh], kind="catalog", source={"test": True})
    p = rebuild(ray_head, checkpoints[0], catalog, app["registry"], "--users", ml_data / "users")
    s = summary(p)
    assert s["sidecar"]["folded"] >= len(latest), s
    wait_for(
        lambda: all(r.json()["build_id"] == s["build_id"] and r.json()["sidecar_items"] == 0
                    for r in _all_replicas(app, "/version").values()),
        60, "every replica on the new base with an empty sidecar",
    )  # fmt: skip
    r = requests.post(url, json={"items": [_item(9_499_999)]}, headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    assert len(log.path.read_bytes().splitlines()) <= 3  # header + what is not served by the base
