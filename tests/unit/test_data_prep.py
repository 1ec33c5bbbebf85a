import pyarrow.compute as pc
import pytest

from core.storage.datasets import read_dataset_manifest, read_table
from examples.movielens.features import FeatureSchema
from examples.movielens.prepare import MovieLensConfig, SyntheticConfig, prepare_movielens, prepare_synthetic


@pytest.fixture(scope="module")
def ml(tmp_path_factory, movielens_dir):
    out = tmp_path_factory.mktemp("ml")
    prepare_movielens(MovieLensConfig(out, movielens_dir, out / "dl", partitions=4))
    return out


def test_movielens_counts_match_the_dataset_readme(ml):
    splits = [read_table(ml / f"interactions/{s}") for s in ("train", "val", "test")]
    assert sum(t.num_rows for t in splits) == 100_836
    assert read_table(ml / "catalog").num_rows == 9_742
    assert read_table(ml / "users").num_rows == 610
    users = set()
    for t in splits:
        users |= set(t["user_id"].to_pylist())
    assert len(users) == 610


def test_split_is_chronological_per_user_and_every_user_trains(ml):
    train, test = read_table(ml / "interactions/train"), read_table(ml / "interactions/test")
    last_train = {}
    for u, t in zip(train["user_id"].to_pylist(), train["timestamp"].to_pylist(), strict=True):
        last_train[u] = max(t, last_train.get(u, t))
    assert len(last_train) == 610
    assert all(
        t >= last_train[u]
        for u, t in zip(test["user_id"].to_pylist(), test["timestamp"].to_pylist(), strict=True)
    )


def test_catalog_is_partitioned_encoded_and_self_describing(ml):
    m = read_dataset_manifest(ml / "catalog", "catalog")
    assert m["num_partitions"] == 4 and m["row_count"] == 9_742
    assert m["fingerprint"].startswith("sha256:")
    cat = read_table(ml / "catalog")
    assert pc.count_distinct(cat["item_id"]).as_py() == 9_742
    toy = cat.filter(pc.equal(cat["item_id"], 1)).to_pylist()[0]
    assert toy["title"] == "Toy Story (1995)" and toy["year"] == 1995 and len(toy["genre_ids"]) == 5
    assert FeatureSchema.from_dict(m["source"]["feature_schema"]) == FeatureSchema()


def test_users_hold_the_last_history_len_train_items_and_all_of_them_as_seen(ml):
    """The exported user tower refuses a history longer than it declares (50): `history` is the most
    recent 50 train items, `seen_item_ids` every train item (what evaluation masks)."""
    users = read_table(ml / "users")
    train = read_table(ml / "interactions/train").sort_by(
        [("user_id", "ascending"), ("timestamp", "ascending"), ("item_id", "ascending")]
    )
    by_user: dict[int, list[int]] = {}
    for u, i in zip(train["user_id"].to_pylist(), train["item_id"].to_pylist(), strict=True):
        by_user.setdefault(u, []).append(i)
    n = FeatureSchema().history_len
    rows = users.to_pylist()
    assert max(len(r["history"]) for r in rows) == n
    assert max(len(r["seen_item_ids"]) for r in rows) > n
    for r in rows:
        assert r["seen_item_ids"] == by_user.get(r["user_id"], [])
        assert r["history"] == r["seen_item_ids"][-n:]


def test_synthetic_generator_is_deterministic_by_seed(tmp_path):
    def gen(name, seed):
        prepare_synthetic(
            SyntheticConfig(tmp_path / name, items=30_000, users=20_000, seed=seed, chunk_rows=8_000)
        )
        return [(tmp_path / name / d / "_dataset.json").read_text() for d in ("catalog", "users")], [
            p.read_bytes() for p in sorted((tmp_path / name).rglob("*.parquet"))
        ]

    a_manifest, a_files = gen("a", 7)
    b_manifest, b_files = gen("b", 7)
    _, c_files = gen("c", 8)
    assert a_files == b_files and a_manifest == b_manifest
    assert len(a_files) == 4 + 3  # ceil(30k/8k) catalog parts + ceil(20k/8k) user parts
    assert a_files != c_files


def test_synthetic_catalog_has_the_movielens_schema_and_unique_ids(tmp_path, ml):
    prepare_synthetic(SyntheticConfig(tmp_path / "s", items=10_000, users=0, seed=0, chunk_rows=3_000))
    syn = read_table(tmp_path / "s/catalog")
    assert syn.schema == read_table(ml / "catalog").schema
    assert pc.count_distinct(syn["item_id"]).as_py() == 10_000


def test_synthetic_users_have_the_movielens_users_schema(tmp_path, ml):
    prepare_synthetic(SyntheticConfig(tmp_path / "s", items=1_000, users=3_000, seed=0, chunk_rows=1_000))
    syn = read_table(tmp_path / "s/users")
    assert syn.schema == read_table(ml / "users").schema
    assert syn["seen_item_ids"].to_pylist() == syn["history"].to_pylist()
    assert max(len(h) for h in syn["history"].to_pylist()) <= FeatureSchema().history_len


def test_synthetic_encoded_columns_match_encoding_the_raw_text(tmp_path):
    """Fresh items are encoded from raw fields at request time: the generator must agree with that."""
    from examples.movielens.features import encode_item_rows

    prepare_synthetic(SyntheticConfig(tmp_path / "s", items=500, users=0, seed=3, chunk_rows=500))
    syn = read_table(tmp_path / "s/catalog")
    again = encode_item_rows(
        syn.select(["item_id", "title", "genres", "year", "tags"]).to_pylist(), FeatureSchema()
    )
    for col in ("genre_ids", "year_slot", "title_tokens", "tag_tokens"):
        assert again[col].to_pylist() == syn[col].to_pylist(), col
