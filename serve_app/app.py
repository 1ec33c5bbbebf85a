"""The skewless Serve application.

    POST   /score        scores of candidates for one user (by id and/or features), or of (user, item) rows
    POST   /retrieve     top-k items for one user (by id and/or features): base index + fresh-item sidecar
    GET    /healthz      200 once this replica serves a build, else 503
    GET    /version      the build this replica serves, its age, its sidecar, the canary (build, percent),
                         the last refused build
    GET    /stats        this replica's scoring counters
    GET    /items/{id}   where an item is served from and which checkpoint version embedded it
    GET    /openapi.json the request schemas, with `features` and the items as the live build's model
                         package declares them (serve_app/features.py)
    POST   /items        upsert fresh items into the sidecar     (Authorization: Bearer <admin token>)
                         (each: item_id and the item tower's declared columns)
    DELETE /items/{id}   hide an item                            (Authorization: Bearer <admin token>)

    serve run serve_app.app:build_app registry=/abs/path/registry
    serve deploy serve_app/config.yaml        # or: serve run serve_app/config.yaml

Each replica follows the registry's CURRENT pointer and the sidecar log in a background thread
(`core.serving.serving_state.ReplicaState`), and publishes ONE routing reference (the live build + its sidecar
view, and the canary build + its own while one is ramped in); every request reads it once, is routed
by a stable hash of its user id (`core.serving.canary`: one user sees one build on every replica), and is
served by that build from start to end; the answer names it (`build_id`, header x-skewless-build). The routes validate the
body (a user's features and fresh items field by field against the package of the build that serves
them, so a malformed one is a 422 naming its field and never reaches a batch) and await `@serve.batch`
methods with plain data; inside a scoring batch each unique user is looked up (or embedded from its
features by the build's own user tower) once and broadcast to its rows.
"""

# No `from __future__ import annotations` here: FastAPI must see the real body types through
# Serve's class-based ingress, or it treats `body` as a query parameter.
import asyncio
import collections
import json
import logging
import threading
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from fastapi import FastAPI, Header, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve import Application

from core.ann import index as ann
from core.contract.spec import ContractError
from core.serving.broadcast import BroadcastConfig, ScoreRequest, ScoreResult, score_batch
from core.serving.compact_body import ARROW_STREAM, BodyError, decode_rows
from core.serving.serving_state import (
    ReplicaState,
    RetrieveQuery,
    Routing,
    ServingState,
    retrieve,
)
from core.serving.shard_build import ShardedLiveBuild, shard_of
from core.serving.sidecar import embeddable
from core.storage.registry import Registry
from core.storage.sidecar_log import INT64_MAX, INT64_MIN, Position, SidecarFull
from core.storage.store import is_remote, location
from serve_app import features
from serve_app.auth import AdminAuth
from serve_app.bodies import SCORE_BODIES, body_kind, parse_json_body
from serve_app.metrics import ReplicaMetrics, resident_mib
from serve_app.schemas import (
    DEPLOYMENT_LIMITS,
    AppArgs,
    Coverage,
    ItemsBody,
    RetrieveBody,
    RetrieveResponse,
    ScoreBody,
    ScoreResponse,
)
from serve_app.sharded import Fanout, ShardUnavailable, shard_apps
from serve_app.sharded_ingress import ShardedIngress

log = logging.getLogger("skewless.serve")


def _into_replica_log() -> None:
    """Serve writes a replica's log from the `ray.serve` logger only: hand its handlers to this app's
    and core's loggers, so a skipped sidecar entry or a refused build shows in the replica's own log."""
    serve_logger = logging.getLogger("ray.serve")
    for name in ("skewless", "core"):
        lg = logging.getLogger(name)
        lg.handlers, lg.propagate = list(serve_logger.handlers), False
        lg.setLevel(logging.INFO)


api = FastAPI(
    summary="skewless: scoring and retrieval on version-homogeneous builds",
    description="Two-tower scoring and retrieval; request features and fresh items are validated against "
    "the live build's model package, whose declared inputs this document shows",
)
ItemId = Annotated[int, PathParam(ge=INT64_MIN, le=INT64_MAX)]

