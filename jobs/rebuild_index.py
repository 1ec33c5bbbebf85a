"""Rebuild the ANN index with ONE frozen model package over the whole catalog, validate it, publish it.

  python -m jobs.rebuild_index --package packages/<family>-XXXX \\
      --catalog data/catalog --users data/users --registry registry

  ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
      python -m jobs.rebuild_index --package $PWD/packages/... --catalog $PWD/data/catalog ...

The embedding is ONE Ray Data execution (jobs.embed_data) on an actor pool that Ray restarts and resizes: a
lost actor or node costs retries of its partitions, not the rebuild. Nothing is published unless every gate
passes: one checkpoint version on every row, row counts equal to the inputs', unique ids, finite vectors,
held-out recall@k >= the target at the lower end of its one-sided 95% interval, and the comparison gate: a
quality floor on held-out data (Recall@k against popularity and random rankings; a first build too)
and, when a build is live, the comparison with it: embedding health, top-k overlap, held-out quality
(core.quality.compare). A build the comparison refuses is committed but not published (canary it, or rebuild with --force). Exit code 0 = published,
2 = refused (bad input, failed gate, --timeout-s passed), 1 = unexpected error. CURRENT is untouched on
any failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import signal
import time
from pathlib import Path

import ray

from core.ann import index as ann
from core.contract.spec import ContractError
from core.quality import compare as cmp
from core.quality import skew_gate
from core.rebuild import assemble as asm
from core.rebuild.bucket_parts import BucketParts, parts_url
from core.rebuild.build import (
    CompareOptions,
    ComparisonRefused,
    IndexOptions,
    Inputs,
    ResumeRefused,
    build_and_publish,
    check_resume,
    embed_settings,
    new_build_id,
    preflight,
    resume_record,
)
from core.rebuild.embed import PRECISIONS
from core.rebuild.validate import ValidationError
from core.serving.sidecar import fold_into_base
from core.storage.build_dir import BuildDir
from core.storage.datasets import DatasetError, is_dataset
from core.storage.fsutil import write_json_atomic
from core.storage.registry import Registry
from core.storage.store import location
from jobs import embed_data
from jobs.common import lower_priority, run_main
from jobs.worker_pool import RayPool

log = logging.getLogger("skewless.rebuild")


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


def bucket_staged(cfg: RebuildConfig, registry: Registry) -> bool:
    """An object-store registry without a --scratch every pool node sees: the embedding commits its
    parts to the bucket (core.rebuild.bucket_parts) and the assembly runs on the driver's node, whose
    disk holds the staged build until it is uploaded."""
    return registry.remote and cfg.scratch is None


def drop_parts(bucket: BucketParts | None) -> None:
    """The bucket's staged parts of a build that is committed or refused (a resume has no use for them)."""
    if bucket is not None:
        try:
            bucket.delete()
        except Exception as e:  # noqa: BLE001 - housekeeping: `jobs.registry gc` removes them later
            log.warning("could not delete the staged parts under %s: %s", bucket.url, e)


def check_home_node(cfg: RebuildConfig, home: str, nodes: list[dict]) -> None:
    """The assembly pool of a bucket-staged rebuild must fit on the driver's node: fail now, naming
    it, rather than after --wait-for-min-actors-s."""
    if cfg.skip_resource_check:
        return
    have = next((n.get("Resources", {}).get("CPU", 0) for n in nodes if n.get("NodeID") == home), 0)
    need = cfg.num_workers * cfg.cpus_per_worker
    if have < need:
        raise RuntimeError(
            f"an object-store rebuild without --scratch assembles on the driver's node, which has {have:g} "
            f"CPUs; its {cfg.num_workers} assembly workers need {need:g}. Place the driver on a larger node "
            "(`ray job submit --entrypoint-num-cpus N` or --entrypoint-resources), lower --num-workers/"
            "--cpus-per-worker, or give every node one --scratch directory."
        )


