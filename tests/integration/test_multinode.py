"""The rebuild on a local multi-node Ray cluster: embedding actors land on the (simulated) GPU pool."""

from __future__ import annotations

import json

from core.checkpoint import read_manifest
from core.datasets import read_table
from tests.integration.builds import check_build, current_build
from tests.integration.conftest import run_module


def test_embedding_actors_run_on_pool_nodes_only(ml_data, checkpoints, new_registry, ray_env):
    registry = new_registry("reg-multinode")
    p = run_module(
        "tests.integration.multinode_cluster", "--", "--checkpoint", checkpoints[0], "--catalog", ml_data / "catalog",
        "--registry", registry, "--num-workers", "2", "--resources-per-worker", "gpu_pool=1", env=ray_env,
    )  # fmt: skip
    result = json.loads(next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT ") :])
    assert result["returncode"] == 0, result["stdout"] + result["stderr"]

    ids = set(read_table(ml_data / "catalog")["item_id"].to_pylist())
    check_build(
        registry,
        current_build(registry),
        checkpoint_version=read_manifest(checkpoints[0])["version"],
        catalog_ids=ids,
    )
    nodes = {a["node_id"] for a in result["embed_actors"]}
    assert len(result["embed_actors"]) >= 2, result["embed_actors"]
    assert nodes <= set(result["pool_node_ids"]) and result["head_node_id"] not in nodes
    assert len(nodes) == 2  # each actor holds gpu_pool=1, so the two land on the two pool nodes
