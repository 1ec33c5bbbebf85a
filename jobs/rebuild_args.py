"""The rebuild job's command line: its flags, their checks and defaults, and the RebuildConfig they
make (jobs.rebuild_index runs it; its docstring is the --help text)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from core.ann import index as ann
from core.quality import compare as cmp
from core.rebuild import assemble as asm
from core.rebuild.build import CompareOptions, IndexOptions
from core.rebuild.embed import PRECISIONS
from core.storage.datasets import is_dataset
from core.storage.store import location


@dataclasses.dataclass(frozen=True)
class RebuildConfig:
    checkpoint: Path
    catalog: Path
    users: Path | None = None
    registry: Path = Path("registry")
    address: str | None = None
    num_workers: int = 1
    max_workers: int = 0  # the embedding pool grows up to this many actors (0: --num-workers, a fixed pool)
    cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0
    resources_per_worker: tuple[tuple[str, float], ...] = ()
    batch_size: int = 8192
    torch_threads: int = 2
    faiss_threads: int = 0  # 0: as many as --torch-threads (a worker's faiss and torch never run at once)
    index: IndexOptions = IndexOptions()
    timeout_s: float = 3600.0
    wait_for_min_actors_s: int = 300
    force_unchecked: bool = False
    skip_resource_check: bool = False
    precision: str = "fp32"
    # added to the nice value of the workers (embedding, index build) and of the driver, for a rebuild
    # that shares cores with serving. Ray starts its workers (Serve replicas and the rebuild's actors
    # alike) at nice 15, while a driver runs at its launcher's (0 under `ray job submit`).
    nice: int = 0
    resume: str | None = None  # a staged build id whose committed partitions are reused
    compare: CompareOptions = CompareOptions()
    scratch: Path | None = None  # staging of an object-store registry's build, seen by every pool node


def _bytes(s: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    num, unit = s.rstrip("BbiI").upper()[:-1], s.rstrip("BbiI").upper()[-1:]
    if unit.isdigit():
        num, unit = num + unit, ""
    try:
        return int(float(num) * units[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a size such as 4G, 512M or 1000000, got {s!r}") from None


def _resource(s: str) -> tuple[str, float]:
    name, _, amount = s.partition("=")
    try:
        return name, float(amount or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=AMOUNT (e.g. gpu_pool=1), got {s!r}") from None


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, then each option with its default (from RebuildConfig and
    IndexOptions) where it has a meaningful one."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def parse(argv: list[str] | None, description: str = "") -> RebuildConfig:
    d, ix = RebuildConfig, IndexOptions  # the one source of defaults
    p = argparse.ArgumentParser(
        prog="python -m jobs.rebuild_index", description=description, formatter_class=_HelpFormatter
    )
    p.add_argument(
        "--package",
        "--checkpoint",
        dest="checkpoint",
        type=location,
        required=True,
        help="model package directory (core.contract.package.write_package; every vector carries its version)",
    )
    p.add_argument(
        "--catalog",
        type=location,
        required=True,
        help="catalog dataset directory (core.storage.datasets.write_dataset: the item id + the item tower's declared columns)",
    )
    p.add_argument(
        "--users",
        type=location,
        default=d.users,
        help="users dataset; embedded with the SAME checkpoint for serving (default: CATALOG/../users if "
        "present)",
    )
    p.add_argument(
        "--no-users",
        action="store_true",
        help="do not embed users: the build has no user tables, and its index is tuned and gated on the "
        "user tower over histories sampled from the catalog",
    )
    p.add_argument("--registry", type=location, default=d.registry,
                   help="build registry: a directory, or s3://BUCKET/PREFIX / gs://BUCKET/PREFIX")  # fmt: skip
    p.add_argument(
        "--address",
        default=d.address,
        help="Ray address (default: RAY_ADDRESS, else a cluster started with `ray start` on this machine, "
        "else a new local Ray; `local` forces a new one)",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=d.num_workers,
        help="embedding actors (Ray Data's pool; one per GPU on a GPU pool), then as many index-assembly "
        "workers (they add the shards and search them)",
    )
    p.add_argument(
        "--max-workers",
        type=int,
        default=d.max_workers,
        help="let Ray Data grow the embedding pool from --num-workers up to this many actors while the "
        "cluster has room (an autoscaling cluster); 0: a fixed pool of --num-workers",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        default=d.cpus_per_worker,
        help="logical CPUs each actor reserves (below 1 lets more actors than cores share a small machine)",
    )
    p.add_argument(
        "--num-gpus-per-worker",
        type=float,
        default=d.num_gpus_per_worker,
        help="0 = CPU pool, 1 = one GPU per actor",
    )
    p.add_argument(
        "--resources-per-worker",
        type=_resource,
        action="append",
        default=list(d.resources_per_worker),
        metavar="NAME=AMOUNT",
        help="custom resource each embedding actor reserves, e.g. gpu_pool=1 (repeatable). Only nodes that "
        "advertise it run the actors, which keeps them off serving nodes (give those none of it). Ray "
        "Data's read and write tasks are not pinned by it and may run on any node with CPU",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=d.nice,
        metavar="N",
        help="add N (0-19) to the nice value of the rebuild's workers (embedding, index build) and of the "
        "driver, so a rebuild that shares a node's cores with serving yields them to it",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per embedding batch")
    p.add_argument(
        "--torch-threads", type=int, default=d.torch_threads, help="torch intra-op threads per actor"
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=d.precision,
        help="embedding compute precision (bf16: ~2x faster on CPUs with bf16 units; the index then holds "
        "vectors that differ slightly from fp32 ones, see README)",
    )
    p.add_argument(
        "--faiss-threads",
        type=int,
        default=d.faiss_threads,
        help="faiss OpenMP threads per worker (0: --torch-threads)",
    )
    p.add_argument(
        "--index",
        choices=ann.KINDS,
        default=ix.kind,
        help="index family (auto: up to 200k items Flat, HNSW32 and IVF-Flat at 2, 4, 8*sqrt(n) lists are "
        "built in one worker and the fastest at the target recall is kept; above, IVF at ~6*sqrt(n) "
        "lists with fp16 codes up to 2M items (a short k-means, then every centroid refit to its list's "
        "mean; hits rescored in float32) and IVF-Flat at 2*sqrt(n) beyond, trained once and added shard by shard, with only its search setting measured)",
    )
    p.add_argument(
        "--layout",
        choices=asm.LAYOUTS,
        default=ix.layout,
        help="merged: one index file; sharded: one index per id range, searched as one by serving; auto: "
        "merged when the merged index fits --memory-budget",
    )
    p.add_argument(
        "--memory-budget",
        type=_bytes,
        default=ix.memory_budget,
        metavar="SIZE",
        help="memory one process may hold of the index (e.g. 4G, 512M): decides auto's layout and the "
        "shard size",
    )
    p.add_argument(
        "--shards",
        type=int,
        default=ix.shards,
        help="number of id-range shards (0: from the budget and workers)",
    )
    p.add_argument(
        "--nlist",
        type=int,
        default=ix.nlist,
        help="IVF-Flat inverted lists, fully trained (0: from n, as --index sizes them); the add costs "
        "n x nlist",
    )
    p.add_argument(
        "--scratch",
        type=Path,
        default=d.scratch,
        help="with an s3:// or gs:// --registry: a directory every node of the pools sees (a shared file "
        "system) to stage the build in (partitions, tables, shards); without it the embedding actors, on "
        "any node, commit their partitions to the bucket and the assembly runs on this node, whose disk "
        "(SKEWLESS_CACHE_DIR) holds the staged build until its upload",
    )
    p.add_argument(
        "--resume",
        metavar="BUILD_ID",
        default=d.resume,
        help="continue a stopped rebuild: reuse its committed partitions (same checkpoint, catalog, users, "
        "precision and batch size, or it is refused naming what differs) and redo the rest",
    )
    p.add_argument(
        "--target-recall",
        type=float,
        default=ix.target_recall,
        help=f"held-out recall@{ix.k} needed to publish, at the lower end of its one-sided 95%% interval over "
        "the held-out queries (the search setting is the cheapest that reaches it on the tuning queries and "
        "then on the disjoint held-out queries)",
    )
    p.add_argument(
        "--force-unchecked",
        action="store_true",
        help="publish without a passed skew check (recorded in the manifest)",
    )
    p.add_argument(
        "--timeout-s",
        type=float,
        default=d.timeout_s,
        help="give up (exit 2, nothing published) after this many seconds",
    )
    p.add_argument(
        "--wait-for-min-actors-s",
        type=int,
        default=d.wait_for_min_actors_s,
        help="fail if the embedding actor pool has not started within this many seconds",
    )
    p.add_argument(
        "--skip-resource-check",
        action="store_true",
        help="start even if the cluster lacks the pool's resources now (autoscaling clusters)",
    )
    lim = cmp.Limits()
    g = p.add_argument_group("comparison gate (before publishing): quality floor, then the live build")
    g.add_argument("--no-compare", action="store_true",
                   help="skip the comparison gate: the quality floor and the comparison with the live build")  # fmt: skip
    g.add_argument("--force", action="store_true", help="publish even if the comparison refuses (recorded)")
    g.add_argument("--holdout", type=location, help="held-out interactions (user_id, item_id) for the quality "
                   "floor and comparison (default: USERS/../interactions/test when it exists; without it the "
                   "floor is not checked, and the summary says so)")  # fmt: skip
    g.add_argument("--compare-users", type=int, default=CompareOptions.users, help="users compared")
    g.add_argument("--min-overlap", type=float, default=lim.min_overlap,
                   help="lowest mean top-k overlap with the live build's retrieval")  # fmt: skip
    g.add_argument("--max-quality-drop", type=float, default=lim.max_quality_drop,
                   help="largest relative held-out Recall@k drop vs the live build")  # fmt: skip
    g.add_argument("--max-pair-cosine", type=float, default=lim.max_pair_cosine,
                   help="largest mean cosine of random item pairs (collapse)")  # fmt: skip
    g.add_argument("--max-near-duplicates", type=float, default=lim.max_near_duplicates,
                   help=f"largest share of items with a near-duplicate (cosine >= {cmp.NEAR_DUP_COSINE})")  # fmt: skip
    g.add_argument("--min-effective-rank", type=float, default=lim.min_effective_rank,
                   help="smallest effective rank of the item vectors")  # fmt: skip
    g.add_argument("--min-lift-over-popularity", type=float, default=lim.min_lift_over_popularity,
                   help="quality floor, live build or not: held-out Recall@k at least this multiple of a "
                   "popularity ranking's (counted from the users' histories; needs held-out data)")  # fmt: skip
    g.add_argument("--min-lift-over-random", type=float, default=lim.min_lift_over_random,
                   help="quality floor: held-out Recall@k at least this multiple of a random ranking's")  # fmt: skip
    a = p.parse_args(argv)
    if a.num_workers < 1 or a.batch_size < 1 or not 0 < a.target_recall <= 1:
        p.error("--num-workers and --batch-size must be >= 1, --target-recall in (0, 1]")
    if a.max_workers and a.max_workers < a.num_workers:
        p.error(f"--max-workers ({a.max_workers}) must be 0 or at least --num-workers ({a.num_workers})")
    if a.shards < 0 or a.memory_budget <= 0 or a.nlist < 0:
        p.error(f"--shards and --nlist must be >= 0 (got {a.shards}, {a.nlist}) and --memory-budget > 0")
    if not 0 <= a.nice <= 19 or a.timeout_s <= 0:
        p.error(f"--nice must be in 0..19 (got {a.nice}) and --timeout-s > 0 (got {a.timeout_s:g})")
    users = None
    if not a.no_users:
        users = a.users or (a.catalog.parent / "users" if is_dataset(a.catalog.parent / "users") else None)
    holdout = a.holdout
    if holdout is None and users is not None and is_dataset(users.parent / "interactions" / "test"):
        holdout = users.parent / "interactions" / "test"
    compare = CompareOptions(
        enabled=not a.no_compare, holdout=holdout, users=a.compare_users, force=a.force,
        limits=cmp.Limits(a.max_pair_cosine, a.max_near_duplicates, a.min_effective_rank, a.min_overlap, a.max_quality_drop,
                          a.min_lift_over_popularity, a.min_lift_over_random),
    )  # fmt: skip
    return RebuildConfig(
        compare=compare,
        checkpoint=a.checkpoint, catalog=a.catalog, users=users, registry=a.registry, address=a.address,
        num_workers=a.num_workers, cpus_per_worker=a.cpus_per_worker, num_gpus_per_worker=a.num_gpus_per_worker,
        resources_per_worker=tuple(a.resources_per_worker), batch_size=a.batch_size, torch_threads=a.torch_threads,
        faiss_threads=a.faiss_threads, index=IndexOptions(kind=a.index, target_recall=a.target_recall, layout=a.layout,
        memory_budget=a.memory_budget, shards=a.shards, nlist=a.nlist),
        timeout_s=a.timeout_s, wait_for_min_actors_s=a.wait_for_min_actors_s, force_unchecked=a.force_unchecked,
        skip_resource_check=a.skip_resource_check, precision=a.precision, nice=a.nice, resume=a.resume, scratch=a.scratch,
        max_workers=a.max_workers,
    )  # fmt: skip
