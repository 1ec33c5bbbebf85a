"""The Ray-free half of an index rebuild: checks before embedding, then gates, index, publish.

    preflight()          -> verify checkpoint, catalog/users datasets, schemas, columns, counts
    build_and_publish()  -> embed every partition in one run (Ray Data in jobs.embed_data; reusing
                            committed parts on --resume), then on a worker pool (core.rebuild.worker;
                            Ray actors in jobs.rebuild_index): gate, assemble and
                            tune the index (core.rebuild.assemble) on user-tower queries (the users', else
                            item mixtures'), compare with the live build (core.quality.compare), then
                            commit and publish

`on_phase(name)` is called after each step; tests use it to crash the process at known points.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from core.contract.check import check_schema
from core.contract.towers import ModelPackage, load_package
from core.quality import compare as cmp
from core.rebuild import assemble as asm
from core.rebuild import parts
from core.rebuild.queries import mix, mix_positions
from core.rebuild.validate import ValidationError
from core.serving.live_build import load_build
from core.storage.build_dir import BuildDir, BuildManifest, CheckpointRef, DatasetRef, IndexInfo, now_iso
from core.storage.datasets import DatasetError, parquet_file, partition_files, read_dataset_manifest
from core.storage.registry import Registry
from core.storage.store import location

log = logging.getLogger(__name__)

Phase = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Inputs:
    package: ModelPackage
    catalog_files: list[Path]
    catalog_manifest: dict
    user_files: list[Path]
    users_manifest: dict | None


@dataclasses.dataclass(frozen=True)
class IndexOptions:
    kind: str = "auto"
    k: int = 10
    target_recall: float = 0.95
    # split evenly into tuning and held-out queries, both of which the chosen setting must pass
    max_queries: int = 4000
    seed: int = 0
    layout: str = "auto"  # core.rebuild.assemble.LAYOUTS
    memory_budget: int = 4 << 30  # bytes one process may hold of the index (auto layout, shard size)
    shards: int = 0  # 0: from the budget and the number of workers
    nlist: int = 0  # IVF lists; 0: from the catalog size (core.ann.index.prior_spec / choose_spec)


@dataclasses.dataclass(frozen=True)
class CompareOptions:
    """The cut-over gate against the live build (core.quality.compare): on unless `enabled` is False."""

    enabled: bool = True
    limits: cmp.Limits = cmp.Limits()
    holdout: Path | None = None  # held-out interactions (user_id, item_id) for the quality comparison
    users: int = 2000  # users compared (sampled from the users dataset, else item mixtures)
    force: bool = False  # publish even if the gate refuses (recorded in the manifest)


class ComparisonRefused(ValidationError):
    """The new build is committed but not published: its numbers broke the comparison gate."""

    def __init__(self, message: str, build_id: str, comparison: dict):
        super().__init__(message)
        self.build_id, self.comparison = build_id, comparison


def _dataset(path: Path, kind: str, inputs: tuple, id_column: str) -> tuple[list[Path], dict]:
    """A dataset's manifest, partitions and row count, and every partition's columns and types against
    the tower's declared inputs (footers only: the values are validated where they are embedded)."""
    manifest = read_dataset_manifest(path, kind)
    files = partition_files(path)
    rows = 0
    for f in files:
        pf = parquet_file(f)  # the footer only
        check_schema(pf.schema_arrow, inputs, id_column, f"{kind} partition {f}")
        rows += pf.metadata.num_rows
    if rows != manifest["row_count"]:
        raise DatasetError(
            f"{path}: _dataset.json says {manifest['row_count']:,} rows but the partitions hold {rows:,}"
        )
    if rows == 0:
        raise DatasetError(f"{kind} {path} is empty (0 rows); refusing to build an empty index")
    return files, manifest