# /openapi.json: FastAPI calls `api.openapi()`, which has no way to the replica; the replica registers
# its state with serve_app.features (`features.REPLICA`), and the document is rebuilt when the live
# build's package version changes. A module-level function: Serve serves a pickled copy of `api`, which
# refers to this function by name.
_openapi_cache: dict = {"version": None, "document": None}


def _openapi() -> dict:
    package = features.live_package()
    version = None if package is None else package.version
    if _openapi_cache["document"] is None or _openapi_cache["version"] != version:
        _openapi_cache.update(document=features.openapi(FastAPI.openapi(api), package), version=version)
    return _openapi_cache["document"]


api.openapi = _openapi


@api.exception_handler(RequestValidationError)
async def _invalid_request(_request, exc: RequestValidationError) -> Response:
    """422 naming each invalid field. The offending input is NOT echoed: it may be NaN/Infinity or text
    with lone surrogates, which FastAPI's default handler cannot encode (it answered 500)."""
    detail = [
        {"loc": [x if isinstance(x, int) else str(x) for x in e.get("loc", ())], "msg": str(e.get("msg")),
         "type": str(e.get("type"))}
        for e in exc.errors()
    ]  # fmt: skip
    return Response(json.dumps({"detail": detail}, ensure_ascii=True), 422, media_type="application/json")


def _by_state(items: list[tuple]) -> list[tuple[ServingState, list[int]]]:
    """Group a batch's (state, request) pairs by the state each request pinned (one group, except
    across a swap): each group is served by its own build."""
    groups: dict[int, tuple[ServingState, list[int]]] = {}
    for k, (state, _) in enumerate(items):
        groups.setdefault(id(state), (state, []))[1].append(k)
    return list(groups.values())