def check_resources(cfg: RebuildConfig, cluster: dict) -> None:
    """Fail fast, naming what is missing, instead of hanging until --wait-for-min-actors-s: a pool
    that cannot be placed waits."""
    if cfg.skip_resource_check:
        return
    need = {"CPU": cfg.num_workers * cfg.cpus_per_worker}
    if cfg.num_gpus_per_worker:
        need["GPU"] = cfg.num_workers * cfg.num_gpus_per_worker
    for name, amount in cfg.resources_per_worker:
        need[name] = need.get(name, 0) + cfg.num_workers * amount
    short = {k: (v, cluster.get(k, 0)) for k, v in need.items() if cluster.get(k, 0) < v}
    if short:
        detail = ", ".join(f"{k}: needs {v:g}, cluster has {h:g}" for k, (v, h) in short.items())
        raise RuntimeError(
            f"the worker pool ({cfg.num_workers} workers) cannot be placed on this cluster ({detail}). Lower "
            "--num-workers/--cpus-per-worker, or pass --skip-resource-check on an autoscaling cluster that "
            "will grow."
        )


def pool_options(cfg: RebuildConfig) -> embed_data.PoolOptions:
    return embed_data.PoolOptions(
        min_workers=cfg.num_workers,
        max_workers=max(cfg.max_workers, cfg.num_workers),
        cpus_per_worker=cfg.cpus_per_worker,
        gpus_per_worker=cfg.num_gpus_per_worker,
        resources=cfg.resources_per_worker,
        threads=cfg.torch_threads,
        nice=cfg.nice,
        wait_for_min_actors_s=cfg.wait_for_min_actors_s,
    )


def _staging(cfg: RebuildConfig, registry: Registry, inputs: Inputs, settings) -> tuple[str, Path]:
    """A new staging directory, or (--resume) the staged one, checked against what this run embeds."""
    record = resume_record(inputs, settings)
    if cfg.resume is None:
        build_id = new_build_id(inputs.package.version)
        staging = registry.staging(build_id)
        write_json_atomic(BuildDir(staging).resume_path, record)
        return build_id, staging
    staging = registry.resume_staging(cfg.resume)
    try:
        staged = json.loads(BuildDir(staging).resume_path.read_text())
    except (OSError, ValueError) as e:
        raise ResumeRefused(
            f"cannot resume {cfg.resume}: its staging directory has no readable record ({e})"
        ) from e
    check_resume(staged, record, cfg.resume)
    return cfg.resume, staging


