"""Request bodies without Ray: POST /score's JSON form (serve_app/bodies.py), every broken body a 4xx, never a
500; user features and items validated from a model package and shown in /openapi.json (serve_app/features.py)."""

import json

import pytest
from fastapi.exceptions import RequestValidationError

from core.serving.compact_body import ARROW_STREAM
from serve_app.bodies import parse_json_body
from serve_app.schemas import ScoreBody

DEEP = 100_000
DEEP_BODIES = {
    "arrays": b"[" * DEEP + b"]" * DEEP,
    "objects": b'{"a": ' * DEEP + b"1" + b"}" * DEEP,
    "rows": b'{"rows": ' + b"[" * DEEP + b"]" * DEEP + b"}",
}


@pytest.mark.parametrize("name", DEEP_BODIES)
def test_a_body_nested_100000_deep_is_invalid_json_not_a_500(name):
    # json.loads raised RecursionError here, which the app answered with a 500
    with pytest.raises(RequestValidationError) as e:
        parse_json_body(ScoreBody, DEEP_BODIES[name])
    [err] = e.value.errors()
    assert err["type"] == "json_invalid" and "nested too deeply" in err["msg"]
    # the interpreter is left sound: the next body parses as before
    assert parse_json_body(ScoreBody, b'{"user_id": 1, "item_ids": [2]}').item_ids == [2]


def test_a_nested_body_the_parser_accepts_fails_on_its_field():
    body = b'{"rows": ' + b"[" * 200 + b"]" * 200 + b"}"
    with pytest.raises(RequestValidationError) as e:
        parse_json_body(ScoreBody, body)
    assert all(err["loc"][:2] == ("body", "rows") for err in e.value.errors())


def test_large_shallow_bodies_still_parse():
    rows = [[i, i + 1] for i in range(100_000)]
    assert len(parse_json_body(ScoreBody, json.dumps({"rows": rows}).encode()).rows) == 100_000
    body = parse_json_body(ScoreBody, json.dumps({"user_id": 7, "item_ids": list(range(500))}).encode())
    assert body.user_id == 7 and body.item_ids == list(range(500))


# ---- request models generated from a model package (serve_app/features.py) -----------------------


