"""The embedding on Ray Data, as users break it: an embedding actor SIGKILLed while parts are being written, and
a pool node removed mid-run on a local multi-node cluster (where every actor must stay on the pool),
cost retries, not the rebuild: it publishes by itself, with vectors bit for bit those of the
uninterrupted embedding. (A killed driver resumed with --resume: test_rebuild_failures; the dashboard's
view of the embedding: test_rebuild_job.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest
import torch

from core.ann import index as ann
from core.rebuild import parts
from core.rebuild.build import embed_settings
from core.rebuild.embed import Embedder
from core.rebuild.parts import embed_locally
from core.serving.live_build import load_build
from core.storage.build_dir import BuildDir
from core.storage.datasets import partition_files, write_dataset
from core.storage.registry import Registry
from tests.conftest import REPO
from tests.integration import heavy_model
from tests.integration.builds import current_build
from tests.integration.conftest import rebuild, run_module, summary, wait_for

# The same embedding settings in every build here, so that their vectors can be compared bit for bit.
BATCH = 400
FLAGS = ("--no-users", "--no-compare", "--force-unchecked", "--index", "flat", "--num-workers", "2",
         "--cpus-per-worker", "0.5", "--torch-threads", "1", "--batch-size", str(BATCH))  # fmt: skip
PARTS = 30


@pytest.fixture(scope="module")
def heavy(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("heavy")
    return {"root": root, "package": heavy_model.package(root / "packages"),
            "catalog": heavy_model.catalog(root / "catalog", items=24_000, partitions=PARTS)}  # fmt: skip


def _args(heavy: dict, registry: Path) -> list[str]:
    return ["--package", str(heavy["package"]), "--catalog", str(heavy["catalog"]), "--registry", str(registry),
            *FLAGS]  # fmt: skip


@pytest.fixture(scope="module")
def reference(heavy) -> dict:
    """The uninterrupted embedding of the catalog, in this process with the job's settings (the same
    per-partition code, batch size and one torch thread as each actor): the ids and vectors to match."""
    prev = torch.get_num_threads()
    try:
        emb = Embedder(heavy["package"], threads=1)
        embed = embed_locally([emb], heavy["root"] / "ref-parts", embed_settings(emb.model, "fp32", BATCH))
        recs = list(embed(parts.plan("items", partition_files(heavy["catalog"]))))
    finally:
        torch.set_num_threads(prev)
    got = [parts.open_part(heavy["root"] / "ref-parts" / r["key"]) for r in recs]
    ids = np.concatenate([g[0] for g in got])
    order = np.argsort(ids)
    return {"ids": ids[order].tobytes(), "vectors": np.concatenate([g[1] for g in got])[order].tobytes()}


def _vectors(registry: Path, build: str) -> dict:
    ids, x = BuildDir(Registry(registry).build_dir(build)).open_items()
    return {"ids": np.asarray(ids).tobytes(), "vectors": np.ascontiguousarray(x).tobytes()}


def _committed(registry: Path) -> int:
    return len(list(Path(registry).glob("builds/.tmp-*/parts/items-*/part.json")))


def _in_flight(registry: Path) -> int:
    """Parts an actor has started (its attempt marker exists) and not yet committed."""
    started = {m.name.split(".")[0] for m in Path(registry).glob("builds/.tmp-*/parts/.attempts/items-*")}
    done = {p.parent.name for p in Path(registry).glob("builds/.tmp-*/parts/items-*/part.json")}
    return len(started - done)


def _embedding_actor_pids(env: dict) -> list[int]:
    """Processes of Ray Data's embedding actors (their title names the map: MapBatches(PartEmbedder)) in
    the cluster started with `env` (its node cache directory is its own), not in any other on the machine."""
    mine = f"SKEWLESS_CACHE_DIR={env['SKEWLESS_CACHE_DIR']}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if (
                d.name.isdigit()
                and b"PartEmbedder" in (d / "cmdline").read_bytes()
                and mine in (d / "environ").read_bytes().split(b"\0")
            ):
                pids.append(int(d.name))
        except OSError:
            pass
    return pids


def test_an_embedding_actor_killed_mid_run_costs_a_retry_not_the_rebuild(
    ray_head, heavy, reference, new_registry
):
    registry = new_registry("reg-heavy-kill")
    job = subprocess.Popen(
        [sys.executable, "-m", "jobs.rebuild_index", *_args(heavy, registry), "--address", ray_head["gcs"]],
        cwd=REPO, env=ray_head["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # both actors mid-part, so the one killed has a part to retry (an actor still starting, or idle
        # between parts, would cost a restart and no retry)
        wait_for(lambda: _committed(registry) >= 2 and _in_flight(registry) >= 2, 300,
                 "two committed parts and two in flight", interval_s=0.05)  # fmt: skip
        [victim, *_] = wait_for(
            lambda: _embedding_actor_pids(ray_head["env"]), 30, "an embedding actor's process"
        )
        os.kill(victim, signal.SIGKILL)
        killed_at = _committed(registry)
        out, err = job.communicate(timeout=600)
    finally:
        job.kill()
    assert job.returncode == 0, err[-3000:]
    assert killed_at < PARTS  # the kill landed while parts were still being written
    s = summary(subprocess.CompletedProcess([], 0, out, err))
    assert s["embedding"]["actor_restarts"] >= 1 and s["embedding"]["retries"] >= 1, s["embedding"]
    assert s["parts"]["embedded"] == PARTS and current_build(registry) == s["build_id"]
    assert _vectors(registry, s["build_id"]) == reference


def test_a_pool_node_removed_mid_embedding_costs_retries_and_everything_stays_on_the_pool(
    heavy, reference, new_registry, ray_env
):
    """A 4-node cluster: a head with no pool resource and 3 pool nodes (`gpu_pool`, as cluster.yaml's GPU
    workers), 2 embedding actors. The node of a busy embedding actor is removed mid-run; Ray Data's
    restarted actor on the spare node takes its parts over. Every actor ran on pool nodes only, the
    assembly built its 4 shards on the two pool nodes left, and the sharded build, served, answers as
    one index over the same vectors does."""
    registry = new_registry("reg-heavy-node")
    p = run_module(
        "tests.integration.multinode_cluster", "--pool-nodes", "3", "--remove-embedding-node", "--",
        *_args(heavy, registry), "--resources-per-worker", "gpu_pool=1", "--index", "ivf", "--layout", "sharded",
        "--shards", "4", env=ray_env,
    )  # fmt: skip
    result = json.loads(next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT ") :])
    assert result["returncode"] == 0, result["stdout"] + result["stderr"]
    assert result["removed_node"] and result["removed_at_parts"] < PARTS, result
    s = json.loads(
        next(x for x in result["stdout"].splitlines() if x.startswith("SUMMARY "))[len("SUMMARY ") :]
    )
    assert s["embedding"]["retries"] >= 1 or s["embedding"]["actor_restarts"] >= 1, s["embedding"]
    assert _vectors(registry, s["build_id"]) == reference

    pool, head = set(result["pool_node_ids"]), result["head_node_id"]
    assert {a["node_id"] for a in result["worker_actors"]} <= pool  # embedding and assembly actors alike
    m = Registry(registry).manifest(s["build_id"])
    assert set(m.parts["nodes"]) <= pool and head not in m.parts["nodes"]
    assert m.index.layout == "sharded" and len(m.index.shards) == 4
    assert {x["node"] for x in m.index.shards} == pool - {result["removed_node"]}  # built where they live
    # served (core.serving.live_build, what every replica loads) vs ONE index over the same vectors
    bdir = BuildDir(Registry(registry).build_dir(s["build_id"]))
    live = load_build(bdir.root)
    one = ann.load(bdir.shard_index_path(0))
    for x in m.index.shards[1:]:
        one.merge_from(ann.load(bdir.shard_index_path(x["shard"])), 0)
    assert one.ntotal == live.index.ntotal == m.catalog.row_count
    xq = np.array(bdir.open_items()[1][::120]) + 0.1
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    I, D = live.search(xq, 10)
    D1, I1 = one.search(xq, 10, params=faiss.SearchParametersIVF(nprobe=m.index.search_params["nprobe"]))
    # this model gives every 1,000th id the same vector: ties may come back in either order, so the
    # scores must be equal, and every id returned must hold its score
    np.testing.assert_allclose(D, D1, rtol=1e-5)
    ids, x = bdir.open_items()
    rows = np.searchsorted(ids, I)
    np.testing.assert_allclose(np.einsum("qd,qkd->qk", xq, x[rows]), D, rtol=1e-4, atol=1e-5)


def test_an_exception_of_ours_in_an_actor_fails_the_rebuild_at_once_with_one_line(
    ray_head, heavy, new_registry, tmp_path
):
    """Not retried: a part that fails its gate (duplicate ids) ends the run, exit 2, the gate's own line."""
    bad = tmp_path / "bad"
    write_dataset(bad, [pa.table({"item_id": [1, 2, 3]}), pa.table({"item_id": [4, 4, 5]})], kind="catalog",
                  source={})  # fmt: skip
    registry = new_registry("reg-heavy-bad")
    out = rebuild(ray_head, heavy["package"], bad, registry, *FLAGS, check=False)
    assert out.returncode == 2, out.stderr[-3000:]
    [line] = [x for x in out.stderr.splitlines() if x.startswith("FAILED")]
    assert "must be unique; 1 duplicates, e.g. [4]" in line, line
    assert current_build(registry) is None


