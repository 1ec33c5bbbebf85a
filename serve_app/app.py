"""The skewless Serve application: POST /score, POST /retrieve, GET /healthz, GET /version.

    serve run serve_app.app:build_app registry=/abs/path/registry
    serve deploy serve_app/config.yaml        # or: serve run serve_app/config.yaml

Each replica follows the registry's CURRENT pointer in a background thread, loads a new build
(index + towers + tables of ONE checkpoint), validates it and swaps one reference; every batch keeps
the build it started with. The /score route validates the body and awaits a `@serve.batch` method
with plain data; inside a batch each unique user is looked up once and broadcast to its rows.
"""

# No `from __future__ import annotations` here: FastAPI must see the real body types through
# Serve's class-based ingress, or it treats `body` as a query parameter.
import asyncio
import collections
import logging
import threading
import time
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application

from core import index as ann
from core.broadcast import BroadcastConfig, ScoreRequest, ScoreResult, score_batch
from core.live_build import BuildWatcher, LiveBuild
from core.sidecar import Sidecar, SidecarFull, SidecarLog, SidecarSnapshot, merge_topk
from serve_app.metrics import ReplicaMetrics
from serve_app.schemas import (
    DEPLOYMENT_LIMITS,
    AppArgs,
    ItemsBody,
    RetrieveBody,
    RetrieveResponse,
    ScoreBody,
    ScoreResponse,
)

log = logging.getLogger("skewless.serve")
api = FastAPI(title="skewless", description="Two-tower scoring and retrieval on version-homogeneous builds")