def preflight(package: Path, catalog: Path, users: Path | None) -> Inputs:
    """Everything that can be checked before spending compute; raises with a message naming the problem."""
    m = load_package(package)
    mf = m.manifest
    cat_files, cat_m = _dataset(location(catalog), "catalog", m.item_inputs, mf.item_id)
    user_files, users_m = [], None
    if users is not None:
        user_files, users_m = _dataset(location(users), "users", m.user_inputs, mf.user_id)
    return Inputs(m, cat_files, cat_m, user_files, users_m)


def new_build_id(version: str, clock: Callable[[], float] = time.time) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(clock()))
    return f"{stamp}-{version.rsplit('-', 1)[-1][:8]}-{uuid.uuid4().hex[:4]}"


# Fewer users than this cannot be split into tuning and held-out sets that measure recall; such a
# build tunes on item mixtures, as a build without users does.
MIN_USER_QUERIES = 20


def query_sets(user_x: np.ndarray | None, item_x, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Disjoint tuning and held-out queries, both what serving will send this index: the build's user
    embeddings, or, without users, mixtures of a few items' vectors. Never one item's own vector: each
    is its own nearest neighbour, which makes recall look better than it is.
    Returns (xq_tune (T, D), xq_hold (H, D), a record of which queries these are for the manifest)."""
    if user_x is not None and len(user_x) >= MIN_USER_QUERIES:
        source = "users"
        rng = np.random.default_rng(seed)
        pool = user_x[rng.choice(len(user_x), size=min(n, len(user_x)), replace=False)]
    else:
        source = "item_mixtures"
        positions, offsets = mix_positions(len(item_x), n, seed)
        pool = mix(item_x[positions], offsets)  # (n, D)
    half = len(pool) // 2
    return pool[:half], pool[half:], {"source": source, "tuning": half, "holdout": len(pool) - half}


def embed_settings(m: ModelPackage, precision: str, batch_size: int) -> parts.EmbedSettings:
    return parts.EmbedSettings(m.version, m.content_sha256, precision, batch_size)


def resume_record(inputs: Inputs, settings: parts.EmbedSettings) -> dict:
    """What a staged build's parts were embedded from; a resume must match it exactly."""

    def ds(m: dict | None, files: list[Path]) -> dict | None:
        if m is None:
            return None
        return {
            "fingerprint": m["fingerprint"],
            "row_count": m["row_count"],
            "partitions": [str(f) for f in files],
        }

    return {
        "checkpoint": {"version": settings.checkpoint_version, "weights_sha256": settings.weights_sha256,
                       "path": str(inputs.package.path.resolve())},
        "embedding": {"precision": settings.precision, "batch_size": settings.batch_size},
        "catalog": ds(inputs.catalog_manifest, inputs.catalog_files),
        "users": ds(inputs.users_manifest, inputs.user_files),
    }  # fmt: skip


class ResumeRefused(ValueError):
    """A staged build was embedded from other inputs than the resumed run's."""


def check_resume(staged: dict, now: dict, build_id: str) -> None:
    """Refuse, naming every difference, unless the resumed run embeds exactly what was staged."""
    diffs = []
    for section in ("checkpoint", "embedding", "catalog", "users"):
        a, b = staged.get(section), now.get(section)
        if (a is None) != (b is None):
            diffs.append(
                f"{section}: staged {'none' if a is None else 'present'}, now {'none' if b is None else 'present'}"
            )
            continue
        for key in sorted(set(a or {}) | set(b or {})):
            if key != "path" and (a or {}).get(key) != (b or {}).get(key):
                diffs.append(f"{section} {key}: staged {(a or {}).get(key)!r}, now {(b or {}).get(key)!r}")
    if diffs:
        raise ResumeRefused(
            f"cannot resume {build_id}: its committed partitions were embedded from other inputs ("
            + "; ".join(diffs)
            + "). Start a new rebuild (without --resume)."
        )


def build_and_publish(
    inputs: Inputs,
    embed_parts: Callable,
    start_pool: Callable,
    registry: Registry,
    staging: Path,
    build_id: str,
    expected_seq: int,
    opts: IndexOptions,
    settings: parts.EmbedSettings,
    timings: dict,
    run_info: dict,
    on_phase: Phase | None = None,
    progress: Callable[[str], None] = print,
    share: Callable = lambda obj: obj,
    compare: CompareOptions = CompareOptions(),
    parts_bucket=None,
) -> BuildManifest:
    """Embed (reusing committed parts), gate, assemble, tune, commit and publish; returns the manifest.
    Raises before anything is published if a gate fails. `embed_parts`: part tasks -> their committed
    records (core.rebuild.assemble.embed_all; its `stats`, if it has them, go into the manifest's `run`);
    `start_pool`: starts the assembly workers (core.rebuild.worker.Pool) once the embedding is done,
    so that they never compete with it for the cluster; `share`: puts a large
    argument where every worker reads it once (Ray's object store; identity in-process);
    `parts_bucket`: where the embedding commits its parts when the nodes share no file system
    (core.rebuild.bucket_parts.BucketParts)."""
    phase = on_phase or (lambda _name: None)
    ck = inputs.package
    out = BuildDir(staging)
    tasks = parts.plan("items", inputs.catalog_files) + parts.plan("users", inputs.user_files)
    t0 = time.perf_counter()
    emb = asm.embed_all(embed_parts, tasks, out.parts_dir, settings, progress, phase, parts_bucket)
    timings["embed_s"] = round(time.perf_counter() - t0, 3)
    run_info["embedding"] = getattr(embed_parts, "stats", None)
    phase("embedded")
    t0 = time.perf_counter()
    pool = start_pool()
    timings["pool_start_s"] = round(time.perf_counter() - t0, 3)
    item_recs, user_recs = emb.of(tasks, "items"), emb.of(tasks, "users")
    asm.check_rows(item_recs, inputs.catalog_manifest["row_count"], "catalog")
    if inputs.users_manifest is not None:
        asm.check_rows(user_recs, inputs.users_manifest["row_count"], "users")
    versions = sorted({r["checkpoint_version"] for r in item_recs + user_recs})
    d = next(r["dim"] for r in item_recs if r["rows"])
    n = inputs.catalog_manifest["row_count"]

    t1 = time.perf_counter()
    plan = asm.plan_index(
        n, d, opts.kind, opts.layout, opts.memory_budget, opts.shards, pool.size, opts.nlist
    )
    item_plans = asm.plan_tables(pool, out.parts_dir, item_recs, plan.shards if not plan.small else pool.size)
    user_x = None
    if user_recs:
        user_plans = asm.plan_tables(pool, out.parts_dir, user_recs, pool.size)
        asm.write_table(pool, out, "users", user_plans, ck.version, d, progress)
        user_x = np.load(out.table_files("users")[1], mmap_mode="r")  # the queries read a few rows of it
    timings["users_table_s"] = round(time.perf_counter() - t1, 3)
    xq_tune, xq_hold, queries = query_sets(
        user_x, asm.GlobalRows(out.parts_dir, item_recs, "vectors"), opts.max_queries, opts.seed
    )
    quality, shard_recs = asm.build_index(
        pool, out, plan, item_recs, item_plans, ck.version, xq_tune, xq_hold, opts, share, progress, timings
    )
    spec = quality.pop("spec")
    quality["queries"] = queries
    phase("validated")  # every gate but the recall gate has passed on every part and every shard
    if quality["recall_lower_95"] < opts.target_recall:
        last = quality["tuning_sweep"][-1]
        why = (
            f"the tuning queries reached it, but no setting up to {quality['params']} reached it on the "
            "held-out queries"
            if quality["tuning_reached_target"]
            else f"even the most accurate setting tried, {quality['params']}, reached only {last['recall']} "
            f"on the tuning queries"
        )
        raise ValidationError(
            f"index {spec.factory}: held-out recall@{opts.k} {quality['recall_at_k']:.4f} (95% lower bound "
            f"{quality['recall_lower_95']:.4f} over {queries['holdout']} {queries['source']} queries) is below the target "
            f"{opts.target_recall}: {why}; not publishing (try another --index, or a lower --target-recall)"
        )
    phase("index_written")

    t2 = time.perf_counter()
    shutil.rmtree(out.parts_dir)  # the tables hold every vector now; a crash from here re-embeds on resume
    out.resume_path.unlink(missing_ok=True)
    # The model package travels with the index: serving loads both from the build, as one unit.
    out.copy_checkpoint(ck.path)
    manifest = BuildManifest(
        build_id=build_id,
        created_at=now_iso(),
        checkpoint=CheckpointRef(
            version=ck.version,
            family=ck.family,
            weights_sha256=ck.content_sha256,
            source_path=str(ck.path.resolve()),
            embed_dim=ck.dim,
        ),
        catalog=DatasetRef(
            fingerprint=inputs.catalog_manifest["fingerprint"],
            row_count=inputs.catalog_manifest["row_count"],
            partitions=len(inputs.catalog_files),
            path=str(inputs.catalog_files[0].parent.resolve()),
        ),
        users=None
        if inputs.users_manifest is None
        else DatasetRef(
            fingerprint=inputs.users_manifest["fingerprint"],
            row_count=inputs.users_manifest["row_count"],
            partitions=len(inputs.user_files),
            path=str(inputs.user_files[0].parent.resolve()),
        ),
        homogeneity={
            "checkpoint_versions": versions,
            "item_rows": int(sum(r["rows"] for r in item_recs)),
            "user_rows": int(sum(r["rows"] for r in user_recs)),
        },
        index=IndexInfo(
            type=spec.kind,
            factory=spec.factory,
            metric="inner_product",
            dim=int(d),
            ntotal=int(n),
            train_sample=spec.train_sample,
            kmeans_iters=spec.kmeans_iters,
            refit=spec.refit,
            search_params=quality["params"],
            layout=plan.layout,
            shards=tuple(shard_recs),
        ),
        quality=quality,
        timings=timings,
        skew_gate=run_info.get("skew_gate"),
        run=run_info,
        based_on_seq=expected_seq,
        parts={
            "items": len(item_recs),
            "users": len(user_recs),
            "embedded": emb.embedded,
            "reused": emb.reused,
            "nodes": sorted({r["node"] for r in emb.records.values()}),
        },  # fmt: skip
    )
    out.write_manifest(manifest)
    refusal = None
    if compare.enabled:
        t3 = time.perf_counter()
        manifest, refusal = _compare_gate(registry, out, manifest, inputs, compare, opts, progress)
        timings["compare_s"] = round(time.perf_counter() - t3, 3)
        out.write_manifest(manifest)
        phase("compared")
    else:  # said, so that a summary without numbers is not read as a pass
        manifest = dataclasses.replace(manifest, comparison={"skipped": NOT_COMPARED})
        out.write_manifest(manifest)
        progress(NOT_COMPARED)
    t_commit = time.perf_counter()

    def uploaded(line: str) -> None:
        progress(line)
        phase("file_uploaded")

    registry.commit(staging, build_id, uploaded)  # visible from here on: renamed into place, or uploaded
    timings["commit_s"] = round(time.perf_counter() - t_commit, 3)
    phase("build_committed")
    if refusal is not None:
        c = manifest.comparison
        raise ComparisonRefused(
            f"build {build_id} is not published: "
            + (f"against live build {c['base']['build_id']}, " if c["base"] else f"({c['not_compared']}) ")
            + "; ".join(refusal)
            + f". It is committed (not live): `python -m jobs.registry canary {build_id} --percent 10` ramps "
            "it in for a share of users, `jobs.registry diff` shows the numbers; or rebuild with --force.",
            build_id,
            manifest.comparison,
        )
    registry.publish(build_id, expected_seq, before_replace=lambda _tmp: phase("pointer_temp_written"))
    timings["publish_s"] = round(time.perf_counter() - t2, 3)
    phase("published")
    return manifest  # publish_s is in `timings` (the job prints it); the committed manifest is immutable


def comparison_users(inputs: Inputs, compare: CompareOptions, item_ids, seed: int) -> cmp.EvalUsers:
    """Who both builds are asked about: users of the users dataset (with their held-out items when
    given), else item mixtures, the same items in both builds."""
    m = inputs.package
    if inputs.user_files:
        cols = [s.name for s in m.user_inputs]
        return cmp.eval_users(inputs.user_files[0].parent, compare.holdout, cols, m.manifest.user_id,
                              compare.users, seed)  # fmt: skip
    return cmp.mixture_users(np.asarray(item_ids), compare.users, seed)


NOT_COMPARED = "--no-compare: not compared with the live build, quality floor not checked"


def _floor(inputs: Inputs, new, users: cmp.EvalUsers, k: int) -> dict:
    """The quality floor of the new build (core.quality.compare.quality_floor), popularity counted from the
    users dataset's seen items; not checked without held-out data."""
    popularity = None
    if users.relevant is not None and inputs.user_files:
        popularity = cmp.item_popularity(inputs.user_files[0].parent)
    return cmp.quality_floor(new, users, popularity, k)


def _compare_gate(registry: Registry, out: BuildDir, manifest: BuildManifest, inputs: Inputs,
                  compare: CompareOptions, opts: IndexOptions, progress) -> tuple[BuildManifest, list | None]:  # fmt: skip
    """The comparison gate: the quality floor (needs no live build, so a first build is judged too),
    then the comparison with the live build when there is one; returns the manifest with its results
    and, if refused (and not forced), the reasons."""
    new = load_build(out.root, mmap=True)  # its own manifest and checkpoint copy: what serving will load
    users = comparison_users(inputs, compare, new.item_ids, opts.seed)
    floor = _floor(inputs, new, users, opts.k)
    progress(cmp.floor_line(floor))
    result, why = _compare_with_live(registry, new, users, compare, opts, progress)
    why = cmp.judge_floor(floor, compare.limits) + why
    # what was judged, so that a pass with nothing checked does not read as a pass on the numbers
    checked = (["quality floor"] if floor["checked"] else []) + (["live build"] if result["base"] else [])
    result.update(quality_floor=floor, limits=dataclasses.asdict(compare.limits), checked=checked,
                  passed=not why, refused_for=why, forced=bool(why) and compare.force)  # fmt: skip
    verdict = "PASSED" if not why else "REFUSED, published anyway (--force)" if compare.force else "REFUSED"
    progress(f"comparison gate: {verdict} (checked: {', '.join(checked) or 'nothing'})")
    return dataclasses.replace(manifest, comparison=result), (why if why and not compare.force else None)


def _compare_with_live(registry: Registry, new, users: cmp.EvalUsers, compare: CompareOptions,
                       opts: IndexOptions, progress) -> tuple[dict, list]:  # fmt: skip
    """The numbers of the new build against the live one and the limits they break; with no live
    build (or one that cannot be loaded) the record says what was not compared, and why."""
    live_id = registry.current()
    try:
        base = load_build(registry.build_dir(live_id), mmap=True) if live_id else None
        not_compared = "no live build"
    except Exception as e:  # noqa: BLE001 - serving refuses it too: nothing to compare with
        base, not_compared = None, f"live build {live_id} cannot be loaded ({e})"
    if base is None:
        progress(f"not compared with a live build: {not_compared}")
        return {"base": None, "not_compared": not_compared, "k": opts.k,
                "new": {"build_id": new.build_id, "checkpoint_version": new.checkpoint_version},
                "users": {**users.source, "compared": len(users.user_ids)}}, []  # fmt: skip
    result = cmp.compare(base, new, users, opts.k)
    h, q = result["new"]["health"], result.get("quality")
    progress(
        f"compared with live build {live_id}: overlap@{opts.k} {result['overlap_at_k']}, mean pair cosine "
        f"{h['mean_pair_cosine']}, near-duplicates {h['near_duplicate_share']:.1%}, effective rank "
        f"{h['effective_rank']}"
        + (f", held-out Recall@{opts.k} {q['recall_at_k_new']} vs {q['recall_at_k_base']}" if q else "")
    )
    return result, cmp.judge(result, compare.limits)
