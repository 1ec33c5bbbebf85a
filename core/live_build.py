"""A published build loaded for serving: index, query/scoring towers, memory-mapped id tables.

Index and towers come from the SAME build directory and their versions are checked against each
other; a build that fails any check is refused (the caller keeps serving what it had).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from core import index as ann
from core import skew
from core.checkpoint import load_checkpoint
from core.features import FeatureSchema
from core.model import ItemTower, RankingScorer
from core.registry import Registry

log = logging.getLogger(__name__)


class BuildRefused(RuntimeError):
    """A build could not be loaded or failed validation; the message says why."""


def _lookup(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `ids` in a sorted id table, and a mask of ids that are not in it."""
    pos = np.searchsorted(sorted_ids, ids)
    pos_c = np.minimum(pos, len(sorted_ids) - 1)
    found = sorted_ids[pos_c] == ids
    return pos_c, ~found


@dataclasses.dataclass(frozen=True)
class LiveBuild:
    build_id: str
    manifest: dict
    checkpoint_version: str
    index: faiss.Index
    spec: ann.IndexSpec
    search_params: dict
    item_ids: np.ndarray  # (N,) sorted, memory-mapped
    item_emb: np.ndarray  # (N, D) float32, memory-mapped, row-aligned with item_ids
    user_ids: np.ndarray  # (U,) sorted, memory-mapped
    user_emb: np.ndarray  # (U, D) float32, memory-mapped
    scorer: RankingScorer
    item_tower: ItemTower  # the index's own item tower: embeds sidecar items in the same version
    schema: FeatureSchema
    loaded_at: float

    @property
    def dim(self) -> int:
        return int(self.item_emb.shape[1])

    def item_rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _lookup(self.item_ids, ids)

    def user_rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _lookup(self.user_ids, ids)

    def retrieve(self, user_rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (ids, scores) of the live index for users given by table row: (Q, k) each, -1 padded."""
        xq = np.ascontiguousarray(self.user_emb[user_rows], dtype=np.float32)  # (Q, D)
        D, I = ann.search(self.index, self.spec, self.search_params, xq, k)
        return I, D


def load_build(
    build_dir: Path, query_checkpoint: Path | None = None, clock=time.time, pair_allowed=None
) -> LiveBuild:
    """Load a complete build for serving. `query_checkpoint` (optional) names a query tower to use
    instead of the build's own copy; it must be the same version as the index unless
    `pair_allowed(family, query_version, index_version)` says that pair passed a skew check."""
    build_dir = Path(build_dir)
    try:
        manifest = json.loads((build_dir / "manifest.json").read_text())
        version = manifest["checkpoint"]["version"]
        ck = load_checkpoint(build_dir / "checkpoint")
        if ck.version != version:
            raise BuildRefused(
                f"build {build_dir.name}: its checkpoint copy is {ck.version}, the manifest says {version}"
            )
        query = load_checkpoint(query_checkpoint) if query_checkpoint else ck
        if query.version != version and not (
            pair_allowed and pair_allowed(query.family, query.version, version)
        ):
            raise BuildRefused(
                f"query tower version {query.version} differs from the index's checkpoint version {version} in build "
                f"{manifest['build_id']} and that pair has not passed a skew check; serving it is refused"
            )
        idx = ann.load(build_dir / "index.faiss")
        mm = {
            n: np.load(build_dir / f"{n}.npy", mmap_mode="r")
            for n in ("item_ids", "item_embeddings", "user_ids", "user_embeddings")
        }
    except BuildRefused:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise BuildRefused(f"build {build_dir.name} cannot be loaded: {type(e).__name__}: {e}") from e
    n = manifest["catalog"]["row_count"]
    if (
        idx.ntotal != n
        or len(mm["item_ids"]) != n
        or mm["item_embeddings"].shape != (n, manifest["index"]["dim"])
    ):
        raise BuildRefused(
            f"build {build_dir.name} is inconsistent: manifest says {n} items, index has {idx.ntotal}, "
            f"item table {len(mm['item_ids'])}, embeddings {mm['item_embeddings'].shape}"
        )
    if len(mm["user_ids"]) != len(mm["user_embeddings"]):
        raise BuildRefused(
            f"build {build_dir.name}: user ids {len(mm['user_ids'])} vs embeddings {len(mm['user_embeddings'])}"
        )
    ix = manifest["index"]
    build = LiveBuild(
        build_id=manifest["build_id"],
        manifest=manifest,
        checkpoint_version=version,
        index=idx,
        spec=ann.IndexSpec(ix["type"], ix["factory"], ix["train_sample"]),
        search_params=ix["search_params"],
        item_ids=mm["item_ids"],
        item_emb=mm["item_embeddings"],
        user_ids=mm["user_ids"],
        user_emb=mm["user_embeddings"],
        scorer=ck.model.scorer,
        item_tower=ck.model.item_tower,
        schema=ck.schema,
        loaded_at=clock(),
    )
    _smoke(build)
    return build


def _smoke(build: LiveBuild) -> None:
    """One retrieval and one score before the build may go live: catches unreadable files early."""
    if len(build.user_ids):
        ids, _ = build.retrieve(np.array([0]), 1)
        if ids[0, 0] < 0:
            raise BuildRefused(f"build {build.build_id}: smoke retrieval returned no result")
        with torch.inference_mode():
            u = torch.from_numpy(np.array(build.user_emb[:1]))
            i = torch.from_numpy(np.array(build.item_emb[:1]))
            if not torch.isfinite(build.scorer(u, i)).all():
                raise BuildRefused(f"build {build.build_id}: smoke score is not finite")


class BuildWatcher:
    """Follows the registry's CURRENT pointer. `poll()` loads a new live build when the pointer
    moves, validates it, and swaps one reference; a refused build is remembered and not retried until
    the pointer moves again. Readers take `watcher.live` once per batch and keep that reference."""

    def __init__(self, registry: Path, query_checkpoint: Path | None = None, on_event=None):
        self.registry = Registry(registry)
        self.query_checkpoint = query_checkpoint
        self.live: LiveBuild | None = None
        self.last_refused: tuple[str, str] | None = None
        # on_event(outcome, old_build, new_build_or_None, detail) after each load attempt
        self._on_event = on_event or (lambda outcome, old, new, detail: None)

    def _pair_allowed(self, family: str, query_version: str, index_version: str) -> bool:
        return skew.pair_allowed(self.registry.root, family, query_version, index_version)

    def poll(self) -> str:
        """Returns 'unchanged', 'swapped', 'refused' or 'empty'."""
        target = self.registry.current()
        if target is None:
            return "empty"
        if (self.live and self.live.build_id == target) or (
            self.last_refused and self.last_refused[0] == target
        ):
            return "unchanged"
        try:
            new = load_build(
                self.registry.build_dir(target), self.query_checkpoint, pair_allowed=self._pair_allowed
            )
        except Exception as e:  # noqa: BLE001 - any failure to load must leave the old build serving
            self.last_refused = (target, str(e))
            log.error("refusing build %s, still serving %s: %s", target, self.live and self.live.build_id, e)
            self._on_event("refused", self.live, None, f"{target}: {e}")
            return "refused"
        old = self.live
        self.live = new
        self.last_refused = None
        log.info(
            "now serving build %s (checkpoint %s), was %s",
            new.build_id,
            new.checkpoint_version,
            old and old.build_id,
        )
        self._on_event("swapped", old, new, "")
        return "swapped"
