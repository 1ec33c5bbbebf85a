"""Start a local multi-node Ray cluster, run the rebuild job on it, report where its workers ran.

    python -m tests.integration.multinode_cluster [--pool-nodes N] [--remove-embedding-node] \\
        [--cpus-per-node C] [--node-caches DIR] -- <jobs.rebuild_index args without --address>

The head advertises no pool resource; N worker nodes advertise `gpu_pool` like cluster.yaml's GPU
worker type (every node has C CPUs, 1 by default). --node-caches: every node's processes get their
own cache directory (SKEWLESS_CACHE_DIR), as nodes that share no disk. --remove-embedding-node: once
two parts are committed, the node of a live embedding actor is removed (its processes killed, as
when a node is lost), mid-run.

A separate process because Ray reads its auth settings at import: the test process cannot switch
token auth on for an in-process cluster after the fact. Prints one JSON line: RESULT {...}.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    p.add_argument("--cpus-per-node", type=int, default=1)
    p.add_argument("--node-caches", type=Path, help="give node i its own SKEWLESS_CACHE_DIR, DIR/node-i")
    a, rest = p.parse_known_args(sys.argv[1 : sys.argv.index("--")])
    argv = sys.argv[sys.argv.index("--") + 1 :]

    def node_env(i: int) -> dict:
        return {"env_vars": {"SKEWLESS_CACHE_DIR": str(a.node_caches / f"node-{i}")}} if a.node_caches else {}

    # its head's dashboard agent on a free port, not Ray's 52365: other Ray heads may run on this machine
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": a.cpus_per_node, "include_dashboard": True,
                                                            "dashboard_agent_listen_port": _free_port(), **node_env(0)})  # fmt: skip
    pool = [cluster.add_node(num_cpus=a.cpus_per_node, resources={"gpu_pool": 1}, **node_env(i + 1))
            for i in range(a.pool_nodes)]  # fmt: skip
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
            "stdout": out[-30000:],
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
