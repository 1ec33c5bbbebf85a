"""The Ray-free half of an index rebuild: checks before embedding, then gates, index, publish.

    preflight()  -> verify checkpoint, catalog/users datasets, schemas, columns, counts
    (jobs.rebuild_index embeds catalog and users into the staging directory with Ray Data)
    finalize()   -> read embeddings back, gate, build + tune the index, write, commit, publish

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
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from core import index as ann
from core.build_dir import BuildDir, BuildManifest, CheckpointRef, DatasetRef, IndexInfo, now_iso
from core.checkpoint import Checkpoint, load_checkpoint
from core.datasets import DatasetError, partition_files, read_dataset_manifest
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


def _query_sample(
    user_x: np.ndarray | None, item_x: np.ndarray, n: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tuning and held-out query sets, disjoint: user embeddings (real queries) when there are users,
    otherwise item vectors."""
    pool = user_x if user_x is not None and len(user_x) >= 20 else item_x
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    half = len(pick) // 2
    return pool[pick[:half]], pool[pick[half:]]


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
    xq_tune, xq_hold = _query_sample(user_x, xb, opts.max_queries, opts.seed)
    idx, spec, quality, t_idx = ann.build_tuned(
        xb, item_ids, xq_tune, xq_hold, opts.k, opts.target_recall, opts.kind, seed=opts.seed
    )
    timings.update(t_idx)
    # choosing the setting: exact search of the query sets + the recall sweeps (+ QPS timings if measured)
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
            f"index {spec.factory}: held-out recall@{opts.k} {quality['recall_at_k']:.4f} is below the target "
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
