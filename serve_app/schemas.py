"""HTTP request/response bodies, the application's typed arguments and its deployment limits."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator
from ray.serve.config import BackpressureConfig

from core.storage.sidecar_log import INT64_MAX, INT64_MIN

# Ids are int64 end to end (numpy tables, faiss ids): a larger JSON integer is a 422 here, not an
# overflow deep in a batch where it would fail the batch's other requests.
Int64 = Annotated[int, Field(strict=True, ge=INT64_MIN, le=INT64_MAX)]
MAX_ITEMS = 1000  # per POST /items
MAX_KEYS = 1024  # per features or item object (the model's declared columns are checked per build)

# Where /openapi.json shows a schema generated from the live build's model package (serve_app/features.py
# splices it in place of the generic object these fields validate as here).
GENERATED = "x-skewless-generated"

# The deployment's request limits; benchmarks/noop_app.py deploys its baseline with these
# same ones (kept here, not in app.py, so the baseline does not import torch).
DEPLOYMENT_LIMITS = {
    # max_ongoing_requests >= max_batch_size x max_concurrent_batches, or batches never fill.
    "max_ongoing_requests": 64,
    "max_queued_requests": 256,
    "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=1),
    "ray_actor_options": {"num_cpus": 1},
}


class AppArgs(BaseModel):
    """Arguments of `build_app` (from `serve run ... key=value` or the Serve config YAML's `args`)."""

    model_config = ConfigDict(extra="forbid")

    registry: str = "registry"
    # A query tower other than the build's own: refused unless (its version, index version) passed a skew check.
    query_checkpoint: str | None = None
    broadcast: bool = True
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    # Requests a proxy may queue per replica beyond max_ongoing_requests before it answers 503. Size it
    # to capacity x latency budget (100 req/s x 0.5 s = 50): a deeper queue only turns overload into
    # time-outs (256 held 1-3 s of N=1000 work on 2 cores). -1 = unbounded.
    max_queued_requests: int = Field(256, ge=-1)
    max_unique_users_per_batch: int = Field(1024, ge=1)
    cap_policy: Literal["split", "reject", "fallback"] = "split"
    # Two-sided dedup: candidate items shared by a batch's rows are gathered and run through the
    # scorer's item side once (core/serving/broadcast.py); only with broadcast on. Off by default (measured).
    dedup_items: bool = False
    max_candidates: int = Field(2000, ge=1)
    max_k: int = Field(1000, ge=1)
    poll_interval_s: float = Field(1.0, gt=0)  # registry + sidecar log: fresh items show up within this
    max_sidecar_items: int = Field(10_000, ge=1)
    # Sidecar writes (POST /items, DELETE /items/{id}) need `Authorization: Bearer <token>`. The token is
    # read from this file, else from the environment variable SKEWLESS_ADMIN_TOKEN; with neither, sidecar
    # writes are off (403). Reading routes stay open.
    admin_token_file: str | None = None
    # A sidecar write answers 200 once this replica serves it, else 202 after this long (durable either way)
    sidecar_apply_timeout_s: float = Field(5.0, ge=0)
    torch_threads: int = Field(1, ge=1)
    faiss_threads: int = Field(1, ge=1)
    # Sharded serving (serve_app/sharded.py): one deployment per shard of a sharded build (`Shard0`...),
    # each replica holding one shard. None: as the live build's manifest says when the app is deployed (a
    # merged build, or none yet: the one-deployment app); 0: the one-deployment app whatever the build.
    shards: int | None = Field(None, ge=0)
    # use the shard deployments of this other application (same registry) instead of starting its own:
    # ingresses of different settings (broadcast, batching) over one copy of the shards
    shard_app: str | None = None
    # a shard replica keeps a build it no longer serves this long, so requests pinned to it finish
    shard_retain_s: float = Field(30.0, ge=0)
    # per shard call: tries (another replica of the shard may answer) and the time each may take
    shard_attempts: int = Field(3, ge=1)
    shard_timeout_s: float = Field(10.0, gt=0)
    # /retrieve when a shard does not answer: False -> 503 + Retry-After; True -> the top-k of the shards
    # that answered, flagged by `coverage` (answered < shards). /score always needs every row: 503.
    shard_partial: bool = False


Features = Annotated[
    dict,
    Field(
        max_length=MAX_KEYS,
        description="the user's features: the user tower's declared columns (one value or list per column, "
        "as the live build's package declares them), for a user not in the build's user table or instead of it",
        json_schema_extra={GENERATED: "user"},
    ),
]


class ScoreBody(BaseModel):
    """One user (by id, and/or by features) with candidates, or explicit (user_id, item_id) rows."""

    model_config = ConfigDict(extra="forbid")

    user_id: Int64 | None = None
    features: Features | None = None
    item_ids: list[Int64] | None = Field(None, min_length=1)
    rows: list[tuple[Int64, Int64]] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_form(self) -> ScoreBody:
        single = self.user_id is not None or self.item_ids is not None or self.features is not None
        if single and self.rows is not None:
            raise ValueError("send either {user_id and/or features, item_ids} or {rows}, not both")
        if self.rows is None and (self.item_ids is None or (self.user_id is None and self.features is None)):
            raise ValueError(
                "expected {user_id: int, item_ids: [int, ...]}, {features: {...}, item_ids: [int, ...]} "
                "or {rows: [[user_id, item_id], ...]}"
            )
        return self

    def n_rows(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.item_ids or [])


class ScoreResponse(BaseModel):
    scores: list[float]
    build_id: str
    checkpoint_version: str


class RetrieveBody(BaseModel):
    """A user by id (in the build's user table), and/or by features (any user)."""

    model_config = ConfigDict(extra="forbid")

    user_id: Int64 | None = None
    features: Features | None = None
    k: StrictInt = Field(10, ge=1, le=INT64_MAX)

    @model_validator(mode="after")
    def _a_user(self) -> RetrieveBody:
        if self.user_id is None and self.features is None:
            raise ValueError("expected user_id and/or features")
        return self


class Coverage(BaseModel):
    """A sharded build's answer: how many of its shards it came from (`full` false: some did not answer
    and the app allows partial answers, so the top-k lacks those shards' items)."""

    answered: int
    shards: int
    full: bool


class RetrieveResponse(BaseModel):
    item_ids: list[int]
    scores: list[float]
    sources: list[str]  # "base" or "sidecar" per item
    build_id: str
    checkpoint_version: str
    user_source: Literal["table", "features"]
    coverage: Coverage | None = None  # sharded builds only


Item = Annotated[
    dict,
    Field(
        max_length=MAX_KEYS,
        description="a fresh or changed item: its item_id and the item tower's declared columns, as the "
        "live build's package declares them",
        json_schema_extra={GENERATED: "item"},
    ),
]


class ItemsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[Item] = Field(min_length=1, max_length=MAX_ITEMS)