@serve.deployment(name="Recommender", **DEPLOYMENT_LIMITS)
@serve.ingress(api)
class Recommender(ShardedIngress):
    def __init__(self, args: dict, shards: list | None = None):
        _into_replica_log()
        self.rss_at_start = resident_mib()  # the process's fixed cost (Ray, torch, faiss), before any build
        self.args = AppArgs(**args)
        # sharded serving: handles of the shard deployments (serve_app/sharded.py); None: merged builds
        if not shards and self.args.shard_app and self.args.shards:
            app, n = self.args.shard_app, self.args.shards
            shards = lambda: [serve.get_deployment_handle(f"Shard{i}", app) for i in range(n)]  # noqa: E731
        self.fanout = (
            None if not shards else Fanout(shards, self.args.shard_attempts, self.args.shard_timeout_s)
        )
        torch.set_num_threads(self.args.torch_threads)
        ann.configure(self.args.faiss_threads)
        self.bcfg = BroadcastConfig(
            self.args.broadcast,
            self.args.max_unique_users_per_batch,
            self.args.cap_policy,
            self.args.dedup_items,
        )
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_tag
        self.metrics = ReplicaMetrics(ctx.app_name, self.replica)
        self.auth = AdminAuth(self.args.admin_token_file)
        log.info(
            "replica %s: sidecar writes %s",
            self.replica,
            "need the admin token" if self.auth.enabled else "are off",
        )
        self._user_buf: np.ndarray | None = None
        self._slot_cache: dict[tuple, bool] = {}  # (package version, item id, logged at) -> takes a slot
        self.totals: collections.Counter = collections.Counter()  # this replica's counters, for GET /stats
        for batched in (self._score_batch, self._retrieve_batch):
            batched.set_max_batch_size(self.args.max_batch_size)
            batched.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        query = Path(self.args.query_checkpoint) if self.args.query_checkpoint else None
        sharded = {} if self.fanout is None else {"loader": self._user_side, "ready": self._shards_ready}
        self.rs = ReplicaState(
            location(self.args.registry),
            query_checkpoint=query,
            on_build_event=self._on_build_event,
            on_bad_entry=lambda entry, why: self.metrics.sidecar_skipped.inc(1, self.metrics._t()),
            **sharded,
        )
        self.sidecar_log = self.rs.sidecar.log
        features.REPLICA["state"] = self.rs  # /openapi.json shows its live build's package
        self._stop, self._wake = threading.Event(), threading.Event()
        self._tick()  # serve at once if a build is live; otherwise /healthz says 503 until one is
        threading.Thread(target=self._follow_registry, name="registry-follower", daemon=True).start()

    def _follow_registry(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.args.poll_interval_s)
            self._wake.clear()
            try:
                self._tick()
            except Exception:  # the follower must survive a flaky filesystem read
                log.exception("registry/sidecar poll failed; will retry")

    def _tick(self) -> None:
        self.rs.tick()
        self.metrics.state(self.rs.routing, self.rs.age_s())  # re-set each tick: Ray drops gauges left unset

    def _on_build_event(self, outcome: str, old, new, detail: str) -> None:
        self.metrics.swap(outcome, old, new)
        if outcome == "canary":
            log.info("replica %s: canary %s beside %s", self.replica, new.build_id, old and old.build_id)
        if outcome == "refused":
            log.error("replica %s keeps serving %s; refused %s", self.replica, old and old.build_id, detail)

    def _routing(self) -> Routing:
        routing = self.rs.routing
        if routing is None:
            raise HTTPException(
                503, f"no build is live in registry {self.args.registry}", headers={"Retry-After": "1"}
            )
        return routing

    def _state(self, user_id: int | None = None, user_features=None) -> ServingState:
        """The one state reference a request uses from start to end: the build its user is routed to
        (a request of several users goes by its first; one that sends only features, by the id column
        its features hold, if any), the live build when it names no user."""
        routing = self._routing()
        if user_id is None and user_features is not None:
            user_id = features.feature_user_id(routing.live.build.model, user_features)
        return routing.live if user_id is None else routing.route(user_id)

    def _answered(self, response: Response, state: ServingState, t0: float, top: float | None) -> None:
        response.headers["x-skewless-build"] = state.build.build_id
        response.headers["x-skewless-replica"] = self.replica
        self.metrics.answered(state.build.build_id, (time.perf_counter() - t0) * 1000, top)

    def _features(self, state: ServingState, raw: dict, user_id: int | None):
        """The request's user features, validated against the package of the build that serves it:
        the one-row table its user tower reads. A malformed field is a 422 naming it."""
        try:
            return features.user_features(state.build.model, raw, user_id)
        except RequestValidationError:
            self.metrics.error(422, state.build.build_id)
            raise
        except ContractError as e:
            self.metrics.error(422, state.build.build_id)
            raise HTTPException(422, f"features: {e}") from None

    def _unknown_user(self, state: ServingState, user_id: int) -> HTTPException:
        self.metrics.error(404, state.build.build_id)
        return HTTPException(
            404, f"unknown user_id {user_id} in build {state.build.build_id}: {self._send_features(state)}"
        )

    @staticmethod
    def _send_features(state: ServingState) -> str:
        cols = [s.name for s in state.build.model.user_inputs]
        return f"send the user's `features` ({', '.join(cols)}: see /openapi.json) to serve a user not in its user table"

    # ---- routes ----------------------------------------------------------------------------------
    @api.get("/healthz")
    def healthz(self):
        state = self.rs.current
        if state is None:
            return JSONResponse(
                {"status": "no build loaded", "registry": self.args.registry}, status_code=503
            )
        return {"status": "ok", "build_id": state.build.build_id}

    @api.get("/version")
    def version(self):
        routing = self._routing()
        state = routing.live
        b, snap = state.build, state.sidecar
        refused = self.rs.watcher.last_refused
        c = routing.canary
        canary = None if c is None else {
            "build_id": c.build.build_id, "checkpoint_version": c.build.checkpoint_version,
            "percent": routing.percent, "skew_check_passed": c.skew_check_passed,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(c.build.loaded_at)),
            "sidecar_items": len(c.sidecar.ids),
        }  # fmt: skip
        return {
            "build_id": b.build_id,
            "checkpoint_version": b.checkpoint_version,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(b.loaded_at)),
            "build_created_at": b.manifest.created_at,
            "build_age_s": round(max(0.0, time.time() - b.manifest.created_at_epoch()), 1),
            "has_user_table": b.manifest.has_users,
            "skew_check_passed": state.skew_check_passed,
            "replica": self.replica,
            "sidecar_items": len(snap.ids),
            "sidecar_skipped_entries": snap.skipped,
            "sidecar_writes": "token" if self.auth.enabled else "off",
            "canary": canary,
            "last_refused": None
            if refused is None
            else dict(zip(("build_id", "reason"), refused, strict=True)),
        }

    @api.get("/shards")
    async def shards(self):
        """Sharded serving: each shard deployment's answer from one of its replicas (the builds it holds,
        with their rows, and its resident memory); 404 on a one-deployment app."""
        if self.fanout is None:
            raise HTTPException(404, "this app serves merged builds: it has no shard deployments")
        return {"shards": await self.fanout.info()}

    @api.get("/stats")
    def stats(self):
        """This replica's scoring counters since start (the same numbers feed the Prometheus metrics)."""
        return {
            "replica": self.replica,
            "broadcast": self.bcfg.enabled,
            "cap_policy": self.bcfg.policy,
            "rss_mib": round(resident_mib(), 1),
            "rss_mib_at_start": round(self.rss_at_start, 1),
            **self.totals,
        }

    @api.post(
        "/score", response_model=ScoreResponse, response_model_exclude_none=True, openapi_extra=SCORE_BODIES
    )
    async def score(self, request: Request, response: Response):
        """JSON (ScoreBody) or, by content-type, the compact Arrow rows (core/serving/compact_body.py): both
        become the same ScoreRequest and may share a batch."""
        t0 = time.perf_counter()
        raw = await request.body()
        kind = body_kind(request.headers.get("content-type"))
        if kind is None:
            self.metrics.error(415)
            raise HTTPException(415, f"content-type {request.headers.get('content-type')!r}: expected "
                                     f"application/json or {ARROW_STREAM}")  # fmt: skip
        if kind == "arrow":
            try:
                users, items = decode_rows(raw, self.args.max_candidates)
            except BodyError as e:
                self.metrics.error(e.status)
                raise HTTPException(e.status, str(e)) from None
            state = self._state(int(users[0]) if len(users) else 0)
            return await self._score(state, ScoreRequest(users, items), response, t0)
        body = parse_json_body(ScoreBody, raw)
        state = self._state(body.rows[0][0] if body.rows else body.user_id, body.features)
        n = body.n_rows()
        if n > self.args.max_candidates:
            self.metrics.error(413, state.build.build_id)
            raise HTTPException(413, f"{n} rows exceed the limit of {self.args.max_candidates} per request")
        if body.rows is not None:
            arr = np.asarray(body.rows, dtype=np.int64)  # (R, 2)
            req = ScoreRequest(arr[:, 0].copy(), arr[:, 1].copy())
        else:
            table = None if body.features is None else self._features(state, body.features, body.user_id)
            uid = body.user_id
            if uid is None and body.features is not None:  # its features' id column, if it has one
                uid = features.feature_user_id(state.build.model, body.features)
            uid = 0 if uid is None else uid
            req = ScoreRequest(np.full(n, uid, np.int64), np.asarray(body.item_ids, np.int64), table)
        return await self._score(state, req, response, t0)

    async def _score(
        self, state: ServingState, req: ScoreRequest, response: Response, t0: float
    ) -> ScoreResponse:
        result, state = await self._score_batch((state, req))
        error, status = result.error, result.status
        if error is None and req.features is not None and not np.isfinite(result.scores).all():
            # the features are in their declared ranges, yet the model gives no finite score for them
            error, status = "the user's features give non-finite scores under this build's model", 422
        if error is not None:
            self.metrics.error(status, state.build.build_id)
            if status == 404 and "unknown user_id" in error:
                error = f"{error}: {self._send_features(state)}"
            headers = {"Retry-After": "1"} if status in (429, 503) else None
            raise HTTPException(status, error, headers=headers)
        b = state.build
        self._answered(response, state, t0, float(result.scores.max()) if len(result.scores) else None)
        return ScoreResponse(
            scores=result.scores.tolist(), build_id=b.build_id, checkpoint_version=b.checkpoint_version
        )

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _score_batch(
        self, items: list[tuple[ServingState, ScoreRequest]]
    ) -> list[tuple[ScoreResult, ServingState]]:
        out: list = [None] * len(items)
        for state, ks in _by_state(items):
            results = await self._score_group(state, [items[k][1] for k in ks])
            for k, r in zip(ks, results, strict=True):
                out[k] = (r, state)
        return out

    async def _score_group(self, state: ServingState, requests: list[ScoreRequest]) -> list[ScoreResult]:
        live = state.build
        t0 = time.perf_counter()
        if isinstance(live, ShardedLiveBuild):
            return await self._score_sharded(live, requests, t0)
        try:
            results, stats = await asyncio.to_thread(
                score_batch, live, requests, self.bcfg, self._buffer(live.dim)
            )
        except Exception:
            # Never let one request's failure fail its neighbours: isolate by scoring one at a time.
            log.exception("batch scoring failed; retrying requests one by one")
            return [await asyncio.to_thread(self._score_one, live, r) for r in requests]
        score_ms = (time.perf_counter() - t0) * 1000
        self.metrics.batch(stats, score_ms, live.build_id)
        self.totals.update(
            batches=1, rows=stats.rows, unique_users=stats.unique_users, user_lookups=stats.user_lookups,
            item_lookups=stats.item_lookups, history_users=stats.history_users,
        )  # fmt: skip
        # summed wall time of batch scoring (lookups + towers + scorer): benchmarks/serve_load.py sets it
        # against the request latency and the replica's CPU time to show where a request's time goes
        self.totals["score_ms"] = round(self.totals["score_ms"] + score_ms, 3)
        self.totals.update({f"cap_{policy}": n for policy, n in stats.cap_events.items()})
        return results

    def _score_one(self, live, req: ScoreRequest) -> ScoreResult:
        try:
            return score_batch(live, [req], self.bcfg, None)[0][0]
        except Exception as e:  # noqa: BLE001 - reported to this request only
            log.exception("scoring one request failed")
            return ScoreResult(status=500, error=f"scoring failed: {type(e).__name__}")

    def _buffer(self, dim: int) -> np.ndarray:
        """(cap, D) user-embedding buffer, allocated once and reused (bounded by the unique-user cap)."""
        if self._user_buf is None or self._user_buf.shape[1] != dim:
            self._user_buf = np.empty((self.bcfg.max_unique_users, dim), dtype=np.float32)
        return self._user_buf

    @api.post("/retrieve", response_model=RetrieveResponse, response_model_exclude_none=True)
    async def retrieve(self, body: RetrieveBody, response: Response):
        t0 = time.perf_counter()
        if body.k > self.args.max_k:
            raise HTTPException(422, f"k={body.k} exceeds the limit of {self.args.max_k}")
        state = self._state(body.user_id, body.features)
        b = state.build
        if body.features is not None:
            table = self._features(state, body.features, body.user_id)
            uid = (
                body.user_id if body.user_id is not None else features.feature_user_id(b.model, body.features)
            )
            query = RetrieveQuery(body.k, user_id=uid or 0, features=table)
        else:
            rows, unknown = b.user_rows(np.array([body.user_id], dtype=np.int64))
            if unknown[0]:
                raise self._unknown_user(state, body.user_id)
            query = RetrieveQuery(body.k, user_row=int(rows[0]))
        res = await self._retrieve_batch((state, query))
        if isinstance(res, ShardUnavailable):
            self.metrics.error(503, b.build_id)
            raise HTTPException(503, str(res), headers={"Retry-After": "1"})
        if isinstance(res, Exception):
            self.metrics.error(500, b.build_id)
            raise HTTPException(500, f"retrieval failed: {type(res).__name__}")
        if body.features is not None and not np.isfinite(res.scores).all():
            self.metrics.error(422, b.build_id)  # in their declared ranges, yet no finite query vector
            raise HTTPException(422, "the user's features give non-finite scores under this build's model")
        self._answered(response, state, t0, res.scores[0] if res.scores else None)
        return RetrieveResponse(
            item_ids=res.item_ids, scores=res.scores, sources=res.sources, build_id=b.build_id,
            checkpoint_version=b.checkpoint_version, user_source="table" if body.features is None else "features",
            coverage=None if res.coverage is None else Coverage(answered=res.coverage[0], shards=res.coverage[1],
                                                                full=res.coverage[0] == res.coverage[1]),
        )  # fmt: skip

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _retrieve_batch(self, items: list[tuple[ServingState, RetrieveQuery]]) -> list:
        out: list = [None] * len(items)
        for state, ks in _by_state(items):
            queries = [items[k][1] for k in ks]
            if isinstance(state.build, ShardedLiveBuild):
                results, embedded = await self._retrieve_sharded(state, queries)
                self.totals.update(retrieve_batches=1, retrieved=len(queries), history_users=embedded)
                for k, r in zip(ks, results, strict=True):
                    out[k] = r
                continue
            try:
                results, embedded = await asyncio.to_thread(retrieve, state, queries)
            except Exception:  # isolate: one query's failure must not fail its neighbours
                log.exception("batch retrieval failed; retrying queries one by one")
                results, embedded = [await self._retrieve_one(state, q) for q in queries], 0
            self.totals.update(retrieve_batches=1, retrieved=len(queries), history_users=embedded)
            for k, r in zip(ks, results, strict=True):
                out[k] = r
        return out

    async def _retrieve_one(self, state: ServingState, query: RetrieveQuery):
        try:
            return (await asyncio.to_thread(retrieve, state, [query]))[0][0]
        except Exception as e:  # noqa: BLE001 - reported to this request only
            log.exception("retrieving one query failed")
            return e

    # ---- fresh-item sidecar ----------------------------------------------------------------------
    def _takes_a_slot(self):
        """A logged upsert takes a sidecar slot unless the live package cannot embed it (a poisoned
        entry, skipped by every replica): judged once per entry and package version."""
        m = self._state().build.model
        id_column, cache = m.manifest.item_id, self._slot_cache

        def counts(entry: dict) -> bool:
            key = (m.version, int(entry["item_id"]), entry.get("at"))
            if key not in cache:
                if len(cache) > 4 * self.args.max_sidecar_items:
                    cache.clear()
                cache[key] = embeddable(entry, m.item_inputs, id_column)
            return cache[key]

        return counts

    async def _write_sidecar(self, entries: list[dict], op: str) -> tuple[Position, bool]:
        try:
            pos = await asyncio.to_thread(
                self.sidecar_log.write, entries, self.args.max_sidecar_items, self._takes_a_slot()
            )
        except SidecarFull as e:
            self.metrics.error(507)
            raise HTTPException(507, str(e)) from None
        except ValueError as e:  # beyond the log's own bounds (core.storage.sidecar_log): nothing was written
            self.metrics.error(422)
            raise HTTPException(422, str(e)) from None
        self.metrics.sidecar_ops.inc(len(entries), self.metrics._t(op=op))
        self._wake.set()  # the follower applies it now instead of at its next poll
        return pos, await self.rs.until_applied(pos, self.args.sidecar_apply_timeout_s)

    def _written(self, payload: dict, pos: Position, applied: bool) -> JSONResponse:
        """200 once this replica serves the write; 202 when it is durable but not applied in time."""
        state = self._state()
        payload = {**payload, "sidecar_items": len(state.sidecar.ids), "build_id": state.build.build_id,
                   "checkpoint_version": state.build.checkpoint_version, "log_position": {"generation": pos.generation, "offset": pos.offset}, "applied": applied}  # fmt: skip
        if not applied:
            payload["detail"] = (
                f"written to the durable log; this replica had not applied it within {self.args.sidecar_apply_timeout_s} s"
            )
        return JSONResponse(payload, status_code=200 if applied else 202)

    @api.post("/items")
    async def upsert_items(self, body: ItemsBody, authorization: Annotated[str | None, Header()] = None):
        """Each item: its item_id and the item tower's declared columns, validated against the live
        build's package (422 naming items.<i>.<field>; nothing of the request is written then)."""
        self.auth.check(authorization)
        state = self._state()  # 503 before anything is written when no build is live
        try:
            valid = features.items(state.build.model, body.items)
        except RequestValidationError:
            self.metrics.error(422, state.build.build_id)
            raise
        except ContractError as e:
            self.metrics.error(422, state.build.build_id)
            raise HTTPException(422, f"items: {e}") from None
        entries = [{"op": "upsert", "item_id": i, "item": item} for i, item in valid]
        pos, applied = await self._write_sidecar(entries, "upsert")
        return self._written({"upserted": [i for i, _ in valid]}, pos, applied)

    @api.delete("/items/{item_id}")
    async def delete_item(self, item_id: ItemId, authorization: Annotated[str | None, Header()] = None):
        self.auth.check(authorization)
        self._state()
        pos, applied = await self._write_sidecar([{"op": "delete", "item_id": item_id}], "delete")
        return self._written({"deleted": item_id}, pos, applied)

    @api.get("/items/{item_id}")
    async def get_item(self, item_id: ItemId):
        """Where an item is served from and which checkpoint version embedded it."""
        state = self._state()
        live, snap = state.build, state.sidecar
        base = {"item_id": item_id, "build_id": live.build_id, "embedded_by": live.checkpoint_version}
        ids = np.array([item_id], dtype=np.int64)
        if item_id in snap.deleted:
            raise HTTPException(404, f"item {item_id} was deleted")
        if snap.serves(ids)[0]:
            return {**base, "source": "sidecar"}
        if isinstance(live, ShardedLiveBuild):
            shard = int(shard_of(live.shard_edges, ids)[0])
            try:
                if shard >= 0 and (await self.fanout.has(live.build_id, shard, ids))[0]:
                    return {**base, "source": "base", "shard": shard}
            except ShardUnavailable as e:
                raise HTTPException(503, str(e), headers={"Retry-After": "1"}) from None
        elif not live.item_rows(ids)[1][0]:
            return {**base, "source": "base"}
        raise HTTPException(404, f"unknown item_id {item_id} in build {live.build_id} and the sidecar")

    def __del__(self):
        if hasattr(self, "_stop"):
            self._stop.set()


def build_app(args: dict) -> Application:
    """Application builder: `serve run serve_app.app:build_app registry=... broadcast=false`."""
    a = AppArgs(**args)
    if not is_remote(a.registry):  # replicas may start in another directory
        a = a.model_copy(update={"registry": str(Path(a.registry).resolve())})
    # A replica must accept a whole batch at once (max_ongoing_requests caps the batch); the Serve
    # config's `deployments` section can still override this.
    n = _shard_count(a)
    a = a.model_copy(update={"shards": n})
    own = shard_apps(a, n) if n and not a.shard_app else None
    return Recommender.options(
        max_ongoing_requests=max(64, 2 * a.max_batch_size), max_queued_requests=a.max_queued_requests
    ).bind(a.model_dump(), own)


def _shard_count(a: AppArgs) -> int:
    """Shard deployments to start: `shards` when given, else as many as the live build has (0: a
    merged build, or none live yet)."""
    if a.shards is not None:
        return a.shards
    reg = Registry(location(a.registry))
    live = reg.current()
    if live is None:
        return 0
    m = reg.manifest(live)
    return len(m.index.shards) if m.index.layout == "sharded" else 0
