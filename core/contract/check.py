"""Does a dataset fit a package? Column types from the partition footers (no data read), then a trial
batch through the tower: every row of it validated, outputs finite, of the declared dimension, and of
unit norm when the similarity is cosine."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.contract import encode
from core.contract.spec import ContractError, InputSpec
from core.contract.towers import ModelPackage

NORM_TOLERANCE = 1e-3


def _type_fits(spec: InputSpec, t: pa.DataType) -> bool:
    if spec.shape != "scalar":
        if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
            return False
        t = t.value_type
    elif pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return False
    return pa.types.is_integer(t) or (spec.dtype == "float32" and pa.types.is_floating(t))


def check_schema(schema: pa.Schema, inputs: tuple[InputSpec, ...], id_column: str, what: str) -> None:
    """Declared columns present with a type that casts to the declared one; the id column int."""
    encode.check_columns(schema.names, inputs, what)
    if id_column not in schema.names or not pa.types.is_integer(schema.field(id_column).type):
        found = schema.field(id_column).type if id_column in schema.names else "no such column"
        raise ContractError(f"{what}: id column {id_column!r}: expected an integer column, found {found}")
    for s in inputs:
        t = schema.field(s.name).type
        if not _type_fits(s, t):
            raise ContractError(f"{what}: column {s.name!r}: expected {s.describe()}, found Arrow type {t}")


def check_vectors(m: ModelPackage, x: np.ndarray, what: str) -> None:
    if x.ndim != 2 or x.shape[1] != m.dim:
        raise ContractError(f"{what}: the tower gives shape {x.shape}, the manifest declares (N, {m.dim})")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ContractError(f"{what}: {int(bad.sum())} of {len(x)} trial rows embed to non-finite vectors")
    if m.manifest.similarity == "cosine" and len(x):
        norms = np.linalg.norm(x, axis=1)
        worst = float(np.abs(norms - 1).max())
        if worst > NORM_TOLERANCE:
            raise ContractError(
                f"{what}: similarity 'cosine' needs unit-norm vectors; a trial row has norm off by {worst:.4f}"
            )


def check_dataset(m: ModelPackage, tower: str, files: list, id_column: str, trial_rows: int = 1024) -> dict:
    """Every partition's footer, and a trial batch of the first partition; raises ContractError."""
    for f in files:
        check_schema(pq.read_schema(f), m.inputs(tower), id_column, f"partition {f}")
    pf = pq.ParquetFile(files[0])
    cols = [id_column, *(s.name for s in m.inputs(tower))]
    batch = next(pf.iter_batches(batch_size=trial_rows, columns=list(dict.fromkeys(cols))), None)
    table = pa.Table.from_batches([batch]) if batch is not None else pa.table({})
    x = m.vectors(tower, table, f"partition {files[0]} (first {table.num_rows} rows)")
    check_vectors(m, x, f"{tower} tower on {files[0]}")
    return {"partitions": len(files), "trial_rows": int(table.num_rows)}
