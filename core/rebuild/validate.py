"""Publish gates for embedded tables: one checkpoint version, every row present once, finite vectors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


# here, not in core.rebuild.embed: the assembly workers gate and read parts without importing torch
def embeddings_to_numpy(table: pa.Table) -> np.ndarray:
    """embedding column -> (N, D) float32, contiguous."""
    col = table.column("embedding").combine_chunks()
    d = col.type.list_size
    return np.ascontiguousarray(col.flatten().to_numpy(zero_copy_only=False).reshape(-1, d), dtype=np.float32)


class ValidationError(ValueError):
    """A build failed a gate; nothing from it may be published."""


def check_embedded(
    table: pa.Table, *, id_name: str, expected_version: str, expected_rows: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Return (ids (N,), vectors (N, D)) sorted by id, or raise naming the first failed gate."""
    versions = (
        pc.unique(table.column("checkpoint_version").cast(pa.string())).to_pylist() if table.num_rows else []
    )
    if versions != [expected_version]:
        raise ValidationError(
            f"{what}: embedded rows must all carry checkpoint version {expected_version!r}; found {versions[:5]}"
        )
    if table.num_rows != expected_rows:
        raise ValidationError(
            f"{what}: expected {expected_rows:,} embedded rows (the input's row count), got {table.num_rows:,}"
        )
    ids = table.column(id_name).to_numpy()
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    dup = ids[1:][ids[1:] == ids[:-1]]
    if len(dup):
        raise ValidationError(
            f"{what}: {id_name} must be unique; {len(dup):,} duplicates, e.g. {np.unique(dup)[:5].tolist()}"
        )
    x = embeddings_to_numpy(table)[order]
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValidationError(
            f"{what}: {int(bad.sum()):,} vectors contain NaN or infinity (e.g. {id_name} {ids[bad][:5].tolist()}); "
            "the checkpoint produces non-finite embeddings"
        )
    return ids, x
