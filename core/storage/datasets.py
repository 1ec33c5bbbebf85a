"""Partitioned parquet datasets with a self-describing `_dataset.json`.

A dataset directory holds `part-NNNNN.parquet` files (what Ray Data maps over) and `_dataset.json`:
kind, row count, columns, source, and a fingerprint of the partition files' bytes. It is staged
in a temp directory and renamed into place, so a reader never sees a half-written dataset. On an
object store (s3://, gs://) the partitions are uploaded first and `_dataset.json` last, create-only
(core.storage.remote_trees): without it there is no dataset. The readers here take a local Path or
a Uri and read partitions in place, through pyarrow's file system for the bucket.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from core.storage.fsutil import commit_dir, sha256_file, staging_dir
from core.storage.remote_trees import upload_tree
from core.storage.store import Uri, arrow_path, location, open_store

DATASET_MANIFEST = "_dataset.json"
# An optional list column of a users dataset: the items each user has already seen, left out of their
# top-k when a build is evaluated (comparison gate, skew check). Not a tower input.
SEEN_COLUMN = "seen_item_ids"


class DatasetError(ValueError):
    pass


def part_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def write_dataset(
    final: Path,
    parts: Iterable[pa.Table],
    *,
    kind: str,
    source: dict,
    overwrite: bool = False,
) -> dict:
    """Write each table of `parts` as one partition file, then the manifest, then rename into place
    (to an s3:// or gs:// `final`: staged in a local temp directory, then uploaded, manifest last).
    Memory stays bounded by one part: `parts` may be a generator."""
    final = location(final)
    if isinstance(final, Uri):
        with tempfile.TemporaryDirectory(prefix="dataset-") as d:
            manifest = write_dataset(Path(d) / "ds", parts, kind=kind, source=source)
            _upload(Path(d) / "ds", final, overwrite)
        return manifest
    tmp = staging_dir(final)
    n_rows, arrow_schema = 0, None
    try:
        for i, table in enumerate(parts):
            pq.write_table(table, tmp / part_name(i), compression="zstd", row_group_size=65536)
            n_rows += table.num_rows
            arrow_schema = arrow_schema or table.schema
        files = sorted(p.name for p in tmp.glob("part-*.parquet"))
        manifest = {
            "kind": kind,
            "row_count": n_rows,
            "num_partitions": len(files),
            "columns": [] if arrow_schema is None else arrow_schema.names,
            "fingerprint": fingerprint_files([tmp / f for f in files]),
            "source": source,
        }
        (tmp / DATASET_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if final.exists():
            if not overwrite:
                raise DatasetError(f"{final} already exists; pass overwrite to replace it")
            # Replace by rename-aside: the old copy stays whole until the new one is in place.
            aside = final.with_name(f".old-{final.name}")
            shutil.rmtree(aside, ignore_errors=True)
            final.rename(aside)
            commit_dir(tmp, final)
            shutil.rmtree(aside)
        else:
            commit_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _upload(local: Path, final: Uri, overwrite: bool) -> None:
    store = open_store(final)
    if store.exists(DATASET_MANIFEST):
        if not overwrite:
            raise DatasetError(f"{final} already exists; pass overwrite to replace it")
        # no rename on an object store: the old dataset stops being one (its manifest goes first),
        # then its files go; a reader sees the old dataset, no dataset, or the new one
        store.delete(DATASET_MANIFEST)
        for key, _ in list(store.list("")):
            store.delete(key)
    upload_tree(store, local, "", DATASET_MANIFEST)


def fingerprint_files(files: list[Path]) -> str:
    """sha256 over (name, sha256 of bytes) of each partition, in name order."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return "sha256:" + h.hexdigest()


def read_dataset_manifest(path: Path | Uri, kind: str) -> dict:
    path = location(path)
    try:
        if isinstance(path, Uri):
            data = open_store(path).get(DATASET_MANIFEST)[0]
        else:
            data = (path / DATASET_MANIFEST).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise DatasetError(
            f"{path} is not a skewless dataset: {DATASET_MANIFEST} not found (write it with core.storage.datasets.write_dataset)"
        ) from None
    manifest = json.loads(data)
    if manifest.get("kind") != kind:
        raise DatasetError(f"{path}: expected a {kind!r} dataset, got {manifest.get('kind')!r}")
    return manifest


def is_dataset(path: Path | Uri) -> bool:
    """Whether a committed dataset (its _dataset.json) is at `path`."""
    path = location(path)
    if isinstance(path, Uri):
        return open_store(path).exists(DATASET_MANIFEST)
    return (path / DATASET_MANIFEST).is_file()


def partition_files(path: Path | Uri) -> list[Path] | list[Uri]:
    path = location(path)
    if isinstance(path, Uri):
        keys = (k for k, _ in open_store(path).list(""))
        files = sorted(path / k for k in keys if "/" not in k and fnmatch.fnmatch(k, "part-*.parquet"))
    else:
        files = sorted(path.glob("part-*.parquet"))
    if not files:
        raise DatasetError(f"{path} has no part-*.parquet partition files")
    return files


def parquet_file(f: Path | Uri) -> pq.ParquetFile:
    fs, p = arrow_path(f)
    return pq.ParquetFile(fs.open_input_file(p) if fs else p)


def read_part(f: Path | Uri, columns: list[str] | None = None) -> pa.Table:
    fs, p = arrow_path(f)
    return pq.read_table(p, columns=columns, filesystem=fs)


def file_size(f: Path | Uri) -> int:
    fs, p = arrow_path(f)
    return fs.get_file_info(p).size if fs else Path(p).stat().st_size


def read_table(path: Path | Uri, columns: list[str] | None = None) -> pa.Table:
    return pa.concat_tables([read_part(f, columns) for f in partition_files(path)])


def split_table(table: pa.Table, num_parts: int) -> list[pa.Table]:
    """Split into `num_parts` nearly equal contiguous slices (at least one row each when possible)."""
    n = table.num_rows
    num_parts = max(1, min(num_parts, n)) if n else 1
    bounds = [round(i * n / num_parts) for i in range(num_parts + 1)]
    return [table.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
