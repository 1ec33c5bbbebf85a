"""HTTP request/response bodies, the application's typed arguments and its deployment limits."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator
from ray.serve.config import BackpressureConfig

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
    max_candidates: int = Field(2000, ge=1)
    max_k: int = Field(1000, ge=1)
    poll_interval_s: float = Field(0.25, gt=0)  # registry + sidecar log: fresh items show up within this
    max_sidecar_items: int = Field(10_000, ge=1)
    torch_threads: int = Field(1, ge=1)
    faiss_threads: int = Field(1, ge=1)


class ScoreBody(BaseModel):
    """Either one user with candidates, or explicit (user_id, item_id) rows."""

    model_config = ConfigDict(extra="forbid")

    user_id: StrictInt | None = None
    item_ids: list[StrictInt] | None = Field(None, min_length=1)
    rows: list[tuple[StrictInt, StrictInt]] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_form(self) -> ScoreBody:
        single = self.user_id is not None or self.item_ids is not None
        if single and self.rows is not None:
            raise ValueError("send either {user_id, item_ids} or {rows}, not both")
        if self.rows is None and (self.user_id is None or self.item_ids is None):
            raise ValueError(
                "expected {user_id: int, item_ids: [int, ...]} or {rows: [[user_id, item_id], ...]}"
            )
        return self

    def n_rows(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.item_ids or [])


class ScoreResponse(BaseModel):
    scores: list[float]
    build_id: str
    checkpoint_version: str


class RetrieveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: StrictInt
    k: StrictInt = Field(10, ge=1)


class RetrieveResponse(BaseModel):
    item_ids: list[int]
    scores: list[float]
    sources: list[str]  # "base" or "sidecar" per item
    build_id: str
    checkpoint_version: str


class ItemIn(BaseModel):
    """A fresh or changed item, with the same raw features as the catalog."""

    model_config = ConfigDict(extra="forbid")

    item_id: StrictInt
    title: str = Field(min_length=1, max_length=500)
    genres: str = Field("", max_length=500, description="pipe-separated, e.g. 'Comedy|Drama'")
    year: StrictInt | None = None
    tags: str = Field("", max_length=2000)


class ItemsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ItemIn] = Field(min_length=1, max_length=1000)
