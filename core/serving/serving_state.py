"""A replica's serving state as a plain class: follow the registry, swap builds, tail the sidecar.

`ReplicaState.tick()` runs on one thread (the replica's follower). It moves to a new live build when
CURRENT moves (validated by `BuildWatcher`), then catches the sidecar up for that build, and publishes
both as ONE immutable `ServingState` reference; with a canary in progress, the canary build gets its
own `ServingState` and both go out as one `Routing`. Every request reads `routing` once, takes the
state its user is routed to (`Routing.route`), and uses that reference from start to end, so a
request never mixes a build with another build's sidecar vectors or query tower. A sidecar failure never holds back a build swap: the new build goes live with the sidecar
view it could build (empty at worst) and the sidecar is replayed at the next tick.

No Ray here: unit tests drive `tick()` directly; serve_app/ wires it to a thread and to metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from core.quality import skew_gate
from core.serving import canary as canary_mod
from core.serving.live_build import BuildWatcher, LiveBuild
from core.serving.sidecar import Sidecar, SidecarSnapshot, merge_topk
from core.storage.sidecar_log import Position, open_log
from core.storage.store import location

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServingState:
    build: LiveBuild
    sidecar: SidecarSnapshot
    skew_check_passed: bool = False  # the live checkpoint version has a passed skew check on record


@dataclasses.dataclass(frozen=True)
class Routing:
    """The live state, and the canary state with the percentage of users it serves (or None)."""

    live: ServingState
    canary: ServingState | None = None
    percent: float = 0.0

    def route(self, user_id: int) -> ServingState:
        """The ONE state that serves this user: the same on every replica and every request."""
        c = self.canary
        if c is not None and canary_mod.in_canary(user_id, c.build.build_id, self.percent):
            return c
        return self.live

    def states(self) -> tuple[ServingState, ...]:
        return (self.live,) if self.canary is None else (self.live, self.canary)


class ReplicaState:
    def __init__(
        self,
        registry: Path,
        query_checkpoint: Path | None = None,
        on_build_event: Callable | None = None,
        on_bad_entry: Callable[[dict, str], None] | None = None,
        clock: Callable[[], float] = time.time,
        loader: Callable | None = None,
        ready: Callable[[LiveBuild], bool] | None = None,
    ):
        self.registry = location(registry)
        self.watcher = BuildWatcher(
            self.registry, query_checkpoint, on_event=on_build_event, loader=loader, ready=ready
        )
        self.sidecar = Sidecar(open_log(self.registry), on_bad_entry=on_bad_entry)
        self.canary_sidecar = Sidecar(open_log(self.registry), on_bad_entry=on_bad_entry)
        self.sidecar_errors = 0
        self.current: ServingState | None = None  # the live build's state
        self.canary: ServingState | None = None
        self.routing: Routing | None = None
        self._clock = clock
        self._skew_cache: dict[str, tuple] = {}  # build -> ((build, skew dir mtime), verdict)

    def tick(self) -> ServingState | None:
        """Follow CURRENT, then the sidecar log; returns the live state (`routing` holds both)."""
        self.watcher.poll()
        live = self.watcher.live
        if live is None:
            return None
        if (
            self.canary is not None and self.canary.build is live
        ):  # promoted: its state and sidecar carry over
            self.current, self.canary = self.canary, self.current
            self.sidecar, self.canary_sidecar = self.canary_sidecar, self.sidecar
        self.current = self._follow(live, self.current, self.sidecar)
        c = self.watcher.canary
        self.canary = None if c is None else self._follow(c, self.canary, self.canary_sidecar)
        r = self.routing
        percent = self.watcher.percent if self.canary is not None else 0.0
        if r is None or r.live is not self.current or r.canary is not self.canary or r.percent != percent:
            self.routing = Routing(self.current, self.canary, percent)
        return self.current

    def _follow(self, build: LiveBuild, cur: ServingState | None, sidecar: Sidecar) -> ServingState:
        """`build`'s state with its sidecar caught up: `cur` itself when nothing changed."""
        same_build = cur is not None and cur.build is build
        try:
            snap = sidecar.snapshot(build, cur.sidecar if same_build else None)
        except Exception:  # noqa: BLE001 - the sidecar must never hold back the build
            self.sidecar_errors += 1
            log.exception(
                "sidecar catch-up failed on build %s; replaying the log at the next tick", build.build_id
            )
            sidecar.reset()
            if same_build:
                return cur  # keep the view this build already had
            snap = SidecarSnapshot.empty(build)
        passed = self._skew_passed(build)
        if not same_build:
            return ServingState(build, snap, skew_check_passed=passed)
        if snap is not cur.sidecar or passed != cur.skew_check_passed:
            return dataclasses.replace(cur, sidecar=snap, skew_check_passed=passed)
        return cur

    def _skew_passed(self, live: LiveBuild) -> bool:
        """Whether the build's version has a passed skew check on record, re-read whenever the skew
        directory changes (a check can pass after the build went live). An unreadable record counts as
        no check, reported once per change; it never stops a swap."""
        family = live.manifest.checkpoint.family
        key = (live.build_id, skew_gate.stamp(self.registry, family))  # a new check changes it
        cached = self._skew_cache.get(live.build_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            passed = skew_gate.passed_check_for(self.registry, family, live.checkpoint_version) is not None
        except Exception:  # noqa: BLE001 - a hand-edited or older record must not hold serving back
            log.warning("skew check records of %s are unreadable; reporting no passed check", family)
            passed = False
        # one entry per build served (live, canary); older builds' entries go
        self._skew_cache = {b: v for b, v in self._skew_cache.items() if b in self._serving()}
        self._skew_cache[live.build_id] = (key, passed)
        return passed

    def _serving(self) -> set[str]:
        return {b.build_id for b in (self.watcher.live, self.watcher.canary) if b is not None}

    async def until_applied(self, pos: Position, timeout_s: float, poll_s: float = 0.01) -> bool:
        """Read-your-writes: wait until the published state's sidecar view includes `pos`. False when
        it did not within `timeout_s` (the write is durable; this replica has not applied it yet)."""
        deadline = time.monotonic() + timeout_s
        while True:
            r = self.routing
            if r is not None and all(s.sidecar.position.covers(pos) for s in r.states()):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(poll_s)

    def age_s(self) -> float | None:
        """Seconds since the live build's manifest was written: what bounds query/index skew."""
        cur = self.current
        return None if cur is None else max(0.0, self._clock() - cur.build.manifest.created_at_epoch())


# ---- retrieval over one state ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RetrieveQuery:
    """One user to retrieve for: a row of the build's user table, or the user's features (one row of
    the user tower's declared columns, validated)."""

    k: int
    user_row: int | None = None
    user_id: int = 0
    features: pa.Table | None = None


@dataclasses.dataclass(frozen=True)
class RetrieveResult:
    item_ids: list[int]
    scores: list[float]
    sources: list[str]
    coverage: tuple[int, int] | None = None  # sharded builds: (shards that answered, shards)


def query_vectors(build: LiveBuild, queries: list[RetrieveQuery]) -> tuple[np.ndarray, int]:
    """(Q, D) query vectors and how many users the user tower embedded: table users are gathered,
    users given by features embedded ONCE per unique (user, features) in one user-tower pass."""
    xq = np.empty((len(queries), build.dim), np.float32)
    table = [q for q, query in enumerate(queries) if query.features is None]
    xq[table] = build.user_emb[[queries[q].user_row for q in table]]
    hist = [q for q, query in enumerate(queries) if query.features is not None]
    if not hist:
        return xq, 0
    slots, vecs = build.unique_feature_vectors(
        [queries[q].user_id for q in hist], [queries[q].features for q in hist]
    )
    xq[hist] = vecs[slots]
    return xq, len(vecs)


def retrieve(state: ServingState, queries: list[RetrieveQuery]) -> tuple[list[RetrieveResult], int]:
    """Top-k over base + sidecar for a batch of queries of ONE state: one index search for the whole
    batch, deep enough that hidden (upserted or deleted) base entries cannot starve any query."""
    xq, embedded = query_vectors(state.build, queries)
    ids, scores = state.build.search(xq, search_depth(state, queries))  # (Q, depth) each
    return merge_sidecar(state, queries, xq, ids, scores), embedded


def search_depth(state: ServingState, queries: list[RetrieveQuery]) -> int:
    """How deep the base index is searched: the largest k plus every base entry the sidecar hides."""
    b = state.build
    n = b.index.ntotal if b.index is not None else b.manifest.catalog.row_count  # sharded: the shards' total
    return max(1, min(n, max(q.k for q in queries) + len(state.sidecar.hidden)))


def merge_sidecar(
    state: ServingState, queries: list[RetrieveQuery], xq: np.ndarray, ids: np.ndarray, scores: np.ndarray
) -> list[RetrieveResult]:
    """Each query's top-k of the base results (Q, depth) and the sidecar's items."""
    snap = state.sidecar
    return [RetrieveResult(*merge_topk(snap, ids[i], scores[i], xq[i], q.k)) for i, q in enumerate(queries)]
