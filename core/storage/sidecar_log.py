"""The fresh-item sidecar's durable log: what was upserted or deleted since the live base build.

    REGISTRY/sidecar/log.jsonl        a header line {"op": "header", "generation": g, ...}, then one JSON
                                      line per upsert/delete, appended under flock and fsynced
    REGISTRY/sidecar/archive/*.jsonl  entries compaction dropped: served by a live base build, or
                                      malformed (no replica can apply them)
    REGISTRY/sidecar/.lock            serialises appends and compactions

Readers (every replica) tail the log by byte offset without the lock. Compaction rewrites the log as a
new generation (temp file, fsync, os.replace), so a reader that sees another generation in the header
replays the new file from the start; a crash before the replace leaves the old log whole.

On an object store the log is a list of immutable segments instead (core.storage.sidecar_segments;
`open_log` picks). Plain Python: no numpy, torch or Ray, so writers and tests stay light.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from core.storage.fsutil import locked, write_bytes_atomic
from core.storage.store import is_remote

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# An item is the item tower's declared columns (validated against the live build's package where it is
# embedded, and at POST /items); the log itself only bounds what one entry may hold.
MAX_ITEM_FIELDS, MAX_FIELD_NAME, MAX_LIST = 64, 64, 4096
# Superseded lines (older entries of an id with a newer one) are dropped by an append once the log holds
# more than this many lines per live entry (+ a floor), so a stream of updates keeps it bounded.
COMPACT_RATIO, COMPACT_FLOOR = 2, 64


class SidecarFull(RuntimeError):
    pass


def _value_problem(name: str, value) -> str | None:
    """A feature value is a number or a flat list of numbers (what a declared input can be)."""

    def number(v) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    if number(value):
        return None
    if isinstance(value, list) and len(value) <= MAX_LIST and all(number(v) for v in value):
        return None
    return f"{name} must be a number or a list of at most {MAX_LIST} numbers, got {str(value)[:40]!r}"


def item_problem(item_id, item: dict) -> str | None:
    """Why this entry's features cannot be an item (None if they may be): the log's own bounds. Whether
    they fit the model is the package's check (core.contract.encode), where the item is embedded."""
    if not isinstance(item_id, int) or isinstance(item_id, bool) or not INT64_MIN <= item_id <= INT64_MAX:
        return f"item_id must be an integer in the int64 range, got {item_id!r:.40}"
    if not isinstance(item, dict):
        return f"item {item_id}: features must be an object, got {type(item).__name__}"
    if len(item) > MAX_ITEM_FIELDS:
        return f"item {item_id}: at most {MAX_ITEM_FIELDS} features, got {len(item)}"
    for name, value in item.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_FIELD_NAME:
            return f"item {item_id}: feature names must be 1 to {MAX_FIELD_NAME} characters, got {name!r:.40}"
        problem = _value_problem(name, value)
        if problem:
            return f"item {item_id}: {problem}"
    return None


def entry_problem(e) -> str | None:
    if not isinstance(e, dict) or e.get("op") not in ("upsert", "delete"):
        return f"not an upsert/delete entry: {str(e)[:80]!r}"
    if e["op"] == "delete":
        i = e.get("item_id")
        ok = isinstance(i, int) and not isinstance(i, bool) and INT64_MIN <= i <= INT64_MAX
        return None if ok else f"delete: item_id must be an int64, got {i!r:.40}"
    return item_problem(e.get("item_id"), e.get("item"))


@dataclasses.dataclass(frozen=True)
class Position:
    """How far a reader has applied the log: a generation and a byte offset within it."""

    generation: int = -1
    offset: int = 0

    def covers(self, other: Position) -> bool:
        return (self.generation, self.offset) >= (other.generation, other.offset)


@dataclasses.dataclass(frozen=True)
class LogRead:
    entries: list  # parsed lines after the reader's position (unvalidated: see entry_problem)
    position: Position
    restarted: bool  # another generation: the reader must drop what it applied and replay `entries`


