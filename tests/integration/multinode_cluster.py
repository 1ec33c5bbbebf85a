"""Start a local multi-node Ray cluster, run the rebuild job on it, report where its workers ran.

    python -m tests.integration.multinode_cluster [--pool-nodes N] [--remove-embedding-node] \\
        -- <jobs.rebuild_index args without --address>

The head advertises no pool resource; N worker nodes (1 CPU each) advertise `gpu_pool` like
cluster.yaml's GPU worker type. --remove-embedding-node: once two parts are committed, the node of a
live embedding actor is removed (its processes killed, as when a node is lost), mid-run.

A separate process because Ray reads its auth settings at import: the test process cannot switch
token auth on for an in-process cluster after the fact. Prints one JSON line: RESULT {...}.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors


def _committed(registry: str) -> int:
    return len(list(Path(registry).glob("builds/.tmp-*/parts/*/part.json")))


def _remove_an_embedding_node(cluster: Cluster, pool: list, registry: str) -> tuple[str, int]:
    deadline = time.monotonic() + 300
    while _committed(registry) < 2:
        if time.monotonic() > deadline:
            raise TimeoutError("no two committed parts within 300 s")
        time.sleep(0.1)
    busy = {a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
            if "PartEmbedder" in (a.repr_name or "") + (a.class_name or "") or a.class_name == "_MapWorker"}  # fmt: skip
    [node, *_] = [n for n in pool if n.node_id in busy]
    at = _committed(registry)
    cluster.remove_node(node, allow_graceful=False)
    return node.node_id, at


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pool-nodes", type=int, default=2)
    p.add_argument("--remove-embedding-node", action="store_true")
    a, rest = p.parse_known_args(sys.argv[1 : sys.argv.index("--")])
    argv = sys.argv[sys.argv.index("--") + 1 :]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True})
    pool = [cluster.add_node(num_cpus=1, resources={"gpu_pool": 1}) for _ in range(a.pool_nodes)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        job = subprocess.Popen(
            [sys.executable, "-m", "jobs.rebuild_index", *argv, "--address", cluster.address],
            env={**os.environ, "RAY_ADDRESS": cluster.address}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        removed, at = None, None
        if a.remove_embedding_node:
            removed, at = _remove_an_embedding_node(cluster, pool, argv[argv.index("--registry") + 1])
        out, err = job.communicate(timeout=600)
        actors = [
            {"class_name": x.class_name, "node_id": x.node_id}
            for x in list_actors(detail=True, limit=1000)
            if "AssemblyWorker" in (x.class_name or "") or "MapWorker" in (x.class_name or "")
        ]
        result = {
            "returncode": job.returncode,
            "stdout": out[-6000:],
            "stderr": err[-4000:],
            "pool_node_ids": [n.node_id for n in pool],
            "head_node_id": cluster.head_node.node_id,
            "worker_actors": actors,
            "removed_node": removed,
            "removed_at_parts": at,
        }
        print("RESULT " + json.dumps(result), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