def rebuild(cfg: RebuildConfig, on_phase=None) -> dict:
    phase = on_phase or (lambda _n: None)
    t_start = time.perf_counter()
    inputs: Inputs = preflight(cfg.checkpoint, cfg.catalog, cfg.users)
    ck = inputs.package
    gate = skew_gate.publish_gate(cfg.registry, ck.family, ck.version, cfg.force_unchecked)
    registry = Registry(cfg.registry, scratch=cfg.scratch)
    expected_seq = registry.pointer().seq
    settings = embed_settings(ck, cfg.precision, cfg.batch_size)
    build_id, staging = _staging(cfg, registry, inputs, settings)
    print(
        f"rebuild {build_id}{' (resumed)' if cfg.resume else ''}: package {ck.version}, "
        f"{inputs.catalog_manifest['row_count']:,} items in {len(inputs.catalog_files)} partitions, "
        f"registry {cfg.registry} (seq {expected_seq})",
        flush=True,
    )
    home, bucket = None, None  # set when the parts go through the bucket (bucket_staged)
    try:
        ray.init(address=cfg.address, log_to_driver=True)
        lower_priority(cfg.nice)  # after ray.init: a local Ray it starts must not inherit the driver's nice
        check_resources(cfg, ray.cluster_resources())
        if bucket_staged(cfg, registry):
            home = ray.get_runtime_context().get_node_id()
            check_home_node(cfg, home, ray.nodes())
            bucket = BucketParts(parts_url(cfg.registry, build_id))
            print(f"no shared staging: parts are committed to {bucket.url}; the assembly runs on this node "
                  f"({home[:12]})", flush=True)  # fmt: skip
        embed = embed_data.EmbedRun(cfg.checkpoint, BuildDir(staging).parts_dir, settings, pool_options(cfg),
                                    bucket=bucket and bucket.url, home_node=home)  # fmt: skip
        run_info = {
            "num_workers": cfg.num_workers,
            "max_workers": cfg.max_workers or cfg.num_workers,
            "cpus_per_worker": cfg.cpus_per_worker,
            "num_gpus_per_worker": cfg.num_gpus_per_worker,
            "resources_per_worker": dict(cfg.resources_per_worker),
            "batch_size": cfg.batch_size,
            "torch_threads": cfg.torch_threads,
            "precision": cfg.precision,
            "faiss_threads": cfg.faiss_threads,
            "nice": cfg.nice,
            "resumed": cfg.resume is not None,
            "ray_version": ray.__version__,
            "skew_gate": gate,
        }
        pools: list[RayPool] = []
        timings: dict = {}

        def start_pool() -> RayPool:  # after the embedding: its actors have given their CPUs back
            pools.append(RayPool(cfg, node=home))
            print(f"assembly: {pools[0].size} workers on {len(set(pools[0].nodes()))} node(s)", flush=True)
            return pools[0]

        print(
            f"embedding on Ray Data: {cfg.num_workers}"
            + (f"-{cfg.max_workers}" if cfg.max_workers > cfg.num_workers else "")
            + f" actor(s) x {cfg.cpus_per_worker:g} CPU"
            + (f" x {cfg.num_gpus_per_worker:g} GPU" if cfg.num_gpus_per_worker else ""),
            flush=True,
        )
        try:
            manifest = build_and_publish(
                inputs, embed, start_pool, registry, staging, build_id, expected_seq, cfg.index, settings, timings,
                run_info, on_phase=phase, progress=lambda m: print(m, flush=True), share=ray.put, compare=cfg.compare,
                parts_bucket=bucket,
            )  # fmt: skip
        finally:
            for p in pools:
                p.close()
        drop_parts(bucket)
    except ComparisonRefused as e:  # committed, not live: the operator may canary it
        drop_parts(bucket)
        summary = {"build_id": e.build_id, "checkpoint_version": ck.version, "published": False,
                   "committed": True, "comparison": e.comparison}  # fmt: skip
        print("SUMMARY " + json.dumps(summary), flush=True)
        raise
    except (ValidationError, DatasetError, ContractError):
        # a refused build (a gate, a dataset, or data that breaks the package's declared inputs): resuming cannot change the verdict, so nothing of it is kept
        shutil.rmtree(staging, ignore_errors=True)
        drop_parts(bucket)
        raise
    except (
        ray.exceptions.RayError
    ) as e:  # what Ray could not recover from (retries spent, a lost driver node)
        cause = (str(e).strip().splitlines() or [""])[0][:300]
        raise RuntimeError(
            f"rebuild {build_id} stopped: {type(e).__name__}: {cause}; committed partitions are kept, resume "
            f"it with --resume {build_id}"
        ) from None
    except BaseException:
        if staging.exists():  # interrupted (timeout, error): the committed partitions stay for --resume
            print(f"rebuild {build_id} stopped; resume it with --resume {build_id}", flush=True)
        raise
    # Published: the sidecar's entries this catalog already serves leave the log (archived), which
    # frees their slots under the cap. A failure here leaves the log as it was (`jobs.registry
    # sidecar-fold` redoes it); it never un-publishes the build.
    try:
        folded = fold_into_base(
            cfg.registry,
            build_id,
            inputs.catalog_files,
            inputs.package.manifest.item_id,
            inputs.package.item_inputs,
        )
    except Exception as e:  # noqa: BLE001 - the build is live; folding is housekeeping
        log.error(
            "build %s is live but folding the sidecar into it failed: %s: %s", build_id, type(e).__name__, e
        )
        folded = {"error": f"{type(e).__name__}: {e}"}
    phase("sidecar_folded")
    total = time.perf_counter() - t_start
    n = manifest.catalog.row_count
    summary = {
        "build_id": build_id,
        "checkpoint_version": ck.version,
        "items": n,
        "users": manifest.homogeneity["user_rows"],
        "seconds": round(total, 2),
        "items_per_s": round((n + manifest.homogeneity["user_rows"]) / max(timings["embed_s"], 1e-9), 1),
        "index": manifest.index.factory,
        "search_params": manifest.index.search_params,
        "recall_at_10": manifest.quality["recall_at_k"],
        "recall_at_10_lower_95": manifest.quality["recall_lower_95"],
        "timings": timings,
        "layout": manifest.index.layout,
        "shards": len(manifest.index.shards),
        "parts": manifest.parts,
        "embedding": manifest.run.get("embedding"),
        "published": True,
        "sidecar": folded,
        "comparison": _brief(manifest.comparison),
    }
    print(
        f"published {build_id}: {n:,} items in {total:.1f}s ({summary['items_per_s']:,.0f} rows/s embedding), "
        f"index {summary['index']} {summary['search_params']}, held-out recall@10 {summary['recall_at_10']:.4f} (95% lower bound {summary['recall_at_10_lower_95']:.4f}), "
        f"package {ck.version}"
    )
    print("SUMMARY " + json.dumps(summary), flush=True)
    return summary


