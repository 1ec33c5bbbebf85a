"""The fresh-item sidecar's log on an object store, where nothing can be appended or renamed:

    REGISTRY/sidecar/HEAD                 JSON: generation, base build, and the ordered list of the
                                          segments that make up the log (the log is exactly these)
    REGISTRY/sidecar/seg/<uuid>.jsonl     immutable segments, one per write (or per compaction), each
                                          created once and never changed
    REGISTRY/sidecar/archive/*.jsonl      entries compaction dropped: served by a base, or malformed

A write puts its segment (create-only, under a fresh name), then replaces HEAD with a
compare-and-swap on HEAD's ETag that lists the segment. HEAD is the one point where writes are
ordered: a writer that loses the race reads HEAD again, checks the cap again against what won, and
lists its segment in the next HEAD. A compaction writes the kept entries as one segment and swaps HEAD
to a new generation listing only it, on the same condition, so a write that landed meanwhile makes
the compaction start over with it: nothing is lost. A segment is in the log only when HEAD lists it,
once, so nothing is doubled; a writer killed between its segment and HEAD leaves an unlisted segment
that no reader reads (and that it never acknowledged), which a later compaction deletes once stale.

Readers (every replica) keep (generation, number of segments applied) as their position and fetch
only the segments listed after it; another generation means: replay from the start.

Same entries, cap, archive and compaction rule as the local log (core.storage.sidecar_log).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

from core.storage.sidecar_log import (
    LogRead,
    Position,
    WriterView,
    _line,
    _parse,
    entry_problem,
    split_served,
)
from core.storage.store import CREATE, AlreadyExists, VersionConflict, open_store

HEAD, SEGMENTS, ARCHIVE = "sidecar/HEAD", "sidecar/seg/", "sidecar/archive/"
MAX_TRIES = 50
STALE_SEGMENT_S = 3600.0  # an unlisted segment older than this is a dead writer's: deleted by compaction


class SegmentLog(WriterView):
    def __init__(self, registry: str, clock: Callable[[], float] = time.time):
        self.store = open_store(registry)
        self.where = f"{self.store.url}/sidecar"
        self._clock = clock
        super().__init__()

    def exists(self) -> bool:
        return self.store.exists(HEAD)

    def _head(self):
        try:
            data, version = self.store.get(HEAD)
        except FileNotFoundError:
            return {"generation": 0, "base_build": None, "segments": []}, None
        return json.loads(data), version

    def _segment(self, name: str) -> list[dict]:
        data, _ = self.store.get(SEGMENTS + name)
        return [e for e in map(_parse, data.splitlines()) if e is not None]

    # ---- reading -------------------------------------------------------------------------------
    def read(self, pos: Position, head: dict | None = None) -> LogRead:
        head = head or self._head()[0]
        gen, segs = head["generation"], head["segments"]
        restarted = gen != pos.generation
        start = 0 if restarted else pos.offset
        entries = [e for name in segs[start:] for e in self._segment(name)]
        return LogRead(entries, Position(gen, len(segs)), restarted)

    def _catch_up(self, head: dict) -> None:
        self._apply(self.read(self._pos, head))

    # ---- writing -------------------------------------------------------------------------------
    def write(
        self, entries: list[dict], max_items: int, counts: Callable[[dict], bool] | None = None
    ) -> Position:
        """As core.storage.sidecar_log.SidecarLog.write: appended unless the cap would be passed,
        checked against every write HEAD lists when this one is ordered."""
        bad = [p for p in map(entry_problem, entries) if p]
        if bad:
            raise ValueError(f"refusing to log {len(bad)} malformed entries, e.g. {bad[0]}")
        stamp = self._clock()
        name = None
        for _ in range(MAX_TRIES):
            head, version = self._head()
            if name is not None and name in head["segments"]:  # our swap landed, its answer did not
                break
            self._catch_up(head)
            self._check_room(entries, max_items, counts)  # again on every retry: against what won
            if name is None:
                name = self._put_segment([{**e, "at": stamp} for e in entries])
            if self._swap(head, version, {**head, "segments": [*head["segments"], name]}):
                break
        else:
            raise RuntimeError(f"the sidecar log's HEAD kept changing under {MAX_TRIES} tries; try again")
        self._catch_up(self._head()[0])
        if self._needs_compaction():
            self.compact()
        return self._pos

    def _put_segment(self, entries: list[dict]) -> str:
        name = f"{uuid.uuid4().hex}.jsonl"
        self.store.put(SEGMENTS + name, b"".join(map(_line, entries)), mode=CREATE)
        return name

    def _swap(self, head: dict, version, new: dict, before_replace=None) -> bool:
        data = (json.dumps({**new, "at": self._clock()}, sort_keys=True) + "\n").encode()
        try:
            self.store.put(HEAD, data, mode=version or CREATE, before_replace=before_replace)
            return True
        except (VersionConflict, AlreadyExists):
            return False

    # ---- compaction ----------------------------------------------------------------------------
    def compact(self, served=None, base_build: str | None = None, before_replace=None) -> dict:
        """As SidecarLog.compact; the new generation exists only once HEAD's swap lists it, so a crash
        at any point leaves the old generation whole, and a write that lands first restarts it."""
        for _ in range(MAX_TRIES):
            head, version = self._head()
            self._catch_up(head)
            kept, dropped = split_served(list(self._view.values()), served)
            gen = head["generation"] + 1
            for what, lines in (("served", dropped), ("invalid", self._invalid)):
                if lines:  # out of the log, never lost (rewritten whole if this compaction restarts)
                    key = f"{ARCHIVE}{base_build or 'compaction'}-gen{gen}-{what}.jsonl"
                    self.store.put(key, b"".join(map(_line, lines)))
            seg = self._put_segment(kept)
            new = {"generation": gen, "base_build": base_build, "segments": [seg]}
            if self._swap(head, version, new, before_replace):
                stats = {"generation": gen, "lines_before": self._lines, "kept": len(kept), "served": len(dropped),
                         "invalid": len(self._invalid)}  # fmt: skip
                self._catch_up(self._head()[0])
                self._delete_unlisted(keep={seg})
                return stats
            self.store.delete(SEGMENTS + seg)  # never listed: nobody reads it
        raise RuntimeError(
            f"the sidecar log's HEAD kept changing under {MAX_TRIES} tries; compaction not done"
        )

    def _delete_unlisted(self, keep: set[str]) -> None:
        """Segments HEAD no longer lists (the generation just replaced: readers of it replay the new
        one) and dead writers' segments, once stale: a live writer's unlisted segment is recent."""
        listed = set(self._head()[0]["segments"]) | keep
        now = time.time()
        for key, _ in list(self.store.list(SEGMENTS)):
            name = key[len(SEGMENTS) :]
            if name not in listed and now - self.store.modified(key) > STALE_SEGMENT_S:
                self.store.delete(key)

    def restore_folded(self, base_build: str) -> int:
        """As SidecarLog.restore_folded: entries folded into `base_build` come back (unless a newer
        entry of their id is in the log); each archive is then marked restored."""
        restored = 0
        for key, _ in sorted(self.store.list(ARCHIVE)):
            name = key[len(ARCHIVE) :]
            if not (name.startswith(f"{base_build}-gen") and name.endswith("-served.jsonl")):
                continue
            self._catch_up(self._head()[0])
            data, _ = self.store.get(key)
            entries = [e for e in map(_parse, data.splitlines()) if e is not None]
            back = [e for e in entries if entry_problem(e) is None and int(e["item_id"]) not in self._view]
            if back:
                self.write(back, max_items=2**62)  # they held slots before: the cap is not theirs to refuse
                restored += len(back)
            self.store.put(f"{ARCHIVE}restored-{name}", data)
            self.store.delete(key)
        return restored
