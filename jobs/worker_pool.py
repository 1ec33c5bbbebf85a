"""The rebuild's worker pool on Ray: one core.rebuild.worker.Worker per actor, spread over the cluster's nodes.

ONE pool serves the whole rebuild (items, users, training, shard adds, tuning searches), so the
checkpoint is loaded once per actor and the pool's start is paid once, not once per Ray Data execution
(3.3 s per execution against 2.0 s for the pool here, README). Each actor does the whole of a
partition (read, embed, gate, write, commit), so nothing crosses the object store but records, the
trained empty index and the queries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import ray

from core.rebuild.worker import Worker
from jobs.common import lower_priority

# the namespace of kept pools (--pool NAME): named, detached actors that outlive the job
POOL_NAMESPACE = "skewless-rebuild"

# calls queued per actor: the next partition is waiting when one finishes, and no more than that is
# committed to an actor that might be slower than the others
IN_FLIGHT_PER_ACTOR = 2


def actor_device(gpu_ids: list) -> str:
    """The torch device of an actor given the GPUs Ray assigned it. Ray sets CUDA_VISIBLE_DEVICES to
    those; a CPU-pool actor gets none even on a GPU node (torch.cuda.is_available() would say True)."""
    return "cuda:0" if gpu_ids else "cpu"


class RebuildWorker(Worker):
    """A Worker that lowers its priority first (torch's threads, started later, inherit it), embeds on
    the GPU Ray assigned it, if any, and reports its node. `assigned_gpus`, `renice` and `node_id` are
    Ray's and the OS's; tests pass their own."""

    def __init__(
        self,
        checkpoint: str,
        threads: int,
        precision: str = "fp32",
        nice: int = 0,
        faiss_threads: int | None = None,
        assigned_gpus: Callable[[], list] = ray.get_gpu_ids,
        renice: Callable[[int], int] = lower_priority,
        node_id: Callable[[], str] = lambda: ray.get_runtime_context().get_node_id(),
    ):
        renice(nice)
        super().__init__(checkpoint, threads, precision, node=node_id(), device=actor_device(assigned_gpus()),
                         faiss_threads=faiss_threads)  # fmt: skip


def actor_options(cfg) -> dict:
    return dict(
        num_cpus=cfg.cpus_per_worker,
        num_gpus=cfg.num_gpus_per_worker or None,
        resources=dict(cfg.resources_per_worker) or None,
        scheduling_strategy="SPREAD",  # shards (and their memory) land on different nodes
        # libgomp threads spin after each op by default and steal the CPU of whatever shares the node
        runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}},
    )


def actor_args(cfg) -> tuple:
    return (
        str(cfg.checkpoint.resolve()),
        cfg.torch_threads,
        cfg.precision,
        cfg.nice,
        cfg.faiss_threads or None,
    )


class RayPool:
    """`cfg.pool` names a kept pool: its actors are looked up (or started, then kept) by name, so a
    rebuild that names a running pool skips the start (2.3-2.7 s here: process, imports, checkpoint)
    and only loads its checkpoint if the workers hold another one. A kept pool holds its CPUs (and
    GPUs) between rebuilds, until `python -m jobs.worker_pool release NAME`."""

    def __init__(self, cfg, actor_class: type = RebuildWorker):
        actor, opts = ray.remote(actor_class), actor_options(cfg)
        self.kept = getattr(cfg, "pool", None)
        if self.kept:
            named = {"namespace": POOL_NAMESPACE, "lifetime": "detached", "get_if_exists": True}
            self.actors = [
                actor.options(**opts, **named, name=f"{self.kept}-{i}").remote(*actor_args(cfg))
                for i in range(cfg.num_workers)
            ]
            ready = [a.load.remote(str(cfg.checkpoint.resolve()), cfg.precision) for a in self.actors]
        else:
            self.actors = [actor.options(**opts).remote(*actor_args(cfg)) for _ in range(cfg.num_workers)]
            ready = [a.ready.remote() for a in self.actors]
        self.size = len(self.actors)
        try:
            self._nodes = ray.get(ready, timeout=cfg.wait_for_min_actors_s)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise RuntimeError(
                f"the rebuild's {self.size} workers did not start within --wait-for-min-actors-s "
                f"{cfg.wait_for_min_actors_s}s (is the cluster short of the resources they reserve?)"
            ) from None
        except BaseException:  # a worker failed to start (e.g. its checkpoint): none is left behind
            self.close()
            raise

    def nodes(self) -> list[str]:
        return list(self._nodes)

    def map(self, method: str, calls: list[tuple]) -> Iterator[tuple[int, Any]]:
        queue = list(enumerate(calls))[::-1]
        pending: dict[Any, tuple[int, int]] = {}  # ref -> (call number, actor)
        load = [0] * self.size

        def feed():
            while queue:
                a = min(range(self.size), key=load.__getitem__)
                if load[a] >= IN_FLIGHT_PER_ACTOR:
                    return
                i, args = queue.pop()
                pending[getattr(self.actors[a], method).remote(*args)] = (i, a)
                load[a] += 1

        feed()
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            i, a = pending.pop(ref)
            load[a] -= 1
            result = ray.get(ref)  # a worker's error (a failed gate) is raised here, naming the part
            feed()
            yield i, result

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
        if self.kept:  # stays up for the next rebuild, without this one's shards
            ray.get([a.free.remote() for a in self.actors])
            return
        for a in self.actors:
            ray.kill(a)


def release(name: str) -> list[str]:
    """Stop the actors of a kept pool; returns their names."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == POOL_NAMESPACE and a["name"].rsplit("-", 1)[0] == name]  # fmt: skip
    for n in names:
        ray.kill(ray.get_actor(n, namespace=POOL_NAMESPACE))
    return names


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m jobs.worker_pool", description="Kept rebuild worker pools.")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or the local cluster)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="kept pools and their workers")
    r = sub.add_parser("release", help="stop a kept pool's workers (frees their CPUs)")
    r.add_argument("name")
    a = p.parse_args(argv)
    ray.init(address=a.address, log_to_driver=False)
    if a.cmd == "list":
        for x in ray.util.list_named_actors(all_namespaces=True):
            if x["namespace"] == POOL_NAMESPACE:
                print(x["name"])
    else:
        stopped = release(a.name)
        print(
            f"released {a.name}: {len(stopped)} worker(s) stopped"
            if stopped
            else f"no kept pool named {a.name}"
        )
    return 0


if __name__ == "__main__":
    from jobs.common import run_main

    run_main(main)
