"""Start a local multi-node Ray cluster, run the rebuild job on it, report where its workers ran.

    python -m tests.integration.multinode_cluster -- <jobs.rebuild_index args without --address>

A separate process because Ray reads its auth settings at import: the test process cannot switch
token auth on for an in-process cluster after the fact. Prints one JSON line: RESULT {...}.
"""

import json
import os
import subprocess
import sys

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors


def main() -> None:
    argv = sys.argv[sys.argv.index("--") + 1 :]
    # The head advertises no pool resource; two worker nodes advertise `gpu_pool` like cluster.yaml's
    # GPU worker type.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True})
    pool = [cluster.add_node(num_cpus=1, resources={"gpu_pool": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        job = subprocess.run(
            [sys.executable, "-m", "jobs.rebuild_index", *argv, "--address", cluster.address],
            env={**os.environ, "RAY_ADDRESS": cluster.address}, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        ray.init(address=cluster.address)
        actors = [
            {"class_name": a.class_name, "node_id": a.node_id}
            for a in list_actors(detail=True, limit=1000)
            if "RebuildWorker" in (a.class_name or "")
        ]
        result = {
            "returncode": job.returncode,
            "stdout": job.stdout[-4000:],
            "stderr": job.stderr[-4000:],
            "pool_node_ids": [n.node_id for n in pool],
            "head_node_id": cluster.head_node.node_id,
            "worker_actors": actors,
        }
        print("RESULT " + json.dumps(result), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
