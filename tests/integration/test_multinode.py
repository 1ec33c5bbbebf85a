"""The rebuild on a local multi-node Ray cluster (3 nodes): its embedding actors (Ray Data's pool) and its
assembly workers land on the (simulated) GPU pool only, and build a sharded index there whose shards
come from both pool nodes; served, it answers as one index over the same vectors does."""

from __future__ import annotations

import json

import faiss
import numpy as np

from core.ann import index as ann
from core.contract.package import read_manifest
from core.serving.live_build import load_build
from core.storage.build_dir import BuildDir
from core.storage.datasets import read_table
from core.storage.registry import Registry
from tests.integration.builds import check_build, current_build
from tests.integration.conftest import run_module


def test_workers_run_on_pool_nodes_only_and_build_shards_on_both(ml_data, checkpoints, new_registry, ray_env):
    registry = new_registry("reg-multinode")
    p = run_module(
        "tests.integration.multinode_cluster", "--", "--checkpoint", checkpoints[0], "--catalog", ml_data / "catalog",
        "--users", ml_data / "users", "--registry", registry, "--num-workers", "2", "--resources-per-worker",
        "gpu_pool=1", "--index", "ivf", "--layout", "sharded", "--shards", "4", env=ray_env,
    )  # fmt: skip
    result = json.loads(next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT ") :])
    assert result["returncode"] == 0, result["stdout"] + result["stderr"]

    ids = set(read_table(ml_data / "catalog")["item_id"].to_pylist())
    check_build(
        registry,
        current_build(registry),
        checkpoint_version=read_manifest(checkpoints[0]).version,
        catalog_ids=ids,
    )
    nodes = {a["node_id"] for a in result["worker_actors"]}
    assert len(result["worker_actors"]) >= 2, result["worker_actors"]
    assert nodes <= set(result["pool_node_ids"]) and result["head_node_id"] not in nodes
    assert len(nodes) == 2  # each actor holds gpu_pool=1, so the two land on the two pool nodes

    reg = Registry(registry)
    build = reg.current()
    m = reg.manifest(build)
    assert m.index.layout == "sharded" and len(m.index.shards) == 4
    assert {s["node"] for s in m.index.shards} == nodes  # the manifest says where each shard was built
    assert set(m.parts["nodes"]) == nodes
    # served (core.serving.live_build, what every replica loads) vs ONE index over the same vectors, same setting
    live = load_build(reg.build_dir(build))
    bdir = BuildDir(reg.build_dir(build))
    one = ann.load(bdir.shard_index_path(0))
    for s in m.index.shards[1:]:
        one.merge_from(ann.load(bdir.shard_index_path(s["shard"])), 0)
    assert one.ntotal == live.index.ntotal == m.catalog.row_count
    xq = np.array(bdir.open_users(m)[1][:200])
    I, D = live.search(xq, 10)
    D1, I1 = one.search(xq, 10, params=faiss.SearchParametersIVF(nprobe=m.index.search_params["nprobe"]))
    np.testing.assert_array_equal(I, I1)
    np.testing.assert_allclose(D, D1, rtol=1e-6)
