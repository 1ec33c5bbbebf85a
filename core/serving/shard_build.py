"""Sharded serving, Ray-free: what one shard replica holds, and what the ingress holds, of a sharded build.

A sharded build (manifest.index.layout "sharded") has one index per id range; shard i's item rows are
rows [row_offset, row_offset + rows) of the build's id-sorted item table. A shard replica loads only
those: its index file and its slice of the table (memory-mapped, so only the rows it touches are
resident). The ingress loads the rest: the manifest, the model package (user tower, scorer, item tower
for the sidecar) and the user table, never the items (`load_user_side`).

Every build a shard holds is addressed by its id: a request carries the build id the ingress resolved
once, and a shard that does not hold that build refuses (`NotHeld`), never answering from another.
`ShardHolder` follows the registry's CURRENT pointer (live and canary) and keeps a build it no longer
needs for `retain_s`, so requests pinned to it before a swap drain.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from core.ann import index as ann
from core.ann import ivf_lists
from core.contract.towers import ModelPackage, load_package
from core.serving.live_build import BuildRefused, LiveBuild, lookup_sorted
from core.storage.build_dir import BuildDir, BuildManifest
from core.storage.registry import Registry

log = logging.getLogger(__name__)


class NotHeld(LookupError):
    """This shard replica does not hold the build a request names (not loaded yet, or released)."""


def is_sharded(manifest: BuildManifest) -> bool:
    return manifest.index.layout == "sharded"


def shard_bounds(manifest: BuildManifest) -> np.ndarray:
    """(S + 1,) id edges: shard s holds ids in [edges[s], edges[s + 1]) (the rebuild's half-open ranges)."""
    shards = sorted(manifest.index.shards, key=lambda s: s["shard"])
    if [s["shard"] for s in shards] != list(range(len(shards))):
        raise BuildRefused(f"build {manifest.build_id}: shard numbers {[s['shard'] for s in shards]}")
    edges = [s["id_lo"] for s in shards] + [shards[-1]["id_hi"]]
    if any(b < a for a, b in zip(edges, edges[1:], strict=False)):
        raise BuildRefused(f"build {manifest.build_id}: shard id ranges overlap or are out of order")
    return np.asarray(edges, np.int64)


def shard_of(edges: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The shard that holds each id, -1 where no shard's range covers it."""
    s = np.searchsorted(edges, ids, side="right") - 1
    return np.where((s >= 0) & (s < len(edges) - 1), s, -1)


@dataclasses.dataclass(frozen=True)
class ShardBuild:
    """Shard `shard` of build `build_id`: its index and the item rows of its id range."""

    build_id: str
    shard: int
    checkpoint_version: str
    index: faiss.Index
    spec: ann.IndexSpec
    search_params: dict
    item_ids: np.ndarray  # (n,) sorted: this shard's slice of the build's item table, memory-mapped
    item_emb: np.ndarray  # (n, D) float32, row-aligned
    model: ModelPackage  # its scorer (pair_scores / scores), the build's own version
    loaded_at: float

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This shard's top-k for query vectors (Q, D) at the merged index's search parameters: (ids,
        exact scores, the index's scores), (Q, k) each in the index's order, -1 padded. The index's
        scores are approximate for compressed codes: the ingress merges by them and ranks the merged
        top-k by the exact ones (core.ann.ivf_lists.merge_proposals), as the merged build does."""
        xq = np.ascontiguousarray(xq, np.float32)
        D, I = ann.search(self.index, self.spec, self.search_params, xq, min(k, max(1, self.index.ntotal)))
        E = ivf_lists.exact_scores(xq, I, self.item_ids, self.item_emb) if ann.approximate(self.spec) else D
        if I.shape[1] < k:  # fewer items than k in this shard
            pad = ((0, 0), (0, k - I.shape[1]))
            I, E, D = (
                np.pad(I, pad, constant_values=-1),
                *(np.pad(x, pad, constant_values=-np.inf) for x in (E, D)),
            )
        return I, E, D

    def has(self, ids: np.ndarray) -> np.ndarray:
        """Which of `ids` this shard holds."""
        if not len(self.item_ids):
            return np.zeros(len(ids), bool)
        return ~lookup_sorted(self.item_ids, ids)[1]

    @torch.inference_mode()
    def score(
        self,
        users: np.ndarray,
        pre: np.ndarray | None,
        slots: np.ndarray,
        item_ids: np.ndarray,
        per_row: bool,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores of rows (user slot, item id), `users` (U, D) the user vectors the rows name. Broadcast:
        `pre` (U, H) is their user-only part of the scorer, computed once per user by the ingress, and
        only the pair part runs here. `per_row`: the per-row reference, the whole scorer for every row.
        Returns (scores (R,) float32, NaN where unknown; unknown (R,) bool: ids this shard lacks)."""
        if len(self.item_ids):
            rows, unknown = lookup_sorted(self.item_ids, item_ids)
        else:
            rows, unknown = np.zeros(len(item_ids), np.int64), np.ones(len(item_ids), bool)
        scores = np.full(len(item_ids), np.nan, np.float32)
        ok = np.flatnonzero(~unknown)
        if len(ok):
            i = torch.from_numpy(np.ascontiguousarray(self.item_emb[rows[ok]]))
            s = torch.from_numpy(np.ascontiguousarray(slots[ok]))
            u = torch.from_numpy(np.ascontiguousarray(users))[s]
            if per_row:
                scores[ok] = self.model.scores(u, i).numpy()
            else:
                p = None if pre is None else torch.from_numpy(np.ascontiguousarray(pre))[s]
                scores[ok] = self.model.pair_scores(u, p, i).numpy()
        return scores, unknown


def load_shard(build_dir: Path, shard: int, clock=time.time) -> ShardBuild:
    """Shard `shard` of the sharded build in `build_dir`, checked against its manifest."""
    bd = BuildDir(build_dir)
    try:
        manifest = bd.read_manifest()
        if not is_sharded(manifest):
            raise BuildRefused(f"build {manifest.build_id} is not sharded (layout {manifest.index.layout})")
        entry = next((s for s in manifest.index.shards if s["shard"] == shard), None)
        if entry is None:
            raise BuildRefused(
                f"build {manifest.build_id} has {len(manifest.index.shards)} shards; this replica serves shard {shard}"
            )
        version = manifest.checkpoint_version
        if entry["checkpoint_version"] != version:
            raise BuildRefused(
                f"build {manifest.build_id}: shard {shard} is of checkpoint {entry['checkpoint_version']}, "
                f"the build of {version}"
            )
        model = load_package(bd.checkpoint_path)
        if model.version != version:
            raise BuildRefused(
                f"build {manifest.build_id}: its package is {model.version}, the manifest says {version}"
            )
        index = ann.load(bd.shard_index_path(shard))
        ids, emb = bd.open_items()
    except BuildRefused:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise BuildRefused(
            f"build {Path(build_dir).name} shard {shard} cannot be loaded: {type(e).__name__}: {e}"
        ) from e
    lo, n = int(entry["row_offset"]), int(entry["rows"])
    ids, emb = ids[lo : lo + n], emb[lo : lo + n]
    if index.ntotal != n or len(ids) != n or (n and (ids[0] < entry["id_lo"] or ids[-1] >= entry["id_hi"])):
        raise BuildRefused(
            f"build {manifest.build_id} shard {shard} is inconsistent: manifest says {n} items in ids "
            f"[{entry['id_lo']}, {entry['id_hi']}), index has {index.ntotal}, table rows {len(ids)}"
        )
    ix = manifest.index
    return ShardBuild(
        build_id=manifest.build_id, shard=shard, checkpoint_version=version, index=index,
        spec=ann.IndexSpec(ix.type, ix.factory, ix.train_sample), search_params=ix.search_params,
        item_ids=ids, item_emb=emb, model=model, loaded_at=clock(),
    )  # fmt: skip


def load_user_side(build_dir: Path, query_checkpoint: Path | None = None, pair_allowed=None) -> LiveBuild:
    """What the ingress of sharded serving holds of a build: its manifest, model package and user table,
    as a LiveBuild with no index and no item rows (those are the shards'); `.shard_edges` routes ids."""
    bd = BuildDir(build_dir)
    name = bd.root.name
    try:
        manifest = bd.read_manifest()
        if not is_sharded(manifest):
            raise BuildRefused(f"build {manifest.build_id} is not sharded: serve it with the merged app")
        version = manifest.checkpoint_version
        ck = load_package(bd.checkpoint_path)
        if ck.version != version:
            raise BuildRefused(
                f"build {name}: its checkpoint copy is {ck.version}, the manifest says {version}"
            )
        if query_checkpoint is not None:
            query = load_package(query_checkpoint)
            if query.version != version and not (
                pair_allowed and pair_allowed(query.family, query.version, version)
            ):
                raise BuildRefused(
                    f"query tower version {query.version} differs from the index's checkpoint version {version} "
                    f"in build {manifest.build_id} and that pair has not passed a skew check; serving it is refused"
                )
        user_ids, user_emb = bd.open_users(manifest)
        edges = shard_bounds(manifest)
    except BuildRefused:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise BuildRefused(f"build {name} cannot be loaded: {type(e).__name__}: {e}") from e
    ix, d = manifest.index, manifest.index.dim
    build = ShardedLiveBuild(
        build_id=manifest.build_id, manifest=manifest, checkpoint_version=version, index=None,
        spec=ann.IndexSpec(ix.type, ix.factory, ix.train_sample), search_params=ix.search_params,
        item_ids=np.zeros(0, np.int64), item_emb=np.zeros((0, d), np.float32), user_ids=user_ids,
        user_emb=user_emb, model=ck, loaded_at=time.time(), shard_edges=edges,
    )  # fmt: skip
    return build


@dataclasses.dataclass(frozen=True)
class ShardedLiveBuild(LiveBuild):
    """The ingress's view of a sharded build: no index and no item rows here; ids route to shards."""

    shard_edges: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(1, np.int64))

    @property
    def n_shards(self) -> int:
        return len(self.shard_edges) - 1

    @property
    def n_items(self) -> int:
        return int(self.manifest.catalog.row_count)

    def item_rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """No item rows here: to the sidecar every id is new (it never folds an upsert into the base)."""
        return np.zeros(len(ids), np.int64), np.ones(len(ids), bool)

    def search(self, xq, k):  # pragma: no cover - guards against a merged-build code path
        raise RuntimeError("a sharded build is searched through its shards (serve_app/fanout.py)")


class ShardHolder:
    """Shard `shard` of every build a shard replica needs: the live one, the canary, and for `retain_s`
    the ones it served before (requests pinned to them drain). `tick()` follows the registry."""

    def __init__(self, registry, shard: int, retain_s: float = 30.0, clock=time.monotonic, loader=load_shard):
        self.registry = Registry(registry)
        self.shard, self.retain_s, self._clock, self._loader = shard, retain_s, clock, loader
        self._held: dict[str, ShardBuild] = {}
        self._unneeded_since: dict[str, float] = {}
        self.refused: dict[str, str] = {}  # build -> why, not retried until the pointer names it anew
        self._lock = threading.Lock()

    def get(self, build_id: str) -> ShardBuild:
        b = self._held.get(build_id)
        if b is None:
            held = sorted(self._held)
            raise NotHeld(f"shard {self.shard} does not hold build {build_id} (holds {held})")
        return b

    def held(self) -> list[str]:
        return sorted(self._held)

    def tick(self) -> None:
        ptr = self.registry.pointer()
        wanted = [b for b in (ptr.build_id, ptr.canary) if b]
        for build_id in wanted:
            if build_id not in self._held and build_id not in self.refused:
                try:
                    shard = self._loader(self.registry.build_dir(build_id), self.shard)
                except Exception as e:  # noqa: BLE001 - a build that cannot load must not stop the others
                    self.refused[build_id] = str(e)
                    log.error("shard %d refuses build %s: %s", self.shard, build_id, e)
                    continue
                with self._lock:
                    self._held = {**self._held, build_id: shard}
                log.info("shard %d holds build %s", self.shard, build_id)
        now = self._clock()
        self.refused = {b: why for b, why in self.refused.items() if b in wanted}
        for build_id in list(self._held):
            if build_id in wanted:
                self._unneeded_since.pop(build_id, None)
                continue
            since = self._unneeded_since.setdefault(build_id, now)
            if now - since >= self.retain_s:
                with self._lock:
                    self._held = {b: s for b, s in self._held.items() if b != build_id}
                self._unneeded_since.pop(build_id, None)
                log.info("shard %d released build %s", self.shard, build_id)
