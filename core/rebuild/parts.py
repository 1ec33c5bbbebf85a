"""Embedded partitions: the unit of work, of commit and of resume of a rebuild.

One catalog (or users) partition file is embedded by one embedding actor (jobs.embed_data, on Ray
Data's pool; `embed_locally` in-process) into one committed part directory:

    <staging>/parts/items-00003/ids.npy       (n,) int64, sorted, unique within the part
    <staging>/parts/items-00003/vectors.npy   (n, D) float32, row-aligned with ids
    <staging>/parts/items-00003/part.json     what it is: source file, rows, id range, checkpoint
                                              version, node, seconds (written last)

A part is written into a temporary directory and renamed into place, so a part directory that exists
is complete; a resumed rebuild reuses exactly those whose record matches what it would embed now
(same source file and size, same rows, same checkpoint version and precision, same batch size) and
redoes the rest. The per-partition publish gates (every row present, one checkpoint version, finite
vectors, ids unique within the part) run here, where the part is embedded, before the commit. A task
that runs again (Ray retries it after its actor died) writes the same part again: the rename replaces
the earlier attempt's, so each part is committed once whatever the number of attempts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa

from core.rebuild.validate import check_embedded
from core.storage.datasets import file_size, parquet_file
from core.storage.store import location

_IDS, _VECTORS, _RECORD = "ids.npy", "vectors.npy", "part.json"
# Ids sampled evenly from every part: the driver places shard boundaries by them when the parts'
# id ranges overlap (they do not when the catalog is partitioned by id, the usual layout).
ID_SAMPLE = 64


@dataclasses.dataclass(frozen=True)
class PartTask:
    what: str  # "items" | "users"
    key: str  # "items-00003": the part directory's name
    source: str  # the partition file
    source_bytes: int
    rows: int


def plan(what: str, files: list[Path]) -> list[PartTask]:
    return [
        PartTask(what, f"{what}-{i:05d}", str(f), file_size(f), parquet_file(f).metadata.num_rows)
        for i, f in enumerate(files)
    ]


@dataclasses.dataclass(frozen=True)
class EmbedSettings:
    """Everything besides the input that decides a part's vectors bit for bit."""

    checkpoint_version: str
    weights_sha256: str
    precision: str
    batch_size: int


def part_dir(parts: Path, task: PartTask) -> Path:
    return Path(parts) / task.key


def open_part(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids (n,), vectors (n, D)) of a committed part, memory-mapped."""
    d = Path(directory)
    return np.load(d / _IDS, mmap_mode="r"), np.load(d / _VECTORS, mmap_mode="r")


def read_record(directory: Path) -> dict | None:
    try:
        return json.loads((Path(directory) / _RECORD).read_text())
    except (OSError, ValueError):
        return None


def reusable(parts: Path, task: PartTask, settings: EmbedSettings) -> dict | None:
    """The record of a committed part that this rebuild would produce identically, else None."""
    return matches(read_record(part_dir(parts, task)), task, settings)


def matches(rec: dict | None, task: PartTask, settings: EmbedSettings) -> dict | None:
    """`rec` if it is the record of what this rebuild would embed for `task`, else None."""
    if rec is None:
        return None
    same = (
        rec.get("source") == task.source
        and rec.get("source_bytes") == task.source_bytes
        and rec.get("rows") == task.rows
        and rec.get("settings") == dataclasses.asdict(settings)
    )
    return rec if same else None


def embed_part(embedder, task: PartTask, parts: Path, settings: EmbedSettings, node: str) -> dict:
    """Embed one partition file, gate it and commit it; returns its record. `embedder`: core.rebuild.embed.Embedder
    (its `items`/`users` turn an Arrow batch into an embedding table stamped with its package version)."""
    t0 = time.perf_counter()
    columns = embedder.columns(task.what)
    fn = embedder.items if task.what == "items" else embedder.users
    id_name = columns[0]
    tables = [fn(pa.Table.from_batches([b])) for b in parquet_file(location(task.source)).iter_batches(
        batch_size=settings.batch_size, columns=columns)]  # fmt: skip
    if tables:
        ids_a, x = check_embedded(
            pa.concat_tables(tables), id_name=id_name, expected_version=settings.checkpoint_version,
            expected_rows=task.rows, what=f"{'catalog' if task.what == 'items' else 'users'} partition {task.source}",
        )  # fmt: skip
    else:  # an empty partition file: nothing to gate (the dataset's total was checked by preflight)
        ids_a, x = np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    record = {
        "key": task.key,
        "what": task.what,
        "source": task.source,
        "source_bytes": task.source_bytes,
        "rows": task.rows,
        "dim": int(x.shape[1]) if x.ndim == 2 else 0,
        "id_min": int(ids_a[0]) if len(ids_a) else None,
        "id_max": int(ids_a[-1]) if len(ids_a) else None,
        "id_sample": ids_a[np.linspace(0, len(ids_a) - 1, min(ID_SAMPLE, len(ids_a))).astype(int)].tolist(),
        "checkpoint_version": settings.checkpoint_version,
        "settings": dataclasses.asdict(settings),
        "node": node,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    _commit(Path(parts), task.key, ids_a, x, record)
    return record


def embed_locally(embedders: list, parts: Path, settings: EmbedSettings, node: str = "local"):
    """The in-process embedding (unit tests, benchmarks' floor): parts round-robin over `embedders`
    (core.rebuild.embed.Embedder), one at a time. Returns the callable core.rebuild.assemble.embed_all
    takes: tasks -> their committed records."""

    def run(tasks: list[PartTask]):
        for i, t in enumerate(tasks):
            yield embed_part(embedders[i % len(embedders)], t, Path(parts), settings, node)

    return run


def _commit(parts: Path, key: str, ids: np.ndarray, x: np.ndarray, record: dict) -> None:
    # never parents=True: `parts` lives in a build's staging directory, which a failed rebuild's driver
    # removes while a worker may still be finishing a part; that commit must fail, not recreate it
    parts.mkdir(exist_ok=True)
    tmp = parts / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    np.save(tmp / _IDS, ids)
    np.save(tmp / _VECTORS, np.ascontiguousarray(x, np.float32))
    (tmp / _RECORD).write_text(json.dumps(record))
    for p in tmp.iterdir():  # on disk before the rename makes the part visible
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    final = parts / key
    if final.exists():  # an earlier attempt of this part (a redo after a mismatch, or a retried task)
        shutil.rmtree(final)
    os.rename(tmp, final)


def discard_partial(parts: Path) -> int:
    """Remove what killed workers left half-written; committed parts stay. Returns how many."""
    n = 0
    if Path(parts).is_dir():
        for p in Path(parts).iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
                n += 1
    return n
