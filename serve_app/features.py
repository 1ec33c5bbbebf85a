"""Request models generated from the serving build's model package: a user's features (/score,
/retrieve) and a fresh item (POST /items), validated field by field from the declared inputs.

    int64 scalar    a JSON integer in [0, vocab) (strict: neither 1.0 nor true)
    float32 scalar  a finite JSON number within float32's range (no NaN, Infinity or booleans)
    fixed           a list of exactly `length` such values
    ragged          a list of at most `max_len` such values

A malformed value is a 422 whose `loc` names it (body.features.<column>..., body.items.<i>.<column>...)
in the route, before the request joins a batch. The accepted values become the Arrow table the tower
reads (core.contract.encode.rows_table), checked once more by the package's own validation: a
ContractError is the route's 422 with its message. The same models give /openapi.json the live build's
`features` and item schemas (`openapi`), so clients and the fuzz test see what the model takes.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from core.contract import encode
from core.contract.spec import InputSpec
from core.contract.towers import ModelPackage
from core.storage.sidecar_log import INT64_MAX, INT64_MIN
from serve_app.schemas import GENERATED

FLOAT32_MAX = float(np.finfo(np.float32).max)
USER_MODEL, ITEM_MODEL = "UserFeatures", "Item"
REF = "#/components/schemas/{model}"
ITEM_ID = "item_id"  # an item's key in POST /items and in the sidecar log

# The serving replica's state (a core.serving.serving_state.ReplicaState), registered by the replica for
# /openapi.json (Serve runs one replica per process). Kept here rather than in serve_app.app: Serve runs
# a by-value copy of the deployment class, whose module globals are copies of their own, while an
# imported module is the process's one.
REPLICA: dict = {"state": None}


def live_package() -> ModelPackage | None:
    """The package of the build this process's replica serves live, if any."""
    rs = REPLICA["state"]
    state = None if rs is None else rs.current
    return None if state is None else state.build.model


@dataclasses.dataclass(frozen=True)
class RequestModels:
    """One package's request models and what the routes need beside them."""

    user: type[BaseModel]
    item: type[BaseModel]
    user_inputs: tuple[InputSpec, ...]
    item_inputs: tuple[InputSpec, ...]
    user_id_column: str | None  # the user tower's id column (a scalar int64 input), if it reads one
    item_id_columns: tuple[str, ...]  # item tower inputs filled from the item's item_id, not sent


def _scalar(spec: InputSpec) -> Any:
    if spec.dtype == "int64":
        return Annotated[int, Field(strict=True, ge=0, lt=spec.vocab)]
    return Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]


def _field(spec: InputSpec) -> tuple[Any, Any]:
    """(type, Field) of one declared input; the field is keyed by its alias, the column's name (a
    declared name may be any identifier, e.g. `_x` or `json`, which pydantic reserves as attributes)."""
    value, described = _scalar(spec), {"alias": spec.name, "description": spec.describe()}
    if spec.shape == "scalar":
        return value, Field(**described)
    if spec.shape == "fixed":
        return list[value], Field(min_length=spec.length, max_length=spec.length, **described)
    return list[value], Field(max_length=spec.max_len, **described)


def _model(name: str, doc: str, fields: dict[str, tuple[Any, Any]]) -> type[BaseModel]:
    return create_model(
        name,
        __config__=ConfigDict(extra="forbid", validate_by_name=False, serialize_by_alias=True),
        __doc__=doc,
        **fields,
    )


def models(package: ModelPackage) -> RequestModels:
    """The request models of a package, built once per package version."""
    m = package.manifest
    return _models(
        package.version, package.family, package.user_inputs, package.item_inputs, m.user_id, m.item_id
    )


@functools.lru_cache(maxsize=8)
def _models(
    version: str, family: str, user_inputs: tuple, item_inputs: tuple, user_id: str, item_id: str
) -> RequestModels:
    where = f"model package {family} {version}"
    user = _model(
        USER_MODEL,
        f"A user's features: the user tower's declared inputs ({where}).",
        {f"f{k}": _field(s) for k, s in enumerate(user_inputs)},
    )
    id_specs = [s for s in item_inputs if s.name in (ITEM_ID, item_id)]
    lo, hi = INT64_MIN, INT64_MAX
    for s in id_specs:  # an id the tower reads must be in its declared range too
        if s.dtype == "int64" and s.shape == "scalar":
            lo, hi = max(lo, 0), min(hi, s.vocab - 1)
    id_field = (
        Annotated[int, Field(strict=True, ge=lo, le=hi)],
        Field(alias=ITEM_ID, description="the item's id (int64)"),
    )
    rest = {f"f{k}": _field(s) for k, s in enumerate(item_inputs) if s not in id_specs}
    item = _model(
        ITEM_MODEL,
        f"A fresh or changed item: its item_id and the item tower's declared inputs ({where}).",
        {"item_id_": id_field, **rest},
    )
    id_col = next(
        (s.name for s in user_inputs if s.name == user_id and s.dtype == "int64" and s.shape == "scalar"),
        None,
    )
    return RequestModels(user, item, user_inputs, item_inputs, id_col, tuple(s.name for s in id_specs))


