"""POST /score's JSON form (serve_app/bodies.py), without Ray: every broken body is a 4xx, never a 500."""

import json

import pytest
from fastapi.exceptions import RequestValidationError

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