class WriterView:
    """What a writer keeps of the log (both stores): the latest entry per id, the lines no replica can
    apply (archived by the next rewrite), how many lines it has read and up to where; and the cap
    and compaction rule decided from it."""

    def __init__(self):
        self._view: dict[int, dict] = {}
        self._invalid: list = []
        self._lines = 0
        self._pos = Position()

    def _apply(self, r: LogRead) -> None:
        """Advance the view by what a read returned (from scratch when the generation changed)."""
        if r.restarted:
            self._view, self._invalid, self._lines = {}, [], 0
        for e in r.entries:
            if entry_problem(e) is None:
                self._view[int(e["item_id"])] = e
            else:
                self._invalid.append(e)
            self._lines += 1
        self._pos = r.position

    def live_upserts(self) -> int:
        return sum(1 for e in self._view.values() if e["op"] == "upsert")

    def _check_room(self, entries: list[dict], max_items: int, counts: Callable[[dict], bool] | None) -> None:
        """SidecarFull unless `entries` fit under `max_items` upserted ids the base does not serve."""
        live = {i for i, e in self._view.items() if e["op"] == "upsert" and (counts is None or counts(e))}
        new_ids = {int(e["item_id"]) for e in entries if e["op"] == "upsert"} - live
        if len(live) + len(new_ids) > max_items:
            raise SidecarFull(
                f"sidecar is full: {len(live)} of {max_items} items not yet served by the base build, "
                f"{len(new_ids)} new in this request; a rebuild whose catalog includes them folds them "
                "into the base and frees their slots"
            )

    def _needs_compaction(self) -> bool:
        return self._lines > COMPACT_RATIO * len(self._view) + COMPACT_FLOOR


