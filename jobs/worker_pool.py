"""The rebuild's worker pool on Ray: one core.worker.Worker per actor, spread over the cluster's nodes.

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

from core.worker import Worker
from jobs.common import lower_priority

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
    def __init__(self, cfg, actor_class: type = RebuildWorker):
        remote = ray.remote(actor_class).options(**actor_options(cfg))
        self.actors = [remote.remote(*actor_args(cfg)) for _ in range(cfg.num_workers)]
        self.size = len(self.actors)
        try:
            self._nodes = ray.get([a.ready.remote() for a in self.actors], timeout=cfg.wait_for_min_actors_s)
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

    @staticmethod
    def share(obj):
        return ray.put(obj)

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
