"""The Ray-free half of an index rebuild: checks before embedding, then gates, index, publish.

    preflight()  -> verify checkpoint, catalog/users datasets, schemas, columns, counts
    (jobs.rebuild_index embeds catalog and users into the staging directory with Ray Data)
    finalize()   -> read embeddings back, gate, build + tune the index on user-tower queries (the
                    users', else sampled histories'), write, commit, publish

`on_phase(name)` is called after each step; tests use it to crash the process at known points.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from core import index as ann
from core.build_dir import BuildDir, BuildManifest, CheckpointRef, DatasetRef, IndexInfo, now_iso
from core.checkpoint import Checkpoint, load_checkpoint
from core.datasets import DatasetError, partition_files, read_dataset_manifest
from core.embed import user_vectors
from core.features import (
    ITEM_FEATURE_COLUMNS,
    USER_FEATURE_COLUMNS,
    FeatureSchema,
    check_columns,
    schema_diff,
)
from core.fsutil import commit_dir
from core.registry import Registry
from core.validate import ValidationError, check_embedded

log = logging.getLogger(__name__)

Phase = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Inputs:
    checkpoint: Checkpoint
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


def _dataset(
    path: Path, kind: str, required: tuple[str, ...], schema: FeatureSchema, version: str
) -> tuple[list[Path], dict]:
    manifest = read_dataset_manifest(path, kind)
    files = partition_files(path)
    for f in files:
        check_columns(pq.read_schema(f).names, required, f"{kind} partition {f}")
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if rows != manifest["row_count"]:
        raise DatasetError(
            f"{path}: _dataset.json says {manifest['row_count']:,} rows but the partitions hold {rows:,}"
        )
    if rows == 0:
        raise DatasetError(f"{kind} {path} is empty (0 rows); refusing to build an empty index")
    data_schema = (
        FeatureSchema.from_dict(manifest["feature_schema"]) if manifest.get("feature_schema") else None
    )
    if data_schema != schema:
        diffs = schema_diff(schema, data_schema) if data_schema else ["no feature_schema in _dataset.json"]
        raise DatasetError(
            f"feature schema mismatch: checkpoint {version} (expected) vs {kind} {path} (actual): {'; '.join(diffs)}"
        )
    return files, manifest


def preflight(checkpoint: Path, catalog: Path, users: Path | None) -> Inputs:
    """Everything that can be checked before spending compute; raises with a message naming the problem."""
    ck = load_checkpoint(checkpoint)
    cat_files, cat_m = _dataset(Path(catalog), "catalog", ITEM_FEATURE_COLUMNS, ck.schema, ck.version)
    user_files, users_m = [], None
    if users is not None:
        user_files, users_m = _dataset(Path(users), "users", USER_FEATURE_COLUMNS, ck.schema, ck.version)
    return Inputs(ck, cat_files, cat_m, user_files, users_m)


def new_build_id(version: str, clock: Callable[[], float] = time.time) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(clock()))
    return f"{stamp}-{version.rsplit('-', 1)[-1][:8]}-{uuid.uuid4().hex[:4]}"


def _read_embedded(directory: Path):
    return pads.dataset(str(directory), format="parquet").to_table()


# Fewer users than this cannot be split into tuning and held-out sets that measure recall; such a
# build tunes on sampled histories, as a build without users does.
MIN_USER_QUERIES = 20


def sample_histories(item_ids: np.ndarray, n: int, history_len: int, seed: int) -> pa.ListArray:
    """`n` synthetic histories (item ids, most recent last) drawn from the catalog with a seeded rng;
    lengths spread evenly over 1..history_len, so short and full histories are both queried. Items are
    drawn with replacement (a rare repeat only weighs that item more in the mean-pooled history)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, history_len + 1, size=n)
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.asarray(item_ids, np.int64)[rng.integers(0, len(item_ids), size=int(offsets[-1]))]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def query_sets(
    ck: Checkpoint, user_x: np.ndarray | None, item_ids: np.ndarray, n: int, seed: int
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Disjoint tuning and held-out queries, both what serving will send this index: the build's user
    embeddings, or, without users, the checkpoint's user tower over histories sampled from the catalog.
    Never item vectors: each is its own nearest neighbour, which makes recall look better than it is.
    Returns (xq_tune (T, D), xq_hold (H, D), a record of which queries these are for the manifest)."""
    if user_x is not None and len(user_x) >= MIN_USER_QUERIES:
        source = "users"
        rng = np.random.default_rng(seed)
        pool = user_x[rng.choice(len(user_x), size=min(n, len(user_x)), replace=False)]
    else:
        source = "sampled_histories"
        histories = sample_histories(item_ids, n, ck.schema.history_len, seed)
        # one user id for all: the queries differ by their histories alone
        pool = user_vectors(ck.model.user_tower, np.zeros(n, np.int64), histories, ck.schema)  # (n, D)
    half = len(pool) // 2
    return pool[:half], pool[half:], {"source": source, "tuning": half, "holdout": len(pool) - half}


def finalize(
    inputs: Inputs,
    registry: Registry,
    staging: Path,
    build_id: str,
    expected_seq: int,
    opts: IndexOptions,
    timings: dict,
    run_info: dict,
    on_phase: Phase | None = None,
) -> BuildManifest:
    """Gate, index, commit and publish a staged build; returns its manifest. Raises before anything is
    published if a gate fails (the caller then removes the staging directory)."""
    phase = on_phase or (lambda _name: None)
    ck = inputs.checkpoint
    out = BuildDir(staging)
    t0 = time.perf_counter()
    item_ids, xb = check_embedded(
        _read_embedded(out.item_parquet),
        id_name="item_id", expected_version=ck.version, expected_rows=inputs.catalog_manifest["row_count"], what="catalog",
    )  # fmt: skip
    user_x = None
    if inputs.users_manifest is not None:
        user_ids, user_x = check_embedded(
            _read_embedded(out.user_parquet),
            id_name="user_id", expected_version=ck.version, expected_rows=inputs.users_manifest["row_count"], what="users",
        )  # fmt: skip
        out.write_users(user_ids, user_x)
    timings["validate_s"] = round(time.perf_counter() - t0, 3)
    phase("validated")

    t1 = time.perf_counter()
    xq_tune, xq_hold, queries = query_sets(ck, user_x, item_ids, opts.max_queries, opts.seed)
    idx, spec, quality, t_idx = ann.build_tuned(
        xb, item_ids, xq_tune, xq_hold, opts.k, opts.target_recall, opts.kind, seed=opts.seed
    )
    quality["queries"] = queries
    timings.update(t_idx)
    # choosing the setting: the query sets (user tower if sampled), their exact search, the recall sweeps
    # (+ QPS timings if measured)
    timings["recall_s"] = round(time.perf_counter() - t1 - t_idx["index_train_s"] - t_idx["index_add_s"], 3)
    if quality["recall_at_k"] < opts.target_recall:
        last = quality["tuning_sweep"][-1]
        why = (
            f"the tuning queries reached it, but no setting up to {quality['params']} reached it on the "
            "held-out queries"
            if quality["tuning_reached_target"]
            else f"even the most accurate setting tried, {quality['params']}, reached only {last['recall']} "
            f"on the tuning queries"
        )
        raise ValidationError(
            f"index {spec.factory}: held-out recall@{opts.k} {quality['recall_at_k']:.4f} ({queries['source']} "
            f"queries) is below the target "
            f"{opts.target_recall}: {why}; not publishing (try another --index, or a lower --target-recall)"
        )
    out.write_index(idx)
    out.write_items(item_ids, xb)
    phase("index_written")

    t2 = time.perf_counter()
    # The query tower travels with the index: serving loads both from the build, as one unit.
    out.copy_checkpoint(ck.path)
    manifest = BuildManifest(
        build_id=build_id,
        created_at=now_iso(),
        checkpoint=CheckpointRef(
            version=ck.version,
            family=ck.family,
            weights_sha256=ck.manifest["weights_sha256"],
            source_path=str(ck.path.resolve()),
            embed_dim=ck.manifest["embed_dim"],
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
            "checkpoint_versions": [ck.version],
            "item_rows": int(len(item_ids)),
            "user_rows": 0 if user_x is None else int(len(user_x)),
        },
        index=IndexInfo(
            type=spec.kind,
            factory=spec.factory,
            metric="inner_product",
            dim=int(xb.shape[1]),
            ntotal=int(idx.ntotal),
            train_sample=spec.train_sample,
            search_params=quality["params"],
        ),
        quality=quality,
        timings=timings,
        skew_gate=run_info.get("skew_gate"),
        run=run_info,
        based_on_seq=expected_seq,
    )
    out.write_manifest(manifest)
    final = registry.builds / build_id
    commit_dir(staging, final)
    phase("build_committed")
    registry.publish(build_id, expected_seq, before_replace=lambda _tmp: phase("pointer_temp_written"))
    timings["publish_s"] = round(time.perf_counter() - t2, 3)
    phase("published")
    return manifest  # publish_s is in `timings` (the job prints it); the committed manifest is immutable