class SidecarLog(WriterView):
    def __init__(self, registry: Path, clock: Callable[[], float] = time.time):
        super().__init__()
        self.dir = Path(registry) / "sidecar"
        self.path = self.dir / "log.jsonl"
        self.archive = self.dir / "archive"
        self._clock = clock  # the writer's view (WriterView) is advanced incrementally under the lock

    @property
    def where(self) -> str:
        return str(self.path)

    def exists(self) -> bool:
        return self.path.exists()

    def locked(self):
        return locked(self.dir / ".lock")

    # ---- reading (no lock: appends are whole fsynced lines; replaces are atomic) ------------------
    def read(self, pos: Position) -> LogRead:
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - one handle for header and tail: same generation
        except FileNotFoundError:
            return LogRead([], Position(0, 0), restarted=pos.generation not in (-1, 0) or pos.offset > 0)
        with f:
            first = f.readline()
            header = _parse(first) if first.endswith(b"\n") else None
            gen = header.get("generation", 0) if _is_header(header) else 0
            restarted = gen != pos.generation
            start = 0 if restarted else pos.offset
            f.seek(start)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line without its newline is a write in progress (or torn)
        entries = []
        for line in data[:end].splitlines():
            e = _parse(line)
            if e is not None and not _is_header(e):
                entries.append(e)
        return LogRead(entries, Position(gen, start + end), restarted)

    # ---- writing -------------------------------------------------------------------------------
    def _catch_up(self) -> None:
        """Advance the writer's view to the end of the log (caller holds the lock)."""
        self._apply(self.read(self._pos))

    def write(
        self, entries: list[dict], max_items: int, counts: Callable[[dict], bool] | None = None
    ) -> Position:
        """Append upserts/deletes unless that would take the sidecar past `max_items` upserted ids;
        returns the position that includes them. Checked under the lock against the writer's view,
        which reads only what was appended since this writer last looked. `counts(entry)`: whether a
        logged upsert takes a slot (an entry the live model cannot embed serves nothing, so it does not)."""
        bad = [p for p in map(entry_problem, entries) if p]
        if bad:
            raise ValueError(f"refusing to log {len(bad)} malformed entries, e.g. {bad[0]}")
        with self.locked():
            self._catch_up()
            self._check_room(entries, max_items, counts)
            stamp = self._clock()
            self._append([{**e, "at": stamp} for e in entries])
            self._catch_up()
            if self._needs_compaction():
                self._rewrite(served=None, base_build=None)
            return self._pos

    def _append(self, entries: list[dict]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            self._write_file(generation=0, entries=[], base_build=None)
        with open(self.path, "ab") as f:
            if f.tell() and not _ends_with_newline(self.path):
                f.write(b"\n")  # a crashed writer left a partial line: never glue onto it
            for e in entries:
                f.write(_line(e))
            f.flush()
            os.fsync(f.fileno())

    def _write_file(self, generation: int, entries: Iterable[dict], base_build, before_replace=None) -> None:
        header = {"op": "header", "generation": generation, "base_build": base_build, "at": self._clock()}
        data = b"".join([_line(header), *(_line(e) for e in entries)])
        write_bytes_atomic(self.path, data, before_replace=before_replace)

    # ---- compaction ----------------------------------------------------------------------------
    def compact(
        self,
        served: Callable[[list[dict]], list[bool]] | None = None,
        base_build: str | None = None,
        before_replace=None,
    ) -> dict:
        """Rewrite the log as a new generation holding the latest entry of each id, minus those
        `served(entries)` says the live base build `base_build` already serves (archived first).
        Crash-safe: the archive and the new log are each written atomically, the log last, all under
        the lock, so a crash at any point leaves the old log whole (nothing lost, nothing doubled)."""
        with self.locked():
            self._catch_up()
            return self._rewrite(served, base_build, before_replace)

    def restore_folded(self, base_build: str) -> int:
        """Put back the entries folded into `base_build` (after CURRENT moved back from it, e.g. a
        rollback: the build now live never served them). An entry whose id has a newer one in the log
        stays out. Idempotent: a crash after the append and before the archive is marked leaves ids that
        the next run skips."""
        restored = 0
        with self.locked():
            self._catch_up()
            for path in sorted(self.archive.glob(f"{base_build}-gen*-served.jsonl")):
                entries = [e for e in map(_parse, path.read_bytes().splitlines()) if e is not None]
                back = [
                    e for e in entries if entry_problem(e) is None and int(e["item_id"]) not in self._view
                ]
                if back:
                    self._append(back)
                    restored += len(back)
                path.rename(path.with_name(f"restored-{path.name}"))
            self._catch_up()
        return restored

    def _rewrite(self, served, base_build, before_replace=None) -> dict:
        for tmp in self.dir.glob(f".{self.path.name}.tmp-*"):
            tmp.unlink()  # a rewrite killed before its replace (only lock holders write these)
        kept, dropped = split_served(list(self._view.values()), served)
        gen = self._pos.generation + 1
        for what, lines in (("served", dropped), ("invalid", self._invalid)):
            if lines:  # out of the log, never lost
                self.archive.mkdir(parents=True, exist_ok=True)
                name = f"{base_build or 'compaction'}-gen{gen}-{what}.jsonl"
                write_bytes_atomic(self.archive / name, b"".join(map(_line, lines)))
        stats = {"generation": gen, "lines_before": self._lines, "kept": len(kept), "served": len(dropped),
                 "invalid": len(self._invalid)}  # fmt: skip
        self._write_file(gen, kept, base_build, before_replace=before_replace)
        self._catch_up()
        return stats


def split_served(latest: list[dict], served) -> tuple[list[dict], list[dict]]:
    """(kept, dropped): the entries `served(entries)` says a base build serves are dropped."""
    if served is None or not latest:
        return latest, []
    mask = served(latest)
    return [e for e, s in zip(latest, mask, strict=True) if not s], [
        e for e, s in zip(latest, mask, strict=True) if s
    ]


def open_log(registry, clock: Callable[[], float] = time.time):
    """The registry's sidecar log: this file-based one for a directory, the segment log
    (core.storage.sidecar_segments) for an s3:// or gs:// registry."""
    if is_remote(str(registry)):
        from core.storage.sidecar_segments import SegmentLog

        return SegmentLog(str(registry), clock)
    return SidecarLog(registry, clock)


def _line(e: dict) -> bytes:
    # ensure_ascii: any text the log holds (even text that slipped past validation) stays one valid line
    return (json.dumps(e, sort_keys=True, ensure_ascii=True) + "\n").encode()


def _parse(line: bytes):
    try:
        return json.loads(line)
    except ValueError:
        return None  # the tail of a crashed write, superseded by the next line


def _is_header(e) -> bool:
    return isinstance(e, dict) and e.get("op") == "header"


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _same_value(v) -> object:
    """Features compared as the tower reads them: numbers as float32 (a JSON 19.99 and a float32 column's
    19.99 are the same input), lists element-wise."""
    if isinstance(v, list):
        return tuple(_same_value(x) for x in v)
    return None if v is None else float(struct.unpack("f", struct.pack("f", float(v)))[0])


def served_by_catalog(catalog_rows: dict[int, dict]) -> Callable[[list[dict]], list[bool]]:
    """A `served` predicate for compaction after a rebuild: an upsert is served when the new base's
    catalog holds that id with the same features; a delete when the catalog no longer holds it.
    `catalog_rows`: item_id -> the catalog's values of the features the log's entries name."""

    def same(row: dict, item: dict) -> bool:
        return all(k in row and _same_value(row[k]) == _same_value(v) for k, v in item.items())

    def served(entries: list[dict]) -> list[bool]:
        out = []
        for e in entries:
            row = catalog_rows.get(int(e["item_id"]))
            out.append(row is None if e["op"] == "delete" else row is not None and same(row, e["item"]))
        return out

    return served