@pytest.fixture(scope="module")
def ml(tmp_path_factory):
    """The MovieLens example model at a tiny size: user_id + history, item_id + encoded item columns."""
    from core.contract.towers import load_package
    from tests.unit.tiny_build import make_checkpoint

    return load_package(make_checkpoint(tmp_path_factory.mktemp("ml")))


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A model unlike MovieLens: float, fixed-length and ragged inputs, no id column in either tower."""
    from core.contract.towers import load_package
    from examples.shop.model import package

    return load_package(package(tmp_path_factory.mktemp("shop")))


def _locs(fn, *args) -> list[tuple]:
    with pytest.raises(RequestValidationError) as e:
        fn(*args)
    return [tuple(err["loc"]) for err in e.value.errors()]


def test_score_and_retrieve_bodies_take_features_as_one_object():
    from serve_app.schemas import RetrieveBody

    body = parse_json_body(ScoreBody, b'{"features": {"any": [1]}, "item_ids": [2]}')
    assert body.features == {"any": [1]} and body.user_id is None
    for raw in (b'{"features": [1, 2], "item_ids": [2]}', b'{"features": {"a": 1}, "rows": [[1, 2]]}'):
        with pytest.raises(RequestValidationError) as e:
            parse_json_body(ScoreBody, raw)
        assert e.value.errors()[0]["loc"][:2] in (("body", "features"), ("body",))
    assert RetrieveBody(features={"a": 1}).user_id is None
    with pytest.raises(ValueError, match="expected user_id and/or features"):
        RetrieveBody(k=3)


def test_user_features_become_the_one_row_table_the_user_tower_reads(ml):
    from core.contract.encode import rows_table
    from serve_app import features

    got = features.user_features(ml, {"user_id": 7, "history": [3, 2**61, 0]}, 7)
    assert got.equals(rows_table([{"user_id": 7, "history": [3, 2**61, 0]}], ml.user_inputs, {}))
    assert ml.user_vectors(got).shape == (1, ml.dim)
    assert features.user_features(ml, {"user_id": 7, "history": []}).num_rows == 1  # an empty history
    assert features.feature_user_id(ml, {"user_id": 7, "history": "bad"}) == 7  # routing only
    assert features.feature_user_id(ml, {"user_id": 2**64}) is None


@pytest.mark.parametrize(
    ("sent", "loc"),
    [
        ({"user_id": 7, "history": [1.0]}, ("body", "features", "history", 0)),  # strict: no floats
        ({"user_id": 7, "history": [True]}, ("body", "features", "history", 0)),
        ({"user_id": 7, "history": [-1]}, ("body", "features", "history", 0)),
        ({"user_id": 7, "history": [2**62]}, ("body", "features", "history", 0)),  # past the vocab
        ({"user_id": 7, "history": list(range(51))}, ("body", "features", "history")),  # max_len 50
        ({"user_id": 7, "history": 5}, ("body", "features", "history")),
        ({"user_id": 7}, ("body", "features", "history")),
        ({"user_id": 7, "history": [], "genres": "x"}, ("body", "features", "genres")),
        ({"user_id": "7", "history": []}, ("body", "features", "user_id")),
        ({"user_id": 8, "history": []}, ("body", "features", "user_id")),  # differs from the request's
    ],
)
def test_malformed_user_features_are_named_by_field(ml, sent, loc):
    from serve_app import features

    assert loc in _locs(features.user_features, ml, sent, 7)


def test_float_fixed_and_ragged_inputs_of_another_model(shop):
    from serve_app import features

    good = {"segment": 3, "spend": 12, "interests": [0.5] * 8, "searches": [1, 999]}
    t = features.user_features(shop, good, 123)  # no id column: any user id
    assert t.column("spend").to_pylist() == [12.0] and shop.user_vectors(t).shape == (1, shop.dim)
    for field, value in [("spend", float("nan")), ("spend", float("inf")), ("spend", True), ("spend", 1e39),
                         ("spend", "1"), ("interests", [0.5] * 7), ("interests", [0.5] * 9),
                         ("interests", [0.5] * 7 + [float("-inf")]), ("searches", [1000]), ("segment", 12)]:  # fmt: skip
        locs = _locs(features.user_features, shop, {**good, field: value})
        assert locs and all(loc[:3] == ("body", "features", field) for loc in locs), (field, value, locs)


def test_items_are_validated_each_and_stored_as_declared_columns(ml, shop):
    from serve_app import features

    item = {"item_id": 5, "genre_ids": [1, 4], "year_slot": 30, "title_tokens": [5], "tag_tokens": []}
    assert features.items(ml, [item]) == [(5, {k: v for k, v in item.items() if k != "item_id"})]
    bad = [item, {**item, "item_id": 2**63}, {**item, "year_slot": 10**6, "title": "x"}, {"item_id": 1}]
    locs = _locs(features.items, ml, bad)
    assert ("body", "items", 1, "item_id") in locs and ("body", "items", 2, "year_slot") in locs
    assert ("body", "items", 2, "title") in locs and ("body", "items", 3, "genre_ids") in locs
    assert not [loc for loc in locs if loc[2] == 0]  # the good neighbour is not named
    # the tower reads item_id too: an id must be in its declared range (MovieLens hashes any id < 2**62)
    assert ("body", "items", 0, "item_id") in _locs(features.items, ml, [{**item, "item_id": -1}])
    sku = {"item_id": -(2**63), "category": 1, "price": 9.5, "dense": [0.0] * 8, "tokens": []}
    assert features.items(shop, [sku])[0] == (-(2**63), {k: v for k, v in sku.items() if k != "item_id"})


def test_openapi_shows_the_live_packages_features_and_items(ml, shop, monkeypatch):
    from types import SimpleNamespace

    from fastapi import FastAPI

    from serve_app import app, features
    from serve_app.schemas import GENERATED

    base = FastAPI.openapi(app.api)
    generic = json.dumps(features.openapi(base, None))
    assert GENERATED not in generic and "UserFeatures" not in generic
    doc = features.openapi(base, ml)
    schemas = doc["components"]["schemas"]
    user = schemas["UserFeatures"]
    assert user["required"] == ["user_id", "history"] and user["additionalProperties"] is False
    assert user["properties"]["history"]["maxItems"] == 50
    assert set(schemas["Item"]["properties"]) == {"item_id", *(s.name for s in ml.item_inputs)}
    ref = {"$ref": "#/components/schemas/UserFeatures"}
    retrieve = schemas["RetrieveBody"]["properties"]["features"]["anyOf"][0]
    score = doc["paths"]["/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert retrieve.items() >= ref.items()
    assert score["properties"]["features"]["anyOf"][0].items() >= ref.items()  # the JSON form of /score
    assert schemas["ItemsBody"]["properties"]["items"]["items"]["$ref"] == "#/components/schemas/Item"
    assert GENERATED not in json.dumps(doc)
    assert ARROW_STREAM in doc["paths"]["/score"]["post"]["requestBody"]["content"]  # the Arrow form stays

    # the app's own /openapi.json follows the live build's package version
    state = SimpleNamespace(current=SimpleNamespace(build=SimpleNamespace(model=ml)))
    monkeypatch.setitem(features.REPLICA, "state", state)
    first = app.api.openapi()
    assert app.api.openapi() is first  # built once per package version
    assert "history" in first["components"]["schemas"]["UserFeatures"]["properties"]
    state.current.build.model = shop
    assert set(app.api.openapi()["components"]["schemas"]["UserFeatures"]["properties"]) == {
        "segment", "spend", "interests", "searches"
    }  # fmt: skip
