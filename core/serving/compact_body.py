"""The compact body of POST /score: an Arrow IPC stream of (user_id, item_id) rows.

A JSON body of 1000 candidates is ~14 kB of text that Python parses number by number; the same rows as
two int64 columns are 16 kB of machine integers that pyarrow hands to NumPy without a Python loop (no
copy for a stream of one record batch). It carries the JSON body's rows form only: one user with
candidates is the same rows with the user repeated.

    import pyarrow as pa
    t = pa.table({"user_id": pa.array(users, pa.int64()), "item_id": pa.array(items, pa.int64())})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    requests.post(url + "/score", data=sink.getvalue().to_pybytes(),
                  headers={"content-type": ARROW_STREAM})
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

ARROW_STREAM = "application/vnd.apache.arrow.stream"
COLUMNS = ("user_id", "item_id")


class BodyError(ValueError):
    """A malformed body: the HTTP status and what was wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def encode_rows(user_ids, item_ids) -> bytes:
    """The body for these rows (what a client sends; the benchmark and the tests use it too)."""
    t = pa.table({"user_id": pa.array(user_ids, pa.int64()), "item_id": pa.array(item_ids, pa.int64())})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    return sink.getvalue().to_pybytes()


def decode_rows(body: bytes, max_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(user_ids, item_ids) as int64 arrays; BodyError (422, or 413 over max_rows) names what is wrong
    with the body and never echoes it."""
    if not body:
        raise BodyError(
            422, f"empty body: expected an Arrow IPC stream with int64 columns {', '.join(COLUMNS)}"
        )
    batches, rows = [], 0
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(body))
        names = reader.schema.names
        if sorted(names) != sorted(COLUMNS):
            raise BodyError(422, f"expected exactly the columns {list(COLUMNS)}; got {names[:10]}")
        for batch in reader:  # batch by batch: a body over the row limit is refused before it is all read
            rows += batch.num_rows
            if rows > max_rows:
                raise BodyError(413, f"more than {max_rows} rows: over the limit per request")
            batches.append(batch)
    except (pa.ArrowException, OSError) as e:
        raise BodyError(
            422, f"body is not a readable Arrow IPC stream ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    if rows == 0:
        raise BodyError(422, "the body has 0 rows; expected at least 1")
    table = pa.Table.from_batches(batches, reader.schema)
    out = []
    for name in COLUMNS:
        col = table.column(name)
        if col.type != pa.int64():
            raise BodyError(422, f"column {name} has type {col.type}; expected int64")
        if col.null_count:
            raise BodyError(422, f"column {name} has {col.null_count} null(s); expected none")
        out.append(col.to_numpy())
    return out[0], out[1]