def _errors(e: ValidationError, where: tuple) -> list[dict]:
    return [{**err, "loc": (*where, *err["loc"])} for err in e.errors(include_input=False, include_url=False)]


def feature_user_id(package: ModelPackage, features: Any) -> int | None:
    """The user id a request that sends only features is routed by: its features' declared id column,
    when that holds an int64 (validation happens later, against the build it is routed to)."""
    col = models(package).user_id_column
    v = features.get(col) if col is not None and isinstance(features, dict) else None
    ok = isinstance(v, int) and not isinstance(v, bool) and INT64_MIN <= v <= INT64_MAX
    return v if ok else None


def user_features(package: ModelPackage, features: dict, user_id: int | None = None) -> pa.Table:
    """One user's features -> the one-row Arrow table of the user tower's declared columns.

    RequestValidationError naming the field (body.features.<column>...) when a value does not fit its
    declaration, or when the features' id column contradicts the request's user_id; ContractError when
    the package's own check refuses the table."""
    m = models(package)
    try:
        row = m.user.model_validate(features).model_dump(by_alias=True)
    except ValidationError as e:
        raise RequestValidationError(_errors(e, ("body", "features"))) from None
    col = m.user_id_column
    if col is not None and user_id is not None and row[col] != user_id:
        msg = f"{col} {row[col]} differs from the request's user_id {user_id}"
        raise RequestValidationError([{"type": "value_error", "loc": ("body", "features", col), "msg": msg}])
    table = encode.rows_table([row], m.user_inputs, {})
    encode.table_arrays(table, m.user_inputs, "features")  # the package's own check, as the tower's input
    return table


def items(package: ModelPackage, bodies: list[dict]) -> list[tuple[int, dict]]:
    """POST /items' items -> (item_id, the declared columns) each, as the sidecar log stores them.

    RequestValidationError naming every malformed field (body.items.<i>.<column>...); ContractError
    when the package's own check refuses them as the item tower's input."""
    m = models(package)
    rows, errors = [], []
    for i, body in enumerate(bodies):
        try:
            rows.append(m.item.model_validate(body).model_dump(by_alias=True))
        except ValidationError as e:
            errors += _errors(e, ("body", "items", i))
    if errors:
        raise RequestValidationError(errors)
    full = [{**r, **dict.fromkeys(m.item_id_columns, r[ITEM_ID])} for r in rows]  # as the sidecar embeds
    encode.table_arrays(encode.rows_table(full, m.item_inputs, {}), m.item_inputs, "items")
    return [(r[ITEM_ID], {k: v for k, v in r.items() if k != ITEM_ID}) for r in rows]


def openapi(base: dict, package: ModelPackage | None) -> dict:
    """/openapi.json for the build being served: `base` (FastAPI's own, where the generic objects of
    serve_app.schemas are marked GENERATED) with this package's UserFeatures and Item schemas in their
    place. Without a package (no build live yet) the generic objects stay."""
    out = copy.deepcopy(base)
    refs = {}
    if package is not None:
        m = models(package)
        components = out.setdefault("components", {}).setdefault("schemas", {})
        for kind, model in (("user", m.user), ("item", m.item)):
            schema = model.model_json_schema(by_alias=True, ref_template=REF)
            components.update(schema.pop("$defs", {}))
            components[model.__name__] = schema
            refs[kind] = REF.format(model=model.__name__)
    return _splice(out, refs)


def _splice(node: Any, refs: dict[str, str]) -> Any:
    if isinstance(node, list):
        return [_splice(v, refs) for v in node]
    if not isinstance(node, dict):
        return node
    kind = node.get(GENERATED)
    if kind in refs:
        return {"$ref": refs[kind], **({"description": node["description"]} if "description" in node else {})}
    return {k: _splice(v, refs) for k, v in node.items() if k != GENERATED}
