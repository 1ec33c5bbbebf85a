"""A replica's serving state as a plain class: follow the registry, swap builds, tail the sidecar.

`ReplicaState.tick()` runs on one thread (the replica's follower). It moves to a new live build when
CURRENT moves (validated by `BuildWatcher`), then catches the sidecar up for that build, and publishes
both as ONE immutable `ServingState` reference. Every request reads `current` once and uses that
reference from start to end, so a request never mixes a build with another build's sidecar vectors or
query tower. A sidecar failure never holds back a build swap: the new build goes live with the sidecar
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

from core import skew_gate
from core.live_build import BuildWatcher, LiveBuild
from core.sidecar import Sidecar, SidecarSnapshot, merge_topk
from core.sidecar_log import Position, SidecarLog

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServingState:
    build: LiveBuild
    sidecar: SidecarSnapshot
    skew_check_passed: bool = False  # the live checkpoint version has a passed skew check on record

    def history_known(self, ids: np.ndarray) -> np.ndarray:
        """Mask of history ids the build's user tower knows: items of the base catalog it was trained
        and built on, not deleted since. Fresh sidecar ids are unknown to the tower (they would only
        hash onto other items' rows), so a history drops them."""
        _, missing = self.build.item_rows(ids)
        known = ~missing
        if self.sidecar.deleted:
            known &= ~np.isin(ids, np.fromiter(self.sidecar.deleted, np.int64, len(self.sidecar.deleted)))
        return known


class ReplicaState:
    def __init__(
        self,
        registry: Path,
        query_checkpoint: Path | None = None,
        on_build_event: Callable | None = None,
        on_bad_entry: Callable[[dict, str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.registry = Path(registry)
        self.watcher = BuildWatcher(self.registry, query_checkpoint, on_event=on_build_event)
        self.sidecar = Sidecar(SidecarLog(self.registry), on_bad_entry=on_bad_entry)
        self.sidecar_errors = 0
        self.current: ServingState | None = None
        self._clock = clock
        self._skew_key, self._skew_value = None, False  # the verdict, cached per (build, skew dir mtime)

    def tick(self) -> ServingState | None:
        """Follow CURRENT, then the sidecar log; returns the state requests now see."""
        self.watcher.poll()
        live = self.watcher.live
        if live is None:
            return None
        cur = self.current
        same_build = cur is not None and cur.build is live
        try:
            snap = self.sidecar.snapshot(live, cur.sidecar if same_build else None)
        except Exception:  # noqa: BLE001 - the sidecar must never hold back the build
            self.sidecar_errors += 1
            log.exception(
                "sidecar catch-up failed on build %s; replaying the log at the next tick", live.build_id
            )
            self.sidecar.reset()
            if same_build:
                return cur  # keep the view this build already had
            snap = SidecarSnapshot.empty(live)
        passed = self._skew_passed(live)
        if not same_build:
            self.current = ServingState(live, snap, skew_check_passed=passed)
        elif snap is not cur.sidecar or passed != cur.skew_check_passed:
            self.current = dataclasses.replace(cur, sidecar=snap, skew_check_passed=passed)
        return self.current

    def _skew_passed(self, live: LiveBuild) -> bool:
        """Whether the live version has a passed skew check on record, re-read whenever the skew
        directory changes (a check can pass after the build went live). An unreadable record counts as
        no check, reported once per change; it never stops a swap."""
        family = live.manifest.checkpoint.family
        d = self.registry / "skew" / family
        key = (live.build_id, d.stat().st_mtime_ns if d.is_dir() else None)  # a new check changes it
        if key != self._skew_key:
            try:
                passed = (
                    skew_gate.passed_check_for(self.registry, family, live.checkpoint_version) is not None
                )
            except Exception:  # noqa: BLE001 - a hand-edited or older record must not hold serving back
                log.warning("skew check records of %s are unreadable; reporting no passed check", family)
                passed = False
            self._skew_key, self._skew_value = key, passed
        return self._skew_value

    async def until_applied(self, pos: Position, timeout_s: float, poll_s: float = 0.01) -> bool:
        """Read-your-writes: wait until the published state's sidecar view includes `pos`. False when
        it did not within `timeout_s` (the write is durable; this replica has not applied it yet)."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.current
            if state is not None and state.sidecar.position.covers(pos):
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
    """One user to retrieve for: a row of the build's user table, or a history (known item ids)."""

    k: int
    user_row: int | None = None
    user_id: int = 0
    history: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class RetrieveResult:
    item_ids: list[int]
    scores: list[float]
    sources: list[str]


def query_vectors(build: LiveBuild, queries: list[RetrieveQuery]) -> tuple[np.ndarray, int]:
    """(Q, D) query vectors and how many users the user tower embedded: table users are gathered,
    history users embedded ONCE per unique (user, history) in one user-tower pass."""
    xq = np.empty((len(queries), build.dim), np.float32)
    table = [q for q, query in enumerate(queries) if query.history is None]
    xq[table] = build.user_emb[[queries[q].user_row for q in table]]
    hist = [q for q, query in enumerate(queries) if query.history is not None]
    if not hist:
        return xq, 0
    slots, vecs = build.unique_history_vectors(
        [queries[q].user_id for q in hist], [queries[q].history for q in hist]
    )
    xq[hist] = vecs[slots]
    return xq, len(vecs)


def retrieve(state: ServingState, queries: list[RetrieveQuery]) -> tuple[list[RetrieveResult], int]:
    """Top-k over base + sidecar for a batch of queries of ONE state: one index search for the whole
    batch, deep enough that hidden (upserted or deleted) base entries cannot starve any query."""
    build, snap = state.build, state.sidecar
    xq, embedded = query_vectors(build, queries)
    depth = min(build.index.ntotal, max(q.k for q in queries) + len(snap.hidden))
    ids, scores = build.search(xq, depth)  # (Q, depth) each
    out = [RetrieveResult(*merge_topk(snap, ids[i], scores[i], xq[i], q.k)) for i, q in enumerate(queries)]
    return out, embedded
