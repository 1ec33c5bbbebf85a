"""POST /score's two body formats: content-type dispatch, JSON validation, and their OpenAPI entry.

The route reads the raw body itself (FastAPI parses a declared model from JSON only), so the JSON form
is validated here with the same model and answered with the same 422 as FastAPI's own validation.
"""

from __future__ import annotations

import json
from email.message import Message

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from core.serving.compact_body import ARROW_STREAM, COLUMNS
from serve_app.schemas import ScoreBody

# The request body of /score in /openapi.json: both forms (clients and the fuzz test read it from there)
SCORE_BODIES = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": ScoreBody.model_json_schema()},
            ARROW_STREAM: {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": f"an Arrow IPC stream with exactly the int64 columns {', '.join(COLUMNS)}",
                }
            },
        },
    }
}


def body_kind(content_type: str | None) -> str | None:
    """ "json" (also without a content-type, as FastAPI reads it), "arrow", or None (unsupported)."""
    if not content_type:
        return "json"
    m = Message()
    m["content-type"] = content_type
    kind = m.get_content_type()
    if kind == ARROW_STREAM:
        return "arrow"
    if kind == "application/json" or (m.get_content_maintype() == "application" and kind.endswith("+json")):
        return "json"
    return None


def parse_json_body(model: type[BaseModel], raw: bytes) -> BaseModel:
    """As FastAPI reads a declared body: Python's json (NaN and Infinity parse, then fail the field's
    int check, so the 422 names the field), 422 for broken JSON (also JSON nested too deeply to parse),
    400 for bytes that are not text."""
    try:
        obj = json.loads(raw) if raw else None
    except json.JSONDecodeError as e:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body", e.pos), "msg": f"JSON decode error: {e.msg}"}]
        ) from None
    except UnicodeDecodeError:
        raise HTTPException(400, "the body is not UTF-8 text") from None
    except RecursionError:
        # e.g. "[" * 100_000 (it answered 500): the parser recurses once per level and gives up at the
        # interpreter's limit, so catching that costs nothing on good bodies and stops early on bad
        # ones; a depth pre-scan in Python would cost more per byte than the C parser on every large,
        # shallow body. (FastAPI's own routes, /retrieve and /items, catch it and answer 400.)
        msg = "JSON decode error: the body is nested too deeply"
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": msg}]) from None
    if obj is None:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    try:
        return model.model_validate(obj)
    except ValidationError as e:  # the app's 422 handler names each field, as for FastAPI's own checks
        raise RequestValidationError(
            [{**err, "loc": ("body", *err.get("loc", ()))} for err in e.errors(include_input=False)]
        ) from None