def test_a_bucket_rebuild_embeds_on_nodes_that_share_no_disk_and_assembles_on_the_drivers(
    heavy, reference, ray_env, s3, tmp_path
):
    """An object-store registry and no --scratch, on a 3-node cluster whose nodes each have their own
    cache directory: the embedding actors (one per pool node) commit their parts to the bucket, the
    driver's node fetches what it did not embed, verified, and assembles there; the build is bit for
    bit the uninterrupted embedding, and no staged part is left in the bucket or on a pool node."""
    registry = f"s3://skewless/mn-{tmp_path.name}"
    caches = tmp_path / "caches"
    p = run_module(
        "tests.integration.multinode_cluster", "--pool-nodes", "2", "--cpus-per-node", "2", "--node-caches", caches,
        "--", *_args(heavy, registry), "--resources-per-worker", "gpu_pool=1", env=ray_env,
    )  # fmt: skip
    result = json.loads(next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT ") :])
    out = result["stdout"]
    assert result["returncode"] == 0, out + result["stderr"]
    s = json.loads(next(x for x in out.splitlines() if x.startswith("SUMMARY "))[len("SUMMARY ") :])
    home = next(x for x in out.splitlines() if x.startswith("no shared staging:")).split("(")[-1].rstrip(")")
    reg = Registry(registry)
    m = reg.manifest(s["build_id"])
    pool = set(result["pool_node_ids"])
    assert set(m.parts["nodes"]) == pool  # both pool nodes embedded (one actor each: gpu_pool=1)
    # the assembly ran on the driver's node: fetched every part embedded elsewhere, and only those
    elsewhere = [k for k, r in _part_nodes(out).items() if not r.startswith(home)]
    fetched = int(
        next(x for x in out.splitlines() if x.startswith("parts from s3://")).split(": ")[1].split()[0]
    )
    assert fetched == len(elsewhere) > 0, (fetched, elsewhere)
    assert {x["node"][:12] for x in m.index.shards} == {home}
    assert _vectors(registry, s["build_id"]) == reference
    assert s["embedding"]["parts"] == PARTS and s["embedding"]["attempts"] == PARTS  # counted from the bucket
    assert list(reg.store.list("staging/")) == []  # staged parts dropped once the build is committed
    left = [p for p in caches.glob("node-*/embedding/*/*") if not p.name.startswith(".")]
    assert left == []  # pool nodes uploaded their parts and dropped their copies


def _part_nodes(log: str) -> dict[str, str]:
    """part key -> the node prefix it was embedded on, from the job's "part ..." lines."""
    got = {}
    for line in log.splitlines():
        if line.startswith("part ") and " on node " in line:
            got[line.split()[1].rstrip(":")] = line.split(" on node ")[1].split()[0]
    return got