@serve.deployment(name="Recommender", **DEPLOYMENT_LIMITS)
@serve.ingress(api)
class Recommender:
    def __init__(self, args: dict):
        self.args = AppArgs(**args)
        torch.set_num_threads(self.args.torch_threads)
        ann.configure(self.args.faiss_threads)
        self.bcfg = BroadcastConfig(
            self.args.broadcast, self.args.max_unique_users_per_batch, self.args.cap_policy
        )
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_tag
        self.metrics = ReplicaMetrics(ctx.app_name, self.replica)
        self._user_buf: np.ndarray | None = None
        self.totals: collections.Counter = collections.Counter()  # this replica's counters, for GET /stats
        self._score_batch.set_max_batch_size(self.args.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        query = Path(self.args.query_checkpoint) if self.args.query_checkpoint else None
        self.watcher = BuildWatcher(
            Path(self.args.registry), query_checkpoint=query, on_event=self._on_build_event
        )
        self.sidecar_log = SidecarLog(Path(self.args.registry))
        self._sidecar = Sidecar(self.sidecar_log)
        # (live build, its sidecar view): replaced as ONE reference, so retrieval never mixes a build
        # with sidecar vectors embedded by another checkpoint.
        self.state: tuple[LiveBuild, SidecarSnapshot] | None = None
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
        """Runs on the follower thread only: follow CURRENT, then the sidecar log."""
        self.watcher.poll()
        live = self.watcher.live
        if live is None:
            return
        prev = self.state[1] if self.state else None
        snap = self._sidecar.snapshot(live, prev)
        if self.state is None or snap is not prev or self.state[0] is not live:
            self.state = (live, snap)
            self.metrics.sidecar_items.set(len(snap.ids), self.metrics._t())

    def _on_build_event(
        self, outcome: str, old: LiveBuild | None, new: LiveBuild | None, detail: str
    ) -> None:
        self.metrics.swap(outcome, old, new)
        if outcome == "refused":
            log.error("replica %s keeps serving %s; refused %s", self.replica, old and old.build_id, detail)

    def _live(self) -> LiveBuild:
        live = self.watcher.live
        if live is None:
            raise HTTPException(
                503, f"no build is live in registry {self.args.registry}", headers={"Retry-After": "1"}
            )
        return live

    # ---- routes ----------------------------------------------------------------------------------
    @api.get("/healthz")
    def healthz(self):
        live = self.watcher.live
        if live is None:
            return JSONResponse(
                {"status": "no build loaded", "registry": self.args.registry}, status_code=503
            )
        return {"status": "ok", "build_id": live.build_id}

    @api.get("/version")
    def version(self):
        live = self._live()
        return {
            "build_id": live.build_id,
            "checkpoint_version": live.checkpoint_version,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(live.loaded_at)),
            "replica": self.replica,
            "sidecar_items": 0 if self.state is None else len(self.state[1].ids),
            "last_refused": None
            if self.watcher.last_refused is None
            else dict(zip(("build_id", "reason"), self.watcher.last_refused, strict=True)),
        }

    @api.get("/stats")
    def stats(self):
        """This replica's scoring counters since start (the same numbers feed the Prometheus metrics)."""
        return {
            "replica": self.replica,
            "broadcast": self.bcfg.enabled,
            "cap_policy": self.bcfg.policy,
            **self.totals,
        }

    @api.post("/score", response_model=ScoreResponse)
    async def score(self, body: ScoreBody):
        n = body.n_rows()
        if n > self.args.max_candidates:
            self.metrics.error(413)
            raise HTTPException(413, f"{n} rows exceed the limit of {self.args.max_candidates} per request")
        if body.rows is not None:
            arr = np.asarray(body.rows, dtype=np.int64)  # (R, 2)
            req = ScoreRequest(arr[:, 0].copy(), arr[:, 1].copy())
        else:
            req = ScoreRequest(
                np.full(n, body.user_id, dtype=np.int64), np.asarray(body.item_ids, dtype=np.int64)
            )
        result, live = await self._score_batch(req)
        if result.error is not None:
            self.metrics.error(result.status)
            headers = {"Retry-After": "1"} if result.status in (429, 503) else None
            raise HTTPException(result.status, result.error, headers=headers)
        return ScoreResponse(
            scores=result.scores.tolist(), build_id=live.build_id, checkpoint_version=live.checkpoint_version
        )

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _score_batch(self, requests: list[ScoreRequest]) -> list[tuple[ScoreResult, LiveBuild | None]]:
        live = self.watcher.live  # the whole batch is scored by this one build
        if live is None:
            err = ScoreResult(status=503, error=f"no build is live in registry {self.args.registry}")
            return [(err, None)] * len(requests)
        t0 = time.perf_counter()
        try:
            results, stats = await asyncio.to_thread(
                score_batch, live, requests, self.bcfg, self._buffer(live)
            )
        except Exception:
            # Never let one request's failure fail its neighbours: isolate by scoring one at a time.
            log.exception("batch scoring failed; retrying requests one by one")
            results = [await asyncio.to_thread(self._score_one, live, r) for r in requests]
            return [(r, live) for r in results]
        score_ms = (time.perf_counter() - t0) * 1000
        self.metrics.batch(stats, score_ms)
        self.totals.update(
            batches=1, rows=stats.rows, unique_users=stats.unique_users, user_lookups=stats.user_lookups
        )
        # summed wall time of batch scoring (lookups + towers + scorer): benchmarks/serve_load.py sets it
        # against the request latency and the replica's CPU time to show where a request's time goes
        self.totals["score_ms"] = round(self.totals["score_ms"] + score_ms, 3)
        self.totals.update({f"cap_{policy}": n for policy, n in stats.cap_events.items()})
        return [(r, live) for r in results]

    def _score_one(self, live: LiveBuild, req: ScoreRequest) -> ScoreResult:
        try:
            return score_batch(live, [req], self.bcfg, None)[0][0]
        except Exception as e:  # noqa: BLE001 - reported to this request only
            return ScoreResult(status=500, error=f"scoring failed: {type(e).__name__}: {e}")

    def _buffer(self, live: LiveBuild) -> np.ndarray:
        """(cap, D) user-embedding buffer, allocated once and reused (bounded by the unique-user cap)."""
        if self._user_buf is None or self._user_buf.shape[1] != live.dim:
            self._user_buf = np.empty((self.bcfg.max_unique_users, live.dim), dtype=np.float32)
        return self._user_buf

    def _serving_state(self) -> tuple[LiveBuild, SidecarSnapshot]:
        if self.state is None:
            raise HTTPException(
                503, f"no build is live in registry {self.args.registry}", headers={"Retry-After": "1"}
            )
        return self.state

    @api.post("/retrieve", response_model=RetrieveResponse)
    async def retrieve(self, body: RetrieveBody):
        if body.k > self.args.max_k:
            raise HTTPException(422, f"k={body.k} exceeds the limit of {self.args.max_k}")
        live, snap = self._serving_state()
        rows, unknown = live.user_rows(np.array([body.user_id], dtype=np.int64))
        if unknown[0]:
            self.metrics.error(404)
            raise HTTPException(404, f"unknown user_id {body.user_id} in build {live.build_id}")
        ids, scores, sources = await asyncio.to_thread(merge_topk, live, snap, int(rows[0]), body.k)
        return RetrieveResponse(
            item_ids=ids,
            scores=scores,
            sources=sources,
            build_id=live.build_id,
            checkpoint_version=live.checkpoint_version,
        )

    # ---- fresh-item sidecar ----------------------------------------------------------------------
    async def _until_applied(self, offset: int, timeout_s: float = 5.0) -> None:
        """Read-your-writes: wake the follower and wait until this replica's view includes `offset`."""
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.state is not None and self.state[1].offset >= offset:
                return
            await asyncio.sleep(0.01)

    async def _write_sidecar(self, entries: list[dict], op: str) -> None:
        try:
            offset = await asyncio.to_thread(self.sidecar_log.write, entries, self.args.max_sidecar_items)
        except SidecarFull as e:
            self.metrics.error(507)
            raise HTTPException(507, str(e)) from None
        self.metrics.sidecar_ops.inc(len(entries), self.metrics._t(op=op))
        await self._until_applied(offset)

    @api.post("/items")
    async def upsert_items(self, body: ItemsBody):
        live, _ = self._serving_state()
        entries = [
            {"op": "upsert", "item_id": it.item_id, "item": it.model_dump(exclude={"item_id"})}
            for it in body.items
        ]
        await self._write_sidecar(entries, "upsert")
        live, snap = self._serving_state()
        return {
            "upserted": [it.item_id for it in body.items],
            "sidecar_items": len(snap.ids),
            "build_id": live.build_id,
            "checkpoint_version": live.checkpoint_version,
        }

    @api.delete("/items/{item_id}")
    async def delete_item(self, item_id: int):
        await self._write_sidecar([{"op": "delete", "item_id": item_id}], "delete")
        live, snap = self._serving_state()
        return {"deleted": item_id, "sidecar_items": len(snap.ids), "build_id": live.build_id}

    @api.get("/items/{item_id}")
    def get_item(self, item_id: int):
        """Where an item is served from and which checkpoint version embedded it."""
        live, snap = self._serving_state()
        base = {"item_id": item_id, "build_id": live.build_id, "embedded_by": live.checkpoint_version}
        if item_id in snap.deleted:
            raise HTTPException(404, f"item {item_id} was deleted")
        if item_id in set(snap.ids.tolist()):
            return {**base, "source": "sidecar"}
        if not live.item_rows(np.array([item_id], dtype=np.int64))[1][0]:
            return {**base, "source": "base"}
        raise HTTPException(404, f"unknown item_id {item_id} in build {live.build_id} and the sidecar")

    def __del__(self):
        if hasattr(self, "_stop"):
            self._stop.set()


def build_app(args: dict) -> Application:
    """Application builder: `serve run serve_app.app:build_app registry=... broadcast=false`."""
    a = AppArgs(**args)
    a = a.model_copy(update={"registry": str(Path(a.registry).resolve())})
    # A replica must accept a whole batch at once (PITFALLS: max_ongoing_requests caps the batch); the
    # Serve config's `deployments` section can still override this.
    return Recommender.options(
        max_ongoing_requests=max(64, 2 * a.max_batch_size), max_queued_requests=a.max_queued_requests
    ).bind(a.model_dump())
