"""The rebuild's embedding on Ray Data: ONE streaming execution over every partition file of the
catalog and of the users, on an actor pool that Ray Data starts, restarts and (min/max) resizes.

    from_items(part tasks, one block each) -> map_batches(PartEmbedder, ActorPoolStrategy) -> records

Each actor loads and verifies the model package once (core.rebuild.embed.Embedder); each call embeds
one partition file, gates it and commits its part (core.rebuild.parts.embed_part) and returns the
part's record, which the driver streams back as parts finish. The unit of work, commit and resume is
the partition file: Ray Data cannot pin a block to one input file, so the actor reads its file itself.

When the nodes share no file system (an object-store registry without --scratch), each actor also
uploads its committed part to the bucket (core.rebuild.bucket_parts) and, off the driver's node, drops
its own copy; the driver fetches what it lacks before the assembly.

Fault tolerance is Ray's: actor-pool actors run with max_restarts=-1 and max_task_retries=-1, so an
actor that dies (its process killed, its node lost) is restarted and its part's task retried, which
rewrites the same part (the commit is a rename that replaces an earlier attempt's). Our own exceptions
(a failed gate, rows the package refuses) are not retried: they end the run, raised as themselves.
Every attempt at a part and every start of an actor leaves a marker, so the manifest counts the
retries and the restarts.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import ray

from core.rebuild.bucket_parts import BucketParts
from core.rebuild.embed import Embedder
from core.rebuild.parts import EmbedSettings, PartTask, embed_part
from core.storage.remote_trees import cache_root, url_key
from core.storage.store import is_remote
from jobs.common import lower_priority

ATTEMPTS = ".attempts"  # under the parts directory: one empty file per attempt at a part
STARTS = ".actor-starts"  # and one per start of an embedding actor
OP_NAME = "skewless_embed"  # the dataset's name in the dashboard's Ray Data view and ray_data_* metrics


def actor_device(gpu_ids: list) -> str:
    """The torch device of an actor given the GPUs Ray assigned it. Ray sets CUDA_VISIBLE_DEVICES to
    those; a CPU-pool actor gets none even on a GPU node (torch.cuda.is_available() would say True)."""
    return "cuda:0" if gpu_ids else "cpu"


class PartEmbedder:
    """The callable class Ray Data runs on each actor of the pool: one model package, loaded once.
    `assigned_gpus`, `renice` and `node_id` are Ray's and the OS's; tests pass their own."""

    def __init__(
        self,
        package: str,
        parts: str,
        settings: dict,
        threads: int,
        nice: int = 0,
        assigned_gpus: Callable[[], list] = ray.get_gpu_ids,
        renice: Callable[[int], int] = lower_priority,
        node_id: Callable[[], str] = lambda: ray.get_runtime_context().get_node_id(),
        actor_id: Callable[[], str] = lambda: ray.get_runtime_context().get_actor_id() or "local",
        bucket: str | None = None,
        home_node: str | None = None,
    ):
        renice(nice)  # before torch starts its threads, which inherit it
        self.node = node_id()
        self.settings = EmbedSettings(**settings)
        self.parts = Path(parts)
        # Nodes that share no file system (`bucket`): each part is committed on this node's disk, then
        # uploaded; only the driver's node (`home_node`) keeps its copy, where the assembly reads it.
        self.bucket = BucketParts(bucket) if bucket else None
        self.keep = self.bucket is None or self.node == home_node
        if not self.keep:
            self.parts = cache_root() / "embedding" / url_key(bucket)
            self.parts.mkdir(parents=True, exist_ok=True)
        # one marker per start: Ray restarts a dead actor under the same actor id, so the number of
        # markers beyond the number of distinct ids is the number of restarts
        self._mark(STARTS, actor_id())
        self.embedder = Embedder(package, device=actor_device(assigned_gpus()), threads=threads,
                                 precision=self.settings.precision)  # fmt: skip
        if self.embedder.version != self.settings.checkpoint_version:
            raise ValueError(
                f"the embedding actor loaded package {self.embedder.version} from {package}, "
                f"the rebuild embeds {self.settings.checkpoint_version}"
            )

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys, rows, records = [], [], []
        for row in batch.to_pylist():
            task = PartTask(**row)
            self._mark(ATTEMPTS, task.key)
            rec = embed_part(self.embedder, task, self.parts, self.settings, self.node)
            if self.bucket is not None:  # its record from here on carries the files' hashes
                rec = self.bucket.upload(self.parts / task.key)
                if not self.keep:
                    shutil.rmtree(self.parts / task.key)
            keys.append(task.key)
            rows.append(rec["rows"])
            records.append(json.dumps(rec))
        return pa.table({"key": keys, "rows": rows, "record": records})

    def _mark(self, kind: str, name: str) -> None:
        if self.bucket is not None:
            self.bucket.mark(kind, name)
            return
        # never parents=True: the driver of a failed rebuild removes its staging directory while queued
        # tasks may still start here; they must fail, not recreate it
        self.parts.mkdir(exist_ok=True)
        (self.parts / kind).mkdir(exist_ok=True)
        (self.parts / kind / f"{name}.{uuid.uuid4().hex[:8]}").touch()


@dataclasses.dataclass(frozen=True)
class PoolOptions:
    """The embedding actor pool, from the job's flags."""

    min_workers: int = 1
    max_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    resources: tuple[tuple[str, float], ...] = ()
    threads: int = 2
    nice: int = 0
    wait_for_min_actors_s: int = 300


