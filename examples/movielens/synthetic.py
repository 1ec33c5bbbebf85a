"""Deterministic synthetic catalogs and user tables in the MovieLens model's schema, at any size
(benchmarks and tests at scale).

Generated chunk by chunk (one partition at a time) with vectorised numpy/Arrow, so memory is bounded
by one chunk and 10M rows take minutes, not hours. Chunk k is seeded by (seed, k), so the output does
not depend on anything but (seed, rows, chunk_rows).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from examples.movielens.features import ITEM_ARROW_SCHEMA, USERS_DATASET_SCHEMA, FeatureSchema, hash_tokens

VOCAB = 5000  # synthetic title/tag words "w0".."w4999"


def _lists(values: np.ndarray, lengths: np.ndarray, type_: pa.DataType) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type_))


def _word_lists(rng: np.random.Generator, n: int, lo: int, hi: int, words: pa.Array, hashed: np.ndarray):
    """n lists of lo..hi Zipf-ish word picks -> (joined strings, hashed token lists)."""
    lengths = rng.integers(lo, hi + 1, size=n)
    picks = np.minimum(rng.zipf(1.3, size=int(lengths.sum())) - 1, VOCAB - 1)
    text = pc.binary_join(
        _lists(words.take(pa.array(picks)).to_numpy(zero_copy_only=False), lengths, pa.string()), " "
    )
    return text, _lists(hashed[picks], lengths, pa.int32())


def catalog_chunks(
    rows: int, seed: int, schema: FeatureSchema, chunk_rows: int = 500_000
) -> Iterator[pa.Table]:
    words = pa.array([f"w{i}" for i in range(VOCAB)])
    title_hash = np.array([hash_tokens(f"w{i}", schema.title_buckets, 1)[0] for i in range(VOCAB)], np.int32)
    tag_hash = np.array([hash_tokens(f"w{i}", schema.tag_buckets, 1)[0] for i in range(VOCAB)], np.int32)
    genre_names = np.array(schema.genres[1:])  # skip "(no genres listed)"
    for k, start in enumerate(range(0, rows, chunk_rows)):
        n = min(chunk_rows, rows - start)
        rng = np.random.default_rng([seed, k])
        ids = np.arange(start + 1, start + n + 1, dtype=np.int64)
        n_genres = rng.integers(1, 4, size=n)
        g = rng.integers(0, len(genre_names), size=int(n_genres.sum()))
        genre_ids = _lists((g + 1).astype(np.int32), n_genres, pa.int32())
        genres = pc.binary_join(_lists(genre_names[g], n_genres, pa.string()), "|")
        year = rng.integers(1920, 2026, size=n).astype(np.int32)
        title, title_tokens = _word_lists(rng, n, 1, 6, words, title_hash)
        tags, tag_tokens = _word_lists(rng, n, 0, 4, words, tag_hash)
        yield pa.table(
            {
                "item_id": ids,
                "title": title,
                "genres": genres,
                "year": year,
                "tags": tags,
                "genre_ids": genre_ids,
                "year_slot": (year - schema.year_min + 1).astype(np.int32),
                "title_tokens": title_tokens,
                "tag_tokens": tag_tokens,
            },
            schema=ITEM_ARROW_SCHEMA,
        )


def user_chunks(rows: int, n_items: int, seed: int, chunk_rows: int = 1_000_000) -> Iterator[pa.Table]:
    """Users 1..rows, each with a history of 1..50 item ids drawn Zipf-ishly from 1..n_items; their
    seen_item_ids (all "train" items) are the history itself."""
    for k, start in enumerate(range(0, rows, chunk_rows)):
        n = min(chunk_rows, rows - start)
        rng = np.random.default_rng([seed, 1_000_003, k])
        lengths = rng.integers(1, 51, size=n)
        items = ((rng.zipf(1.2, size=int(lengths.sum())) - 1) % n_items + 1).astype(np.int64)
        history = _lists(items, lengths, pa.int64())
        yield pa.table(
            {
                "user_id": np.arange(start + 1, start + n + 1, dtype=np.int64),
                "history": history,
                "seen_item_ids": history,
            },
            schema=USERS_DATASET_SCHEMA,
        )
