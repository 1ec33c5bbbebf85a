"""The MovieLens model's feature schema and encoding: data preparation, training and export use it.

Raw catalog columns (title, genres, tags, year) are turned into fixed integer features ONCE, at data
preparation, and stored next to the raw text. The exported item tower then only takes Arrow list columns
as EmbeddingBag offsets, which keeps the rebuild compute-bound instead of tokenizer-bound. Fresh items
(the serving sidecar) must be encoded with the same `encode_item_rows` to get identical features.

Hashing uses crc32, never Python's `hash()`, which is salted per process.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa

FEATURE_SCHEMA_VERSION = 1

# The genres MovieLens uses (movies.csv, plus IMAX which the README omits). Unknown genres map to an
# out-of-vocabulary slot instead of failing, so a catalog with a new genre still embeds.
MOVIELENS_GENRES: tuple[str, ...] = (
    "(no genres listed)", "Action", "Adventure", "Animation", "Children", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "IMAX", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class FeatureSchema:
    """Everything that decides how raw rows become model inputs. Stored in every training checkpoint
    and in the prepared datasets' `source`; training refuses data encoded with another schema."""

    version: int = FEATURE_SCHEMA_VERSION
    genres: tuple[str, ...] = MOVIELENS_GENRES
    item_id_buckets: int = 1 << 16
    user_id_buckets: int = 1 << 14
    title_buckets: int = 1 << 14
    tag_buckets: int = 1 << 13
    max_title_tokens: int = 16
    max_tag_tokens: int = 16
    history_len: int = 50
    year_min: int = 1900
    year_max: int = 2030

    @property
    def n_genre_slots(self) -> int:
        return len(self.genres) + 1  # + out-of-vocabulary

    @property
    def n_year_slots(self) -> int:
        return self.year_max - self.year_min + 2  # + unknown (slot 0)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["genres"] = list(self.genres)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSchema:
        d = dict(d)
        d["genres"] = tuple(d["genres"])
        return cls(**d)


def schema_diff(expected: FeatureSchema, actual: FeatureSchema) -> list[str]:
    """Human-readable differences, one per field, naming expected and actual values."""
    e, a = expected.to_dict(), actual.to_dict()
    return [f"{k}: expected {e[k]!r}, got {a.get(k)!r}" for k in e if e[k] != a.get(k)]


# Columns the item tower reads; a catalog without them cannot be embedded.
ITEM_FEATURE_COLUMNS = ("item_id", "genre_ids", "year_slot", "title_tokens", "tag_tokens")
USER_FEATURE_COLUMNS = ("user_id", "history")

ITEM_ARROW_SCHEMA = pa.schema(
    [
        ("item_id", pa.int64()),
        ("title", pa.string()),
        ("genres", pa.string()),
        ("year", pa.int32()),
        ("tags", pa.string()),
        ("genre_ids", pa.list_(pa.int32())),
        ("year_slot", pa.int32()),
        ("title_tokens", pa.list_(pa.int32())),
        ("tag_tokens", pa.list_(pa.int32())),
    ]
)
# What the user tower takes: history = the user's last `history_len` items, most recent last (the
# exported tower refuses longer lists).
USER_ARROW_SCHEMA = pa.schema([("user_id", pa.int64()), ("history", pa.list_(pa.int64()))])
# A prepared users dataset adds seen_item_ids: ALL the user's train items (evaluation masks them).
USERS_DATASET_SCHEMA = USER_ARROW_SCHEMA.append(pa.field("seen_item_ids", pa.list_(pa.int64())))

_TOKEN_RE = re.compile(r"[a-z0-9]+")


def hash_tokens(text: str, buckets: int, limit: int) -> list[int]:
    """Lower-cased word tokens hashed into [1, buckets); 0 is reserved for padding."""
    toks = _TOKEN_RE.findall(text.lower())[:limit]
    return [1 + zlib.crc32(t.encode()) % (buckets - 1) for t in toks]


def genre_ids(genres: str, schema: FeatureSchema) -> list[int]:
    index = {g: i for i, g in enumerate(schema.genres)}
    oov = len(schema.genres)
    return [index.get(g, oov) for g in genres.split("|") if g] or [index.get("(no genres listed)", oov)]


def year_slot(year: int | None, schema: FeatureSchema) -> int:
    if year is None or year < schema.year_min or year > schema.year_max:
        return 0
    return int(year) - schema.year_min + 1


def encode_item_rows(
    rows: Iterable[dict], schema: FeatureSchema, genre_index: dict[str, int] | None = None
) -> pa.Table:
    """Raw item dicts (item_id, title, genres 'A|B', year or None, tags text) -> an Arrow table with
    raw and encoded columns, in ITEM_ARROW_SCHEMA."""
    cols: dict[str, list] = {f.name: [] for f in ITEM_ARROW_SCHEMA}
    for r in rows:
        cols["item_id"].append(int(r["item_id"]))
        cols["title"].append(str(r.get("title", "")))
        cols["genres"].append(str(r.get("genres", "")))
        year = r.get("year")
        cols["year"].append(None if year is None else int(year))
        cols["tags"].append(str(r.get("tags", "") or ""))
        cols["genre_ids"].append(genre_ids(cols["genres"][-1], schema))
        cols["year_slot"].append(year_slot(year, schema))
        cols["title_tokens"].append(
            hash_tokens(cols["title"][-1], schema.title_buckets, schema.max_title_tokens)
        )
        cols["tag_tokens"].append(hash_tokens(cols["tags"][-1], schema.tag_buckets, schema.max_tag_tokens))
    return pa.Table.from_pydict(cols, schema=ITEM_ARROW_SCHEMA)


def check_columns(names: Sequence[str], required: Sequence[str], what: str) -> None:
    missing = [c for c in required if c not in names]
    if missing:
        raise ValueError(
            f"{what} is missing required columns {missing}; expected {list(required)}, got {list(names)}"
        )


def list_column_to_bag(col: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """An Arrow list<int> column -> (flat values int64, offsets int64 of len n) for EmbeddingBag.
    Empty lists are allowed (EmbeddingBag gives a zero vector for them)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    col = col.cast(pa.list_(pa.int64()))
    offsets = col.offsets.to_numpy()
    start = offsets[0]
    values = col.values.slice(start, offsets[-1] - start).to_numpy(zero_copy_only=False)
    return values.astype(np.int64, copy=False), (offsets[:-1] - start).astype(np.int64)


def bucket_ids(ids: np.ndarray, buckets: int) -> np.ndarray:
    """Raw int64 ids -> embedding rows. Multiplicative hashing spreads consecutive ids; row 0 is kept
    for padding (history) so ids map into [1, buckets)."""
    h = (np.asarray(ids, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(20)
    return (1 + h % np.uint64(buckets - 1)).astype(np.int64)
