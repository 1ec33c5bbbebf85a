"""Fresh-item sidecar, replica side: items created, changed or deleted since the live base build.

Each replica tails the durable log (`core.storage.sidecar_log`) and embeds upserts with its LIVE build's own
item tower, so the served index plus sidecar is still one checkpoint version. Each entry is embedded
once per build: new entries as they arrive, every entry again (once) when the replica moves to another
build. An upsert whose vector equals the base's vector for that id is folded (the base already serves
it). Deleted ids never appear; an upsert shadows the base entry. An entry this replica cannot apply is
skipped and reported once through `on_bad_entry`; it never stops later entries or a build swap.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from core.contract.encode import rows_table, table_arrays
from core.contract.spec import ContractError, InputSpec
from core.serving.live_build import LiveBuild
from core.storage.registry import Registry
from core.storage.sidecar_log import Position, SidecarLog, entry_problem, open_log, served_by_catalog
from core.storage.store import arrow_path

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SidecarSnapshot:
    build_id: str
    checkpoint_version: str
    ids: np.ndarray  # (M,) int64 upserted ids served from the sidecar, sorted
    emb: np.ndarray  # (M, D) float32, embedded by the build's own item tower
    hidden: frozenset[int]  # ids whose BASE entry must not be returned (upserted or deleted)
    deleted: frozenset[int]
    position: Position  # how far this view has applied the log
    folded: int = 0  # upserts the base build already serves identically
    skipped: int = 0  # entries this replica could not apply (malformed, or not embeddable)

    @classmethod
    def empty(cls, build: LiveBuild) -> SidecarSnapshot:
        """No sidecar items, and no log applied yet (the follower replays it at its next tick)."""
        z = np.zeros(0, np.int64)
        return cls(build.build_id, build.checkpoint_version, z, np.zeros((0, build.dim), np.float32),
                   frozenset(), frozenset(), Position())  # fmt: skip

    def serves(self, ids: np.ndarray) -> np.ndarray:
        """Mask of ids served from the sidecar."""
        if not len(self.ids):
            return np.zeros(len(ids), bool)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return self.ids[pos] == ids


class Sidecar:
    """Replica-side state, owned by ONE thread (the follower); readers only see immutable snapshots."""

    def __init__(self, log: SidecarLog, on_bad_entry: Callable[[dict, str], None] | None = None):
        self.log = log
        self._on_bad = on_bad_entry or (lambda entry, why: None)
        self.reset()

    def reset(self) -> None:
        """Forget everything: the next snapshot replays the whole log."""
        self.items: dict[int, dict] = {}  # upserted id -> raw features (latest)
        self.deleted: set[int] = set()
        self.pos = Position()
        self.skipped = 0
        self._vecs: dict[int, np.ndarray] = {}  # id -> vector by `_vec_build`'s tower
        self._failed: set[int] = set()  # ids `_vec_build`'s tower could not embed: retried by the next build
        self._vec_build: str | None = None

    def _skip(self, entry: dict, why: str) -> None:
        self.skipped += 1
        log.warning("sidecar entry skipped (item_id %.40r): %s", entry.get("item_id"), why)
        self._on_bad(entry, why)

    def _apply(self, entries: list[dict]) -> None:
        for e in entries:
            problem = entry_problem(e)
            if problem:
                self._skip(e if isinstance(e, dict) else {}, problem)
                continue
            i = int(e["item_id"])
            self._vecs.pop(i, None)  # changed: embed again
            self._failed.discard(i)
            if e["op"] == "upsert":
                self.items[i] = e["item"]
                self.deleted.discard(i)
            else:
                self.items.pop(i, None)
                self.deleted.add(i)

    def _embed_missing(self, build: LiveBuild) -> None:
        todo = [i for i in sorted(self.items) if i not in self._vecs and i not in self._failed]
        if not todo:
            return
        try:
            vecs = embed_items(build, [self.items[i] | {"item_id": i} for i in todo])
            self._vecs.update(zip(todo, vecs, strict=True))
            return
        except Exception:  # noqa: BLE001 - find the entries that fail and skip only those
            log.warning("embedding %d sidecar items failed as a batch; retrying one by one", len(todo))
        for i in todo:
            try:
                self._vecs[i] = embed_items(build, [self.items[i] | {"item_id": i}])[0]
            except Exception as e:  # noqa: BLE001 - one item's features must not block the others
                self._skip({"op": "upsert", "item_id": i}, f"cannot be embedded: {type(e).__name__}: {e}")
                self._failed.add(i)

    def snapshot(self, build: LiveBuild, prev: SidecarSnapshot | None) -> SidecarSnapshot:
        """Catch up with the log and return the view for `build` (`prev` when nothing changed)."""
        r = self.log.read(self.pos)
        kept = {}
        if r.restarted:  # compacted (or replaced): replay the new generation from its start
            kept = {i: (self.items.get(i), v) for i, v in self._vecs.items()}
            self.items, self.deleted, self._vecs, self._failed = {}, set(), {}, set()
        self._apply(r.entries)
        for i, (item, v) in kept.items():  # a compaction changes no features: keep those vectors
            if self.items.get(i) == item:
                self._vecs[i] = v
        self.pos = r.position
        if self._vec_build != build.build_id:  # another checkpoint: embed each entry again, once
            self._vecs, self._failed, self._vec_build = {}, set(), build.build_id
        elif prev is not None and prev.build_id == build.build_id and not r.entries and not r.restarted:
            return dataclasses.replace(prev, position=self.pos) if prev.position != self.pos else prev
        self._embed_missing(build)
        ids = np.array(sorted(i for i in self.items if i in self._vecs), dtype=np.int64)
        emb = np.stack([self._vecs[i] for i in ids]) if len(ids) else np.zeros((0, build.dim), np.float32)
        keep = ~_same_as_base(build, ids, emb)  # folded: the base build serves exactly this vector
        return SidecarSnapshot(
            build_id=build.build_id,
            checkpoint_version=build.checkpoint_version,
            ids=ids[keep],
            emb=np.ascontiguousarray(emb[keep], np.float32),
            hidden=frozenset(ids[keep].tolist()) | frozenset(self.deleted),
            deleted=frozenset(self.deleted),
            position=self.pos,
            folded=int((~keep).sum()),
            skipped=self.skipped,
        )


def embed_items(build: LiveBuild, rows: list[dict]) -> np.ndarray:
    """Item dicts (the item tower's declared columns) -> (M, D) vectors by the build's OWN item tower,
    validated against its package as catalog rows are."""
    id_column = build.model.manifest.item_id  # the log keys items by "item_id"; a tower may read its id
    return build.model.item_vectors(
        rows_table([r | {id_column: r["item_id"]} for r in rows], build.model.item_inputs, {})
    )


def _same_as_base(build: LiveBuild, ids: np.ndarray, emb: np.ndarray) -> np.ndarray:
    if not len(ids):
        return np.zeros(0, dtype=bool)
    rows, missing = build.item_rows(ids)
    same = np.zeros(len(ids), dtype=bool)
    present = ~missing
    if present.any():
        same[present] = np.all(np.abs(build.item_emb[rows[present]] - emb[present]) <= 1e-5, axis=1)
    return same


def catalog_rows(
    catalog_files: list[Path], ids: list[int], fields: list[str], id_column: str = "item_id"
) -> dict[int, dict]:
    """The catalog's values of `fields` for these ids (id -> {field: value}); ids absent from the
    catalog are absent from the result. Reads only those columns and the matching rows."""
    if not ids:
        return {}
    located = [arrow_path(f) for f in catalog_files]  # (file system or None, path): one kind per catalog
    ds = pads.dataset([p for _, p in located], format="parquet", filesystem=located[0][0])
    cols = [c for c in dict.fromkeys([id_column, *fields]) if c in ds.schema.names]
    t = ds.to_table(columns=cols, filter=pc.field(id_column).isin(pa.array(ids, pa.int64())))
    return {int(r.pop(id_column)): r for r in t.to_pylist()}


def fold_into_base(
    registry: Path,
    build_id: str,
    catalog_files: list[Path],
    id_column: str = "item_id",
    item_inputs: tuple[InputSpec, ...] | None = None,
    before_replace=None,
) -> dict:
    """After `build_id` went live: drop from the sidecar log the entries its catalog already serves
    (same features; deletes of ids it no longer holds) and, given the live package's `item_inputs`,
    the upserts that package cannot embed (no replica applies them: they were skipped and counted),
    archived, so they stop counting against the cap. Nothing is dropped unless `build_id` is still
    the live build when the log is rewritten."""
    log = open_log(registry)
    if not log.exists():
        return {"folded": 0, "kept": 0}

    def served(entries: list[dict]) -> list[bool]:
        if Registry(registry).current() != build_id:
            return [False] * len(entries)  # another build went live meanwhile: it decides, not this one
        fields = sorted({k for e in entries if e["op"] == "upsert" for k in e["item"]})
        rows = catalog_rows(catalog_files, sorted({int(e["item_id"]) for e in entries}), fields, id_column)
        done = served_by_catalog(rows)(entries)
        if item_inputs is None:
            return done
        return [d or (e["op"] == "upsert" and not embeddable(e, item_inputs, id_column))
                for d, e in zip(done, entries, strict=True)]  # fmt: skip

    stats = log.compact(served, base_build=build_id, before_replace=before_replace)
    return {"folded": stats["served"], "kept": stats["kept"], "generation": stats["generation"]}


def embeddable(entry: dict, item_inputs: tuple[InputSpec, ...], id_column: str) -> bool:
    """Whether an upsert's features pass the package's validation (what its item tower would read)."""
    try:
        row = entry["item"] | {id_column: int(entry["item_id"])}
        table_arrays(rows_table([row], item_inputs, {}), item_inputs, "sidecar item")
    except (ContractError, ValueError, TypeError, OverflowError):
        return False
    return True


def merge_topk(
    snap: SidecarSnapshot, base_ids: np.ndarray, base_scores: np.ndarray, query: np.ndarray, k: int
) -> tuple[list[int], list[float], list[str]]:
    """Top-k over base results + sidecar for one query vector: sidecar entries shadow base ones,
    deleted ids vanish. `base_ids`/`base_scores`: the base index's top (k + len(snap.hidden)), -1 padded."""
    cand = [
        (float(s), int(i), "base")
        for i, s in zip(base_ids, base_scores, strict=True)
        if i >= 0 and int(i) not in snap.hidden
    ]
    if len(snap.ids):
        cand += [(float(s), int(i), "sidecar") for i, s in zip(snap.ids, snap.emb @ query, strict=True)]
    cand.sort(key=lambda t: -t[0])
    top = cand[:k]
    return [t[1] for t in top], [t[0] for t in top], [t[2] for t in top]