def compute(opts: PoolOptions) -> ray.data.ActorPoolStrategy:
    # two parts queued per actor: the next one is waiting when one finishes, and no more than that is
    # committed to an actor that might be slower than the others (or lost)
    if opts.max_workers > opts.min_workers:
        return ray.data.ActorPoolStrategy(min_size=opts.min_workers, max_size=opts.max_workers,
                                          max_tasks_in_flight_per_actor=2)  # fmt: skip
    return ray.data.ActorPoolStrategy(size=opts.min_workers, max_tasks_in_flight_per_actor=2)


def map_kwargs(package: Path, parts: Path, settings: EmbedSettings, opts: PoolOptions,
               bucket: str | None = None, home_node: str | None = None) -> dict:  # fmt: skip
    """`map_batches`' arguments: one part per call, the pool and what each actor reserves."""
    return dict(
        fn_constructor_kwargs={
            "package": str(package if is_remote(str(package)) else Path(package).resolve()),
            "parts": str(parts),
            "settings": dataclasses.asdict(settings),
            "threads": opts.threads,
            "nice": opts.nice,
            **({"bucket": bucket, "home_node": home_node} if bucket else {}),
        },  # fmt: skip
        batch_size=1,
        batch_format="pyarrow",
        compute=compute(opts),
        num_cpus=opts.cpus_per_worker,
        num_gpus=opts.gpus_per_worker or None,
        resources=dict(opts.resources) or None,
        # libgomp threads spin after each op by default and steal the CPU of whatever shares the node
        runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}},
    )


def dataset(package: Path, tasks: list[PartTask], parts: Path, settings: EmbedSettings, opts: PoolOptions,
            actor_class: type = None, bucket: str | None = None, home_node: str | None = None):  # fmt: skip
    """The embedding's Ray Data plan: one row (and one block) per part task, one output row per part.
    `actor_class`: PartEmbedder (benchmarks pass a subclass)."""
    ctx = ray.data.DataContext.get_current()
    ctx.max_errored_blocks = 0  # a dropped block would be a silently missing partition
    ctx.raise_original_map_exception = True  # a failed gate surfaces as itself, not as UserCodeException
    ctx.wait_for_min_actors_s = opts.wait_for_min_actors_s
    ds = ray.data.from_items([dataclasses.asdict(t) for t in tasks], override_num_blocks=len(tasks))
    ds = ds.map_batches(
        actor_class or PartEmbedder, **map_kwargs(package, parts, settings, opts, bucket, home_node)
    )
    ds.set_name(OP_NAME)
    return ds


def unwrap(e: BaseException) -> BaseException:
    """The first of our own exceptions (not Ray's wrappers) in the chain of `e`, else `e`."""
    seen, cur = set(), e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if not type(cur).__module__.startswith("ray."):
            return cur
        cur = getattr(cur, "cause", None) or cur.__cause__
    return e


class EmbedRun:
    """One embedding execution; `stats` (attempts, retries, actor restarts) once it has run.
    `bucket`: the parts' URL when the nodes share no file system (core.rebuild.bucket_parts), with
    `home_node` the driver's node, where the assembly reads them."""

    def __init__(self, package: Path, parts: Path, settings: EmbedSettings, opts: PoolOptions,
                 actor_class: type | None = None, bucket: str | None = None, home_node: str | None = None):  # fmt: skip
        self.package, self.parts, self.settings, self.opts = package, Path(parts), settings, opts
        self.actor_class = actor_class
        self.bucket, self.home_node = (BucketParts(bucket) if bucket else None), home_node
        self.stats: dict = {"parts": 0, "attempts": 0, "retries": 0, "actor_restarts": None}

    def __call__(self, tasks: list[PartTask]) -> Iterator[dict]:
        for marks in (ATTEMPTS, STARTS):  # count this run's only
            if self.bucket is not None:
                self.bucket.clear_marks(marks)
            shutil.rmtree(self.parts / marks, ignore_errors=True)
        try:
            ds = dataset(self.package, tasks, self.parts, self.settings, self.opts, self.actor_class,
                         self.bucket and self.bucket.url, self.home_node)  # fmt: skip
            for row in ds.iter_rows():
                yield json.loads(row["record"])
        except Exception as e:
            own = unwrap(e)
            if own is not e:
                raise own from None
            raise
        finally:
            self.stats = self._count(tasks)

    def _count(self, tasks: list[PartTask]) -> dict:
        def names(marks: str) -> list[str]:
            if self.bucket is not None:
                return self.bucket.marks(marks)
            d = self.parts / marks
            return [p.name.split(".", 1)[0] for p in d.iterdir()] if d.is_dir() else []

        keys = {t.key for t in tasks}
        attempts = [k for k in names(ATTEMPTS) if k in keys]
        starts = names(STARTS)
        return {"parts": len(tasks), "attempts": len(attempts), "retries": len(attempts) - len(set(attempts)),
                "actors": len(set(starts)), "actor_restarts": len(starts) - len(set(starts))}  # fmt: skip
