"""Fresh-item sidecar: items created, changed or deleted since the live base build.

Durable and shared: every upsert/delete is one JSON line appended (under flock, fsynced) to
`REGISTRY/sidecar/log.jsonl`, with the item's raw features. Each replica tails the log and embeds
upserts with its LIVE build's own item tower, so the served index plus sidecar is still one
checkpoint version. At a swap the replica replays the log against the new build: every entry is
re-embedded by the new checkpoint, and an upsert whose new vector equals the new base's vector for that
id is folded (the base already serves it). Deleted ids never appear; an upsert shadows the base entry.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from core.features import encode_item_rows
from core.fsutil import locked
from core.live_build import LiveBuild
from core.model import item_inputs_from_arrow

ITEM_FIELDS = ("item_id", "title", "genres", "year", "tags")


class SidecarFull(RuntimeError):
    pass


class SidecarLog:
    def __init__(self, registry: Path):
        self.dir = Path(registry) / "sidecar"
        self.path = self.dir / "log.jsonl"

    def locked(self):
        return locked(self.dir / ".lock")

    def append(self, entries: list[dict]) -> int:
        """Append entries durably (caller holds `locked()`); returns the log size after them."""
        with open(self.path, "ab") as f:
            if f.tell() and not self._ends_with_newline():
                f.write(b"\n")  # a crashed writer left a partial line: never glue onto it
            for e in entries:
                f.write((json.dumps(e, sort_keys=True) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
            return f.tell()

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def write(self, entries: list[dict], max_items: int) -> int:
        """Append upserts/deletes unless that would take the sidecar past `max_items` upserted ids;
        returns the log offset that includes them. Checked against the whole log under the lock, so
        concurrent writers from any replica cannot overshoot the bound."""
        with self.locked():
            view: dict[int, bool] = {}
            for e in self.read(0)[0]:
                view[int(e["item_id"])] = e["op"] == "upsert"
            live = {i for i, up in view.items() if up}
            new_ids = {int(e["item_id"]) for e in entries if e["op"] == "upsert"} - live
            if len(live) + len(new_ids) > max_items:
                raise SidecarFull(
                    f"sidecar is full: {len(live)} of {max_items} items, {len(new_ids)} new in this request; "
                    "the next rebuild folds them into the base index"
                )
            stamp = time.time()
            return self.append([{**e, "at": stamp} for e in entries])

    def read(self, offset: int) -> tuple[list[dict], int]:
        """Complete entries after byte `offset`, and the offset after the last complete line."""
        if not self.path.exists():
            return [], 0
        with open(self.path, "rb") as f:
            f.seek(offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        entries = []
        for line in data[:end].splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue  # the tail of a crashed write, superseded by the next line
        return entries, offset + end


@dataclasses.dataclass(frozen=True)
class SidecarSnapshot:
    build_id: str
    checkpoint_version: str
    ids: np.ndarray  # (M,) int64 upserted ids served from the sidecar
    emb: np.ndarray  # (M, D) float32, embedded by the build's own item tower
    hidden: frozenset[int]  # ids whose BASE entry must not be returned (upserted or deleted)
    deleted: frozenset[int]
    offset: int  # log bytes applied
    folded: int = 0  # upserts the base build already serves identically


EMPTY_IDS = np.zeros(0, dtype=np.int64)


class Sidecar:
    """Replica-side state, owned by ONE thread (the follower); readers only see immutable snapshots."""

    def __init__(self, log: SidecarLog):
        self.log = log
        self.items: dict[int, dict] = {}  # upserted id -> raw features (latest)
        self.deleted: set[int] = set()
        self.offset = 0

    def _apply(self, entries: list[dict]) -> None:
        for e in entries:
            i = int(e["item_id"])
            if e["op"] == "upsert":
                self.items[i] = e["item"]
                self.deleted.discard(i)
            else:
                self.items.pop(i, None)
                self.deleted.add(i)

    def snapshot(self, build: LiveBuild, prev: SidecarSnapshot | None) -> SidecarSnapshot:
        """Catch up with the log and return the view for `build`. A new build replays everything."""
        if prev is None or prev.build_id != build.build_id:
            self.items, self.deleted, self.offset = {}, set(), 0
        entries, self.offset = self.log.read(self.offset)
        self._apply(entries)
        if prev is not None and prev.build_id == build.build_id and not entries:
            return prev
        ids = np.array(sorted(self.items), dtype=np.int64)
        emb = (
            embed_items(build, [self.items[i] | {"item_id": i} for i in ids])
            if len(ids)
            else np.zeros((0, build.dim), np.float32)
        )
        keep = ~_same_as_base(build, ids, emb)  # folded: the base build serves exactly this vector
        return SidecarSnapshot(
            build_id=build.build_id,
            checkpoint_version=build.checkpoint_version,
            ids=ids[keep],
            emb=emb[keep],
            hidden=frozenset(ids[keep].tolist()) | frozenset(self.deleted),
            deleted=frozenset(self.deleted),
            offset=self.offset,
            folded=int((~keep).sum()),
        )


@torch.inference_mode()
def embed_items(build: LiveBuild, rows: list[dict]) -> np.ndarray:
    """Raw item dicts -> (M, D) vectors by the build's OWN item tower (same features as the catalog)."""
    table = encode_item_rows(rows, build.schema)
    return build.item_tower(item_inputs_from_arrow(table, build.schema)).numpy()


def _same_as_base(build: LiveBuild, ids: np.ndarray, emb: np.ndarray) -> np.ndarray:
    if not len(ids):
        return np.zeros(0, dtype=bool)
    rows, missing = build.item_rows(ids)
    same = np.zeros(len(ids), dtype=bool)
    present = ~missing
    if present.any():
        same[present] = np.all(np.abs(build.item_emb[rows[present]] - emb[present]) <= 1e-5, axis=1)
    return same


def merge_topk(
    build: LiveBuild, snap: SidecarSnapshot, user_row: int, k: int
) -> tuple[list[int], list[float], list[str]]:
    """Top-k over base + sidecar for one user: sidecar entries shadow base ones, deleted ids vanish."""
    k_base = min(build.index.ntotal, k + len(snap.hidden))
    ids, scores = build.retrieve(np.array([user_row]), k_base)
    cand = [
        (float(s), int(i), "base")
        for i, s in zip(ids[0], scores[0], strict=True)
        if i >= 0 and int(i) not in snap.hidden
    ]
    if len(snap.ids):
        u = np.asarray(build.user_emb[user_row], dtype=np.float32)
        cand += [(float(s), int(i), "sidecar") for i, s in zip(snap.ids, snap.emb @ u, strict=True)]
    cand.sort(key=lambda t: -t[0])
    top = cand[:k]
    return [t[1] for t in top], [t[0] for t in top], [t[2] for t in top]