def _brief(c: dict | None) -> dict | None:
    """The comparison's headline numbers for the summary line (the manifest has all of it): what was
    checked, and what was not and why."""
    if not c or "skipped" in c:
        return c
    f = c.get("quality_floor") or {}
    floor = ({k: f.get(k) for k in ("recall_at_k", "popularity_recall_at_k", "random_recall_at_k",
                                    "lift_over_popularity", "lift_over_random", "users")}
             if f.get("checked") else f"not checked, {f.get('why')}")  # fmt: skip
    out = {"passed": c["passed"], "forced": c["forced"], "checked": c["checked"], "quality_floor": floor}
    if c["base"] is None:
        return {"against": None, "not_compared": c["not_compared"], **out}
    h, q = c["new"]["health"], c.get("quality") or {}
    return {"against": c["base"]["build_id"], "overlap_at_k": c["overlap_at_k"], **out,
            "mean_pair_cosine": h["mean_pair_cosine"], "effective_rank": h["effective_rank"],
            "near_duplicate_share": h["near_duplicate_share"], "recall_new": q.get("recall_at_k_new"),
            "recall_live": q.get("recall_at_k_base"), "relative_drop": q.get("relative_drop")}  # fmt: skip


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


def parse(argv: list[str] | None) -> RebuildConfig:
    d, ix = RebuildConfig, IndexOptions  # the one source of defaults
    p = argparse.ArgumentParser(
        prog="python -m jobs.rebuild_index", description=__doc__, formatter_class=_HelpFormatter
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
        help="with an s3:// or gs:// --registry: the directory the build is staged in before its upload "
        "(partitions, tables, shards), which every node of the pools must see (a shared file system); "
        "without it the build is staged on this node's disk (SKEWLESS_CACHE_DIR) and the pools run here",
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


def main(argv: list[str] | None = None, on_phase=None) -> int:
    cfg = parse(argv)

    def timeout(signum, frame):
        raise TimeoutError(f"rebuild exceeded --timeout-s {cfg.timeout_s:g}; nothing was published")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.setitimer(signal.ITIMER_REAL, cfg.timeout_s)
    try:
        rebuild(cfg, on_phase=on_phase)
    finally:  # main may run in a longer-lived process (tests): leave no alarm behind
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return 0


if __name__ == "__main__":
    run_main(main)
