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

import json
import logging
import shutil
import signal
import time
from pathlib import Path

import ray

from core.contract.spec import ContractError
from core.quality import skew_gate
from core.rebuild.bucket_parts import BucketParts, parts_url
from core.rebuild.build import (
    ComparisonRefused,
    Inputs,
    ResumeRefused,
    build_and_publish,
    check_resume,
    embed_settings,
    new_build_id,
    preflight,
    resume_record,
)
from core.rebuild.validate import ValidationError
from core.serving.sidecar import fold_into_base
from core.storage.build_dir import BuildDir
from core.storage.datasets import DatasetError
from core.storage.fsutil import write_json_atomic
from core.storage.registry import Registry
from jobs import embed_data, rebuild_args
from jobs.common import lower_priority, run_main
from jobs.rebuild_args import RebuildConfig
from jobs.worker_pool import RayPool

log = logging.getLogger("skewless.rebuild")


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
    in_bucket = bucket_staged(cfg, registry)
    if cfg.resume is None:
        build_id = new_build_id(inputs.package.version)
        staging = registry.staging(build_id)
        write_json_atomic(BuildDir(staging).resume_path, record)
        if in_bucket:  # so that any node can resume it
            BucketParts(parts_url(cfg.registry, build_id)).put_resume(record)
        return build_id, staging
    staged = BucketParts(parts_url(cfg.registry, cfg.resume)).get_resume() if in_bucket else None
    try:
        staging = registry.resume_staging(cfg.resume)
    except FileNotFoundError:
        if staged is None:
            raise
        staging = registry.staging(cfg.resume)  # stopped on another node: its parts are in the bucket
        write_json_atomic(BuildDir(staging).resume_path, staged)
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


def parse(argv: list[str] | None) -> RebuildConfig:
    return rebuild_args.parse(argv, __doc__)


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
        ray.shutdown()  # now, not at interpreter exit, where Ray Data's threads hold it up ~1 s longer
    return 0


if __name__ == "__main__":
    run_main(main)
