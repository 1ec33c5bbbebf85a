"""The rebuild's index-assembly pool on Ray: one core.rebuild.worker.Worker per actor, spread over the
cluster's nodes.

It starts after the embedding (jobs.embed_data, on Ray Data's own actor pool) has committed every part,
and does what follows where the parts are: count and read part rows, train the one empty index, add
shards, hold them while the search setting is tuned, write the index. Its actors load no model, so
they start in about a second. Nothing crosses the object store but records, the trained empty index,
the queries and top-k lists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from core.rebuild.worker import Worker
from jobs.common import lower_priority


class AssemblyWorker(Worker):
    """A Worker that lowers its priority first and reports its node. `renice` and `node_id` are the
    OS's and Ray's; tests pass their own."""

    def __init__(
        self,
        threads: int,
        nice: int = 0,
        faiss_threads: int | None = None,
        renice: Callable[[int], int] = lower_priority,
        node_id: Callable[[], str] = lambda: ray.get_runtime_context().get_node_id(),
    ):
        renice(nice)
        super().__init__(threads, node=node_id(), faiss_threads=faiss_threads)


def actor_options(cfg, node: str | None = None) -> dict:
    """`node`: every worker on that node (the driver's, when the staged build is on its disk only);
    it reserves CPUs there, not the embedding pool's resource, which that node may not have."""
    if node is not None:
        return dict(
            num_cpus=cfg.cpus_per_worker,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}},
        )
    return dict(
        num_cpus=cfg.cpus_per_worker,
        # the embedding's pool resource too (not its GPUs): assembly is heavy CPU work, kept off the
        # nodes that serve, and it starts when the embedding actors have given the resource back
        resources=dict(cfg.resources_per_worker) or None,
        scheduling_strategy="SPREAD",  # shards (and their memory) land on different nodes
        # libgomp threads spin after each op by default and steal the CPU of whatever shares the node
        runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}},
    )


def actor_args(cfg) -> tuple:
    return (cfg.torch_threads, cfg.nice, cfg.faiss_threads or None)


class RayPool:
    """`cfg.num_workers` assembly actors, each reserving `cfg.cpus_per_worker` CPUs (on `node` only,
    when given)."""

    def __init__(self, cfg, actor_class: type = AssemblyWorker, node: str | None = None):
        actor, opts = ray.remote(actor_class), actor_options(cfg, node)
        self.actors = [actor.options(**opts).remote(*actor_args(cfg)) for _ in range(cfg.num_workers)]
        self.size = len(self.actors)
        try:
            self._nodes = ray.get([a.ready.remote() for a in self.actors], timeout=cfg.wait_for_min_actors_s)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise RuntimeError(
                f"the rebuild's {self.size} assembly workers did not start within --wait-for-min-actors-s "
                f"{cfg.wait_for_min_actors_s}s (is the cluster short of the resources they reserve?)"
            ) from None
        except BaseException:  # a worker failed to start: none is left behind
            self.close()
            raise

    def nodes(self) -> list[str]:
        return list(self._nodes)

    def on(self, calls: list[tuple[int, str, tuple]]) -> list:
        return ray.get([getattr(self.actors[w], m).remote(*a) for w, m, a in calls])

    def on_each(self, calls: list[tuple[int, str, tuple]]) -> Iterator[tuple[int, Any]]:
        pending = {getattr(self.actors[w], m).remote(*a): i for i, (w, m, a) in enumerate(calls)}
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            yield pending.pop(ref), ray.get(ref)

    @staticmethod
    def share(obj):
        return ray.put(obj)

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
