"""A published build loaded for serving: index, model package (towers and scorer), memory-mapped id tables.

Index and model come from the SAME build directory and their versions are checked against each
other; a build that fails any check is refused (the caller keeps serving what it had).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import torch

from core.ann import index as ann
from core.ann import ivf_lists
from core.contract.towers import ModelPackage, load_package
from core.quality import skew_gate
from core.storage.build_dir import BuildDir, BuildManifest
from core.storage.registry import Registry

log = logging.getLogger(__name__)


class BuildRefused(RuntimeError):
    """A build could not be loaded or failed validation; the message says why."""


def lookup_sorted(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `ids` in a sorted id table, and a mask of ids that are not in it."""
    pos = np.searchsorted(sorted_ids, ids)
    pos_c = np.minimum(pos, len(sorted_ids) - 1)
    found = sorted_ids[pos_c] == ids
    return pos_c, ~found


@dataclasses.dataclass(frozen=True)
class LiveBuild:
    build_id: str
    manifest: BuildManifest
    checkpoint_version: str
    index: faiss.Index
    spec: ann.IndexSpec
    search_params: dict
    item_ids: np.ndarray  # (N,) sorted, memory-mapped
    item_emb: np.ndarray  # (N, D) float32, memory-mapped, row-aligned with item_ids
    user_ids: np.ndarray  # (U,) sorted, memory-mapped; empty when the build embedded no users
    user_emb: np.ndarray  # (U, D) float32, memory-mapped
    # the index's own model package: its item tower embeds sidecar items and its user tower users
    # given by their features, in the same version as the index; its scorer scores
    model: ModelPackage
    loaded_at: float

    @property
    def dim(self) -> int:
        return int(self.item_emb.shape[1])

    def item_rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return lookup_sorted(self.item_ids, ids)

    def user_rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not len(self.user_ids):
            return np.zeros(len(ids), np.int64), np.ones(len(ids), bool)
        return lookup_sorted(self.user_ids, ids)

    def feature_vectors(self, features: pa.Table) -> np.ndarray:
        """(U, D) query vectors of users given by their features (the user tower's declared columns,
        validated against the package), by this build's own user tower: the same version as the index."""
        return self.model.user_vectors(features)

    def unique_feature_vectors(
        self, user_ids: list[int], features: list[pa.Table]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Users given by features (one row each), embedded ONCE per unique (user, features) in one
        user-tower pass: (slot (n,) int64: each input's row in the vectors, vectors (H, D))."""
        slot_of: dict[tuple, int] = {}
        rows, slots = [], []
        for u, f in zip(user_ids, features, strict=True):
            key = (int(u), _row_key(f))
            if key not in slot_of:
                slot_of[key] = len(rows)
                rows.append(f)
            slots.append(slot_of[key])
        table = pa.concat_tables(rows) if rows else None
        vecs = self.feature_vectors(table) if table is not None else np.zeros((0, self.dim), np.float32)
        return np.array(slots, np.int64), vecs

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (ids, scores) of the index for query vectors (Q, D): (Q, k) each, -1 padded."""
        xq = np.ascontiguousarray(xq, np.float32)
        D, I = ann.search(self.index, self.spec, self.search_params, xq, k)
        if ann.approximate(self.spec):  # compressed codes propose, the float32 table scores
            D, I = ivf_lists.rescore(xq, D, I, self.item_ids, self.item_emb)
        return I, D

    def retrieve(self, user_rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (ids, scores) for users given by user-table row: (Q, k) each, -1 padded."""
        return self.search(self.user_emb[user_rows], k)


def _row_key(row: pa.Table) -> bytes:
    """Equal feature rows have equal keys (the one row's values, serialised)."""
    return repr(row.to_pylist()).encode()


def load_build(
    build_dir: Path,
    query_checkpoint: Path | None = None,
    clock=time.time,
    pair_allowed=None,
    mmap: bool = False,
) -> LiveBuild:
    """Load a complete build for serving. `query_checkpoint` (optional) names a query tower to use
    instead of the build's own copy; it must be the same version as the index unless
    `pair_allowed(family, query_version, index_version)` says that pair passed a skew check. `mmap`:
    the index memory-mapped (a comparison reads a few lists of it) instead of read into memory."""
    bd = BuildDir(build_dir)
    name = bd.root.name
    try:
        manifest = bd.read_manifest()
        version = manifest.checkpoint_version
        ck = load_package(bd.checkpoint_path)
        if ck.version != version:
            raise BuildRefused(
                f"build {name}: its checkpoint copy is {ck.version}, the manifest says {version}"
            )
        query = load_package(query_checkpoint) if query_checkpoint else ck
        if query.version != version and not (
            pair_allowed and pair_allowed(query.family, query.version, version)
        ):
            raise BuildRefused(
                f"query tower version {query.version} differs from the index's checkpoint version {version} in build "
                f"{manifest.build_id} and that pair has not passed a skew check; serving it is refused"
            )
        stray = sorted({s["checkpoint_version"] for s in manifest.index.shards} - {version})
        if stray:
            raise BuildRefused(
                f"build {manifest.build_id}: shards of checkpoint versions {stray}, index is {version}"
            )
        idx = bd.load_index(manifest, mmap=mmap)
        item_ids, item_emb = bd.open_items()
        user_ids, user_emb = bd.open_users(manifest)
    except BuildRefused:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise BuildRefused(f"build {name} cannot be loaded: {type(e).__name__}: {e}") from e
    n, d = manifest.catalog.row_count, manifest.index.dim
    if idx.ntotal != n or len(item_ids) != n or item_emb.shape != (n, d):
        raise BuildRefused(
            f"build {name} is inconsistent: manifest says {n} items, index has {idx.ntotal}, "
            f"item table {len(item_ids)}, embeddings {item_emb.shape}"
        )
    if len(user_ids) != len(user_emb) or (manifest.has_users and len(user_ids) != manifest.users.row_count):
        raise BuildRefused(
            f"build {name}: manifest says {manifest.users and manifest.users.row_count} users, "
            f"user ids {len(user_ids)}, embeddings {len(user_emb)}"
        )
    ix = manifest.index
    build = LiveBuild(
        build_id=manifest.build_id,
        manifest=manifest,
        checkpoint_version=version,
        index=idx,
        spec=ann.IndexSpec(ix.type, ix.factory, ix.train_sample),
        search_params=ix.search_params,
        item_ids=item_ids,
        item_emb=item_emb,
        user_ids=user_ids,
        user_emb=user_emb,
        model=ck,  # users given by features: the index's own version, whatever query_checkpoint says
        loaded_at=clock(),
    )
    _smoke(build)
    return build


def _smoke(build: LiveBuild) -> None:
    """One retrieval and one score before the build may go live: catches unreadable files early."""
    u = np.array(build.user_emb[:1]) if len(build.user_ids) else np.array(build.item_emb[:1])
    ids, _ = build.search(u, 1)
    if ids[0, 0] < 0:
        raise BuildRefused(f"build {build.build_id}: smoke retrieval returned no result")
    with torch.inference_mode():
        i = torch.from_numpy(np.array(build.item_emb[:1]))
        if not torch.isfinite(build.model.scores(torch.from_numpy(u), i)).all():
            raise BuildRefused(f"build {build.build_id}: smoke score is not finite")


class BuildWatcher:
    """Follows the registry's CURRENT pointer: the live build, and the canary build when one is being
    ramped in. `poll()` loads a build when the pointer names a new one, validates it, and swaps one
    reference; a refused build is remembered and not retried until the pointer moves again (a refused
    canary leaves every user on the live build). A promoted canary is not loaded twice: the loaded
    canary becomes the live build. Readers take the references once per batch and keep them."""

    def __init__(self, registry: Path, query_checkpoint: Path | None = None, on_event=None, loader=None,
                 ready=None):  # fmt: skip
        self.registry = Registry(registry)
        self.query_checkpoint = query_checkpoint
        # loader(build_dir, query_checkpoint, pair_allowed) -> the build as this process serves it (the
        # whole build; the ingress of sharded serving: its user side, core.serving.shard_build)
        self._loader = loader or (lambda d, q, allowed: load_build(d, q, pair_allowed=allowed))
        # ready(build) -> whether it may serve yet (sharded: every shard holds it); a loaded build that is
        # not ready waits here and is asked again at the next poll, without being reloaded
        self._ready = ready or (lambda build: True)
        self._waiting: dict[str, LiveBuild] = {}
        self.live: LiveBuild | None = None
        self.canary: LiveBuild | None = None
        self.percent = 0.0  # of users the canary serves
        self.last_refused: tuple[str, str] | None = None
        # on_event(outcome, old_build, new_build_or_None, detail) after each load attempt
        self._on_event = on_event or (lambda outcome, old, new, detail: None)

    def _pair_allowed(self, family: str, query_version: str, index_version: str) -> bool:
        return skew_gate.pair_allowed(self.registry.root, family, query_version, index_version)

    def _load(self, target: str, role: str, current: LiveBuild | None) -> LiveBuild | None:
        """The build `target` loaded, or None (refused and reported) when it cannot serve."""
        for have in (self.live, self.canary):
            if have is not None and have.build_id == target:
                return have
        try:
            new = self._waiting.pop(target, None) or self._loader(
                self.registry.build_dir(target), self.query_checkpoint, self._pair_allowed
            )
            if not self._ready(new):
                self._waiting[target] = new
                log.info("%s build %s loaded here, waiting until it is ready everywhere", role, target)
                return None
            return new
        except Exception as e:  # noqa: BLE001 - any failure to load must leave the old build serving
            self.last_refused = (target, str(e))
            log.error(
                "refusing %s build %s, still serving %s: %s", role, target, current and current.build_id, e
            )
            self._on_event("refused", current, None, f"{target}: {e}")
            return None

    def poll(self) -> str:
        """Returns 'unchanged', 'swapped', 'waiting' (loaded, not ready), 'refused' or 'empty' (of the live build; the canary follows
        alongside and reports through `on_event` as 'canary' / 'refused')."""
        ptr = self.registry.pointer()
        self._waiting = {b: w for b, w in self._waiting.items() if b in (ptr.build_id, ptr.canary)}
        if ptr.build_id is None:
            return "empty"
        outcome = "unchanged"
        stale = self.live is None or self.live.build_id != ptr.build_id
        if stale and not (self.last_refused and self.last_refused[0] == ptr.build_id):
            new = self._load(ptr.build_id, "live", self.live)
            if new is None:
                outcome = "waiting" if ptr.build_id in self._waiting else "refused"
            else:
                old, self.live, self.last_refused = self.live, new, None
                log.info("now serving build %s (checkpoint %s), was %s", new.build_id, new.checkpoint_version,
                         old and old.build_id)  # fmt: skip
                self._on_event("swapped", old, new, "")
                outcome = "swapped"
        self._follow_canary(ptr.canary, ptr.percent)
        return outcome

    def _follow_canary(self, target: str | None, percent: float) -> None:
        if target is None or self.live is None or target == self.live.build_id:
            self.canary, self.percent = None, 0.0
            return
        if self.canary is None or self.canary.build_id != target:
            if self.last_refused and self.last_refused[0] == target:
                self.canary, self.percent = None, 0.0
                return
            new = self._load(target, "canary", self.live)
            if new is None:
                self.canary, self.percent = None, 0.0
                return
            self.canary = new
            log.info(
                "canary build %s (checkpoint %s) at %g%% of users", target, new.checkpoint_version, percent
            )
            self._on_event("canary", self.live, new, "")
        self.percent = percent
