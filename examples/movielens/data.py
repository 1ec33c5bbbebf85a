"""Locating and loading MovieLens ml-latest-small -> catalog, users and time-split interactions (Arrow tables).

The raw files are read where they lie (never copied into the project). Files are verified against the
sha256 sums of the official September 2018 release before use.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from core.storage.fsutil import sha256_file
from examples.movielens.features import USERS_DATASET_SCHEMA, FeatureSchema, encode_item_rows

log = logging.getLogger(__name__)

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-latest-small.zip"
# sha256 of the official files (identical to SHA256SUMS in ../shared/data/movielens/ml-latest-small).
SHA256 = {
    "movies.csv": "5a5f32dd9bb3797b8e728a1b98958789d2b13f294a69fdfbc5727f8a9611aa07",
    "ratings.csv": "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646",
    "tags.csv": "92a9f8bb7916dceef6151209845788c3643f794dfa79d1feaec7121b5960399d",
}
DEFAULT_LOCATIONS = (
    Path("../shared/data/movielens/ml-latest-small"),
    Path(__file__).resolve().parents[3] / "shared/data/movielens/ml-latest-small",
)
_YEAR_RE = re.compile(r"\((\d{4})\)\s*$")


class MovieLensNotFound(FileNotFoundError):
    pass


def verify(directory: Path) -> None:
    for name, expected in SHA256.items():
        actual = sha256_file(directory / name)
        if actual != expected:
            raise ValueError(f"{directory / name}: sha256 expected {expected}, got {actual}")


def locate(explicit: Path | None, download_to: Path | None) -> Path:
    """The user's path if given; else the shared copy beside the project; else download from GroupLens
    into `download_to` (verified). Raises MovieLensNotFound naming every place it looked."""
    candidates = [Path(explicit)] if explicit else list(DEFAULT_LOCATIONS)
    for c in candidates:
        if all((c / n).is_file() for n in SHA256):
            verify(c)
            return c.resolve()
    if explicit:
        raise MovieLensNotFound(f"no MovieLens files {sorted(SHA256)} in --movielens {explicit}")
    if download_to is None:
        raise MovieLensNotFound(f"MovieLens not found; looked in {[str(c) for c in candidates]}")
    try:
        return download(download_to)
    except OSError as e:
        raise MovieLensNotFound(
            f"MovieLens not found in {[str(c) for c in candidates]} and the download from {GROUPLENS_URL} "
            f"failed ({e}); pass --movielens PATH to an unpacked ml-latest-small"
        ) from e


def download(target: Path) -> Path:
    log.info("downloading %s", GROUPLENS_URL)
    with urllib.request.urlopen(GROUPLENS_URL, timeout=60) as r:
        blob = r.read()
    out = Path(target) / "ml-latest-small"
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        z.extractall(Path(target))
    verify(out)
    return out.resolve()


@dataclasses.dataclass(frozen=True)
class MovieLensTables:
    catalog: pa.Table  # features.ITEM_ARROW_SCHEMA
    users: pa.Table  # features.USERS_DATASET_SCHEMA (history: the last history_len train items, oldest
    # first; seen_item_ids: all train items)
    train: pa.Table  # user_id, item_id, rating, timestamp
    val: pa.Table
    test: pa.Table


def _read_csv(path: Path) -> pa.Table:
    return pcsv.read_csv(path)


def load(
    directory: Path, schema: FeatureSchema, val_frac: float = 0.1, test_frac: float = 0.1
) -> MovieLensTables:
    directory = Path(directory)
    movies = _read_csv(directory / "movies.csv")
    ratings = _read_csv(directory / "ratings.csv").rename_columns(
        ["user_id", "item_id", "rating", "timestamp"]
    )
    ratings = ratings.cast(
        pa.schema(
            [
                ("user_id", pa.int64()),
                ("item_id", pa.int64()),
                ("rating", pa.float32()),
                ("timestamp", pa.int64()),
            ]
        )
    )
    tags = _read_csv(directory / "tags.csv")

    train, val, test = split_by_user_time(ratings, val_frac, test_frac)

    # Tags a user gave to an item they rate in val/test would leak the held-out future: drop them.
    held_out = {
        (int(u), int(i))
        for t in (val, test)
        for u, i in zip(t["user_id"].to_numpy(), t["item_id"].to_numpy(), strict=True)
    }
    tag_text: dict[int, list[str]] = {}
    for uid, mid, tag in zip(
        tags["userId"].to_pylist(), tags["movieId"].to_pylist(), tags["tag"].to_pylist(), strict=True
    ):
        if (uid, mid) not in held_out:
            tag_text.setdefault(mid, []).append(str(tag))

    def rows():
        for mid, title, genres in zip(
            movies["movieId"].to_pylist(),
            movies["title"].to_pylist(),
            movies["genres"].to_pylist(),
            strict=True,
        ):
            m = _YEAR_RE.search(title)
            yield {
                "item_id": mid,
                "title": title,
                "genres": genres,
                "year": int(m.group(1)) if m else None,
                "tags": " | ".join(dict.fromkeys(tag_text.get(mid, []))),
            }

    catalog = encode_item_rows(rows(), schema)
    users = user_histories(ratings, train, schema.history_len)
    return MovieLensTables(catalog, users, train, val, test)


def split_by_user_time(
    ratings: pa.Table, val_frac: float, test_frac: float
) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Per-user chronological split: each user's latest `test_frac` of interactions test, the
    `val_frac` before them validate, the rest train (every user keeps at least one train row).
    Every user is then evaluable, which a single global cut-off would not allow on 610 users."""
    order = pc.sort_indices(
        ratings, sort_keys=[("user_id", "ascending"), ("timestamp", "ascending"), ("item_id", "ascending")]
    )
    r = ratings.take(order)
    uid = r["user_id"].to_numpy()
    first = np.searchsorted(uid, uid, side="left")
    count = np.searchsorted(uid, uid, side="right") - first
    pos = np.arange(len(uid)) - first  # 0-based position within the user's history
    n_test = np.floor(count * test_frac).astype(np.int64)
    n_val = np.floor(count * val_frac).astype(np.int64)
    is_test = pos >= count - n_test
    is_val = ~is_test & (pos >= count - n_test - n_val)
    is_train = ~is_test & ~is_val
    return r.filter(pa.array(is_train)), r.filter(pa.array(is_val)), r.filter(pa.array(is_test))


def user_histories(all_ratings: pa.Table, train: pa.Table, history_len: int) -> pa.Table:
    """Every user who appears anywhere: `seen_item_ids` = ALL their TRAIN items in time order, `history`
    = the last `history_len` of them (what the user tower takes). Both may be empty."""
    order = pc.sort_indices(
        train, sort_keys=[("user_id", "ascending"), ("timestamp", "ascending"), ("item_id", "ascending")]
    )
    t = train.take(order)
    uid = t["user_id"].to_numpy()
    iid = t["item_id"].to_numpy()
    users = np.unique(all_ratings["user_id"].to_numpy())
    starts = np.searchsorted(uid, users, side="left")
    ends = np.searchsorted(uid, users, side="right")
    recent = np.maximum(starts, ends - history_len)
    return pa.Table.from_arrays(
        [pa.array(users, pa.int64()), _ranges(iid, recent, ends), _ranges(iid, starts, ends)],
        schema=USERS_DATASET_SCHEMA,
    )


def _ranges(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> pa.ListArray:
    """values[starts[r]:ends[r]] for each r, as a list<int64> column."""
    lengths = ends - starts
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = values[np.repeat(starts - offsets[:-1], lengths) + np.arange(int(lengths.sum()))]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(np.int64), pa.int64()))
