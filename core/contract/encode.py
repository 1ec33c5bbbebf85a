"""Arrow columns -> a tower's keyword tensors, validated and cast against the declared inputs.

Every check a tower would otherwise fail deep inside (or not at all) happens here, vectorised, with a
message that names the column, what was declared and what arrived: missing columns, wrong types,
nulls, list lengths, ids outside the vocabulary, NaN or infinite floats.
"""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import torch

from core.contract.spec import OFFSETS_SUFFIX, ContractError, InputSpec


def _fail(spec: InputSpec, what: str, found: str) -> ContractError:
    return ContractError(f"column {spec.name!r}: expected {spec.describe()}, {what} {found}")


def _check_values(spec: InputSpec, values: pa.Array) -> np.ndarray:
    """Flat values of a column -> numpy of the declared dtype, after type, null and range checks."""
    t = values.type
    if values.null_count:
        raise _fail(spec, "found", f"{values.null_count} null value(s)")
    if spec.dtype == "int64":
        if not pa.types.is_integer(t):
            raise _fail(spec, "got", f"values of type {t}")
        out = values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        if len(out):
            lo, hi = int(out.min()), int(out.max())
            if lo < 0 or hi >= spec.vocab:
                bad = lo if lo < 0 else hi
                raise _fail(spec, "found", f"value {bad} outside [0, {spec.vocab})")
        return out
    if not (pa.types.is_floating(t) or pa.types.is_integer(t)):
        raise _fail(spec, "got", f"values of type {t}")
    out = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    finite = np.isfinite(out)
    if not finite.all():
        raise _fail(spec, "found", f"{int((~finite).sum())} non-finite value(s) (NaN or inf)")
    return out


def _list_parts(spec: InputSpec, col: pa.Array) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """A list column -> (flat values, per-row lengths, per-row starts); refuses nulls and non-list types."""
    if pa.types.is_fixed_size_list(col.type):
        col = col.cast(pa.list_(col.type.value_type))
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        raise _fail(spec, "got", f"a column of type {col.type}")
    if col.null_count:
        raise _fail(spec, "found", f"{col.null_count} null list(s)")
    offsets = col.offsets.to_numpy().astype(np.int64, copy=False)
    values = col.values.slice(offsets[0], offsets[-1] - offsets[0])
    return values, offsets[1:] - offsets[:-1], offsets[:-1] - offsets[0]


def column_arrays(spec: InputSpec, col: pa.Array | pa.ChunkedArray) -> dict[str, np.ndarray]:
    """One validated column -> its keyword arrays (see core.contract.spec for the ragged layout)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    n = len(col)
    if spec.shape == "scalar":
        if (
            pa.types.is_list(col.type)
            or pa.types.is_large_list(col.type)
            or pa.types.is_fixed_size_list(col.type)
        ):
            raise _fail(spec, "got", f"a column of type {col.type}")
        return {spec.name: _check_values(spec, col)}
    values, lengths, starts = _list_parts(spec, col)
    flat = _check_values(spec, values)
    if spec.shape == "fixed":
        if n and (lengths.min() != spec.length or lengths.max() != spec.length):
            bad = int(np.flatnonzero(lengths != spec.length)[0])
            raise _fail(spec, "found", f"a list of {lengths[bad]} value(s) (row {bad})")
        return {spec.name: flat.reshape(n, spec.length)}
    if n and lengths.max() > spec.max_len:
        bad = int(np.flatnonzero(lengths > spec.max_len)[0])
        raise _fail(spec, "found", f"a list of {lengths[bad]} value(s) (row {bad})")
    return {spec.name: flat, spec.name + OFFSETS_SUFFIX: starts}


def check_columns(names: list[str], inputs: tuple[InputSpec, ...], what: str) -> None:
    missing = [s.name for s in inputs if s.name not in names]
    if missing:
        raise ContractError(
            f"{what} is missing declared input column(s) {missing}; it has {list(names)}, "
            f"the tower declares {[s.name for s in inputs]}"
        )


def table_arrays(table: pa.Table, inputs: tuple[InputSpec, ...], what: str) -> dict[str, np.ndarray]:
    """Every declared input of a table, validated: {argument name: array}."""
    check_columns(table.column_names, inputs, what)
    out: dict[str, np.ndarray] = {}
    for spec in inputs:
        out.update(column_arrays(spec, table.column(spec.name)))
    return out


def _consume_readonly_warning() -> None:
    """Arrow-backed arrays are read-only and torch warns, once per process, when a tensor shares one;
    nothing writes to a tower's inputs, so the warning is moot. Spend that one warning here, silenced,
    instead of wrapping every call in `warnings.catch_warnings` (~10 us, which small batches notice)."""
    ro = np.zeros(1)
    ro.flags.writeable = False
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        torch.from_numpy(ro)


_consume_readonly_warning()


def to_tensors(arrays: dict[str, np.ndarray], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}


def arrow_type(spec: InputSpec) -> pa.DataType:
    """The Arrow type a column of this input is written with (datasets, sidecar rows)."""
    value = pa.int64() if spec.dtype == "int64" else pa.float32()
    return value if spec.shape == "scalar" else pa.list_(value)


def _has_float(v) -> bool:
    if isinstance(v, list):  # the set of element types: C speed for a 50-long history (~1 us, not ~5)
        types = set(map(type, v))
        return any(issubclass(t, float) for t in types) or (list in types and any(map(_has_float, v)))
    return isinstance(v, float)


def rows_table(rows: list[dict], inputs: tuple[InputSpec, ...], extra: dict[str, pa.DataType]) -> pa.Table:
    """JSON-like rows (already type-checked at the boundary) -> an Arrow table of the declared columns
    plus `extra` (e.g. the id column). Values that do not convert are reported per column."""
    cols = {}
    for s in inputs:  # Arrow would truncate 1.5 into an int64 column without a word
        if s.dtype == "int64" and any(_has_float(r.get(s.name)) for r in rows):
            raise ContractError(f"column {s.name!r}: expected {s.describe()}, found a non-integer number")
    for name, typ in [*extra.items(), *((s.name, arrow_type(s)) for s in inputs)]:
        try:
            cols[name] = pa.array([r.get(name) for r in rows], type=typ)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
            raise ContractError(f"column {name!r}: values do not convert to {typ}: {e}") from None
    return pa.table(cols)
