"""The model contract: packages of exported towers, their version, and validation against the manifest.

Uses the shop example (examples/shop), a model skewless did not train, with features unlike MovieLens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from core.contract import encode
from core.contract import package as pkg
from core.contract.spec import ContractError, InputSpec
from core.contract.towers import load_package
from examples.shop import model as shop

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shop_pkg(tmp_path_factory):
    return shop.package(tmp_path_factory.mktemp("pkgs"), seed=0)


def _eager_items(table: pa.Table) -> np.ndarray:
    item, _, _ = shop.towers(0)
    kw = encode.to_tensors(encode.table_arrays(table, tuple(shop.ITEM_INPUTS), "t"))
    with torch.no_grad():
        return item(**kw).numpy()


def test_exported_towers_and_scorer_equal_the_eager_model(shop_pkg):
    m = load_package(shop_pkg)
    cat, users = shop.catalog(500), shop.users(50)
    np.testing.assert_array_equal(m.item_vectors(cat), _eager_items(cat))
    _, user, scorer = shop.towers(0)
    kw = encode.to_tensors(encode.table_arrays(users, tuple(shop.USER_INPUTS), "t"))
    with torch.no_grad():
        u_eager = user(**kw)
    np.testing.assert_array_equal(m.user_vectors(users), u_eager.numpy())
    i = torch.from_numpy(m.item_vectors(cat)[:50])
    with torch.no_grad():
        np.testing.assert_allclose(
            m.scores(u_eager, i).numpy(), scorer(u_eager, i).numpy(), rtol=0, atol=1e-6
        )
    # batches of 1 and 0 rows run although the export traced 3
    assert m.item_vectors(cat.slice(0, 1)).shape == (1, shop.DIM)
    assert m.item_vectors(cat.slice(0, 0)).shape == (0, shop.DIM)


def test_the_same_code_and_weights_keep_their_version_from_any_place(tmp_path, shop_pkg):
    again = shop.package(tmp_path / "elsewhere" / "x", seed=0)
    assert again.name == shop_pkg.name
    assert load_package(again).version == load_package(shop_pkg).version


class ChangedItemTower(shop.ItemTower):
    """Same parameters (names, shapes, values), another forward: a different computation."""

    def forward(self, category, price, dense, tokens, tokens_offsets):
        h = torch.cat(
            [self.category(category), price.unsqueeze(1), dense, self.tokens(tokens, tokens_offsets)], 1
        )
        return self.mlp(h)


def test_a_changed_forward_with_the_same_weights_is_a_new_version(tmp_path, shop_pkg):
    item, user, scorer = shop.towers(0)
    changed = ChangedItemTower().eval()
    changed.load_state_dict(item.state_dict())
    p = pkg.write_package(tmp_path, family="shop", item_tower=changed, user_tower=user,
                          item_inputs=shop.ITEM_INPUTS, user_inputs=shop.USER_INPUTS,
                          similarity="inner_product", scorer=scorer)  # fmt: skip
    assert p.name != shop_pkg.name
    cat = shop.catalog(100)
    assert not np.allclose(load_package(p).item_vectors(cat), load_package(shop_pkg).item_vectors(cat))


def test_other_weights_are_a_new_version(tmp_path, shop_pkg):
    assert shop.package(tmp_path, seed=1).name != shop_pkg.name


def _bad(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, values)


@pytest.mark.parametrize(
    "column,values,match",
    [
        ("category", pa.array([shop.CATEGORIES] + [0] * 9, pa.int64()), "'category'.*value 40 outside"),
        ("category", pa.array([-1] + [0] * 9, pa.int64()), "value -1 outside"),
        ("category", pa.array([1.0] * 10), "'category'.*type double"),
        ("category", pa.array([None] + [1] * 9, pa.int64()), "null"),
        ("price", pa.array([float("nan")] + [1.0] * 9, pa.float32()), "'price'.*non-finite"),
        ("tokens", pa.array([list(range(13))] + [[1]] * 9, pa.list_(pa.int64())), "'tokens'.*list of 13"),
        ("dense", pa.array([[0.0] * 7] * 10, pa.list_(pa.float32())), "'dense'.*list of 7"),
    ],
)
def test_inputs_are_validated_against_the_manifest(shop_pkg, column, values, match):
    m = load_package(shop_pkg)
    with pytest.raises(ContractError, match=match):
        m.item_vectors(_bad(shop.catalog(10), column, values))


def test_int32_is_cast_and_a_missing_column_is_named(shop_pkg):
    m = load_package(shop_pkg)
    cat = shop.catalog(20)
    as32 = _bad(cat, "category", cat.column("category").cast(pa.int32()))
    np.testing.assert_array_equal(m.item_vectors(as32), m.item_vectors(cat))
    with pytest.raises(ContractError, match=r"missing declared input column\(s\) \['price'\]"):
        m.item_vectors(cat.drop(["price"]))


def _rewrite(path: Path, edit_graph=None, edit_manifest=None) -> None:
    """Forge a package whose hashes and version are consistent again after an edit: only the
    checks after the hashes can refuse it."""
    g = path / "item.graph.json"
    if edit_graph:
        graph = json.loads(g.read_bytes())
        edit_graph(graph)
        g.write_bytes(pkg.canonical(graph))
    mf = json.loads((path / pkg.MANIFEST).read_text())
    mf["towers"]["item"]["graph_sha256"] = pkg.hashlib.sha256(g.read_bytes()).hexdigest()
    if edit_manifest:
        edit_manifest(mf)
    m = pkg.PackageManifest.from_dict(mf, "forged")
    content = m.content_hash()
    mf["content_sha256"], mf["version"] = content, f"{m.family}-{content[:12]}"
    (path / pkg.MANIFEST).write_text(json.dumps(mf))


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_altered_files_are_refused(tmp_path, shop_pkg):
    p = _copy(shop_pkg, tmp_path / "p")
    w = p / "user.weights.pt"
    tensors = torch.load(w, weights_only=True)
    with torch.no_grad():
        next(iter(tensors.values())).view(-1)[0] += 1.0
    torch.save(tensors, w)
    with pytest.raises(ContractError, match="user weights do not hash"):
        load_package(p)
    q = _copy(shop_pkg, tmp_path / "q")
    mf = json.loads((q / pkg.MANIFEST).read_text())
    mf["towers"]["item"]["inputs"][0]["vocab"] = 41
    (q / pkg.MANIFEST).write_text(json.dumps(mf))
    with pytest.raises(ContractError, match="the manifest was altered"):
        load_package(q)


def test_a_graph_calling_anything_but_torch_operators_is_refused(tmp_path, shop_pkg):
    p = _copy(shop_pkg, tmp_path / "p")

    def evil(graph):
        graph["graph_module"]["graph"]["nodes"][0]["target"] = "builtins.exec"

    _rewrite(p, edit_graph=evil)
    with pytest.raises(ContractError, match=r"operators outside torch's own \(\['builtins.exec'\]\)"):
        load_package(p)


def test_declared_inputs_must_be_the_programs_inputs(tmp_path, shop_pkg):
    p = _copy(shop_pkg, tmp_path / "p")

    def rename(mf):
        mf["towers"]["item"]["inputs"][1]["name"] = "cost"

    _rewrite(p, edit_manifest=rename)
    with pytest.raises(
        ContractError, match=r"item declares inputs \[.*'cost'.*\], its program takes \[.*'price'"
    ):
        load_package(p)


def test_input_specs_refuse_incomplete_declarations():
    with pytest.raises(ContractError, match="needs vocab"):
        InputSpec("x", "int64")
    with pytest.raises(ContractError, match="needs max_len"):
        InputSpec("x", "float32", "ragged")
    with pytest.raises(ContractError, match="dtype must be one of"):
        InputSpec("x", "float64")


def test_validate_package_command_exits_2_naming_the_column(tmp_path, shop_pkg):
    shop.write_data(tmp_path / "data", items=200, n_users=20, parts=2)
    ok = subprocess.run([sys.executable, "-m", "jobs.validate_package", str(shop_pkg), "--catalog",
                         str(tmp_path / "data/catalog"), "--users", str(tmp_path / "data/users")],
                        cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "SUMMARY" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "jobs.validate_package", str(shop_pkg), "--catalog",
                          str(tmp_path / "data/users")], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2
    failed = [line for line in bad.stderr.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "['category', 'price', 'dense', 'tokens']" in failed[0], bad.stderr


def test_rows_from_json_refuse_a_float_where_an_int_is_declared():
    """Arrow would truncate 1.5 into an int64 column; a sidecar entry or request row never gets there."""
    tokens = InputSpec("tokens", "int64", "ragged", max_len=4, vocab=10)
    with pytest.raises(ContractError, match="'tokens'.*non-integer"):
        encode.rows_table([{"tokens": [1, 1.5]}], (tokens,), {})
    assert encode.rows_table([{"tokens": [1, 2]}], (tokens,), {})["tokens"].to_pylist() == [[1, 2]]
