"""The build directory, owned here: its file names, its typed manifest, its writer and its reader.

    builds/<build_id>/manifest.json         BuildManifest (kind + format_version, checked on read)
    builds/<build_id>/index.faiss           the ANN index over item ids
    builds/<build_id>/item_ids.npy          (N,) int64 sorted; item_embeddings.npy (N, D) row-aligned
    builds/<build_id>/user_ids.npy          (U,) int64 sorted; user_embeddings.npy (U, D); only when
                                            the build embedded users (manifest.users is not None)
    builds/<build_id>/shards/NNNNN.faiss    a sharded build's indexes instead of index.faiss (one per
                                            id range, manifest.index.shards; searched as one)
    builds/<build_id>/checkpoint/           the checkpoint copy: query tower travels with its index
    (staging only) parts/, rebuild.json     committed embedded partitions (core.rebuild.parts) and what they
                                            were embedded from (core.rebuild.build): what --resume reuses

Every other module (rebuild, serving, registry, jobs, tests, benchmarks) goes through `BuildDir` and
`BuildManifest`; no file name or manifest key is spelled anywhere else.
"""

from __future__ import annotations

import calendar
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np

from core.ann import index as ann
from core.storage.fsutil import write_json_atomic
from core.storage.remote_trees import tree_files

KIND = "skewless.build"
# 2: user tables optional (a build without users is servable by history), quality.queries records
# which queries tuned and gated the index. 3: index.layout merged | sharded with index.shards (id
# range, rows, node, version of each), manifest.parts (embedded / reused partitions). Older builds are
# refused.
FORMAT_VERSION = 3
# Every skewless artifact directory (builds, checkpoints) describes itself in a file of this name.
MANIFEST_FILE = "manifest.json"
_INDEX_FILE = "index.faiss"
_TABLES = {
    "item_ids": "item_ids.npy",
    "item_embeddings": "item_embeddings.npy",
    "user_ids": "user_ids.npy",
    "user_embeddings": "user_embeddings.npy",
}
_CHECKPOINT_DIR = "checkpoint"
_SHARDS_DIR = "shards"
_PARTS_DIR = "parts"
_RESUME_FILE = "rebuild.json"
OWNER_FILE = ".owner"  # staging only: who is writing it (core.storage.registry)


class BuildFormatError(ValueError):
    """A build directory is incomplete, of another kind or format, or its manifest is malformed."""


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    version: str
    family: str
    weights_sha256: str
    source_path: str
    embed_dim: int


@dataclasses.dataclass(frozen=True)
class DatasetRef:
    fingerprint: str
    row_count: int
    partitions: int = 0
    path: str = ""


@dataclasses.dataclass(frozen=True)
class IndexInfo:
    type: str  # "flat" | "ivf" | "hnsw" | "ivfpq"
    factory: str
    metric: str
    dim: int
    ntotal: int
    train_sample: int
    search_params: dict
    layout: str = "merged"  # "merged": index.faiss | "sharded": shards/NNNNN.faiss, one per entry below
    shards: tuple = ()  # per id range: shard, rows, id_lo, id_hi, row_offset, node, checkpoint_version
    kmeans_iters: int = 10  # the coarse quantizer's training (IVF)
    refit: bool = (
        False  # centroids moved to their lists' means after the add (core.ann.index.refit_centroids)
    )


@dataclasses.dataclass(frozen=True)
class BuildManifest:
    build_id: str
    created_at: str  # ISO 8601 UTC, "YYYY-MM-DDTHH:MM:SSZ"
    checkpoint: CheckpointRef
    catalog: DatasetRef
    users: DatasetRef | None  # None: no user table; served by history only
    homogeneity: dict  # checkpoint_versions (exactly one), item_rows, user_rows
    index: IndexInfo
    quality: dict  # recall gate: params, sweeps, held-out recall, which queries (core.ann.index.build_tuned)
    timings: dict
    skew_gate: dict | None
    run: dict
    based_on_seq: int
    parts: dict = dataclasses.field(default_factory=dict)  # embedded partitions: counts, reused
    # the cut-over comparison with the build live when this one was built (core.quality.compare): health,
    # overlap, held-out quality, verdict, forced; None when nothing was live or it was not run
    comparison: dict | None = None
    # every file of the build (relative path -> bytes, sha256), recorded when a build is uploaded to
    # an object store (core.storage.remote_builds): what a node's cached copy is verified against
    files: dict = dataclasses.field(default_factory=dict)

    @property
    def checkpoint_version(self) -> str:
        return self.checkpoint.version

    @property
    def has_users(self) -> bool:
        return self.users is not None

    def created_at_epoch(self) -> float:
        return float(calendar.timegm(time.strptime(self.created_at, "%Y-%m-%dT%H:%M:%SZ")))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {"kind": KIND, "format_version": FORMAT_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict, where: str = "build") -> BuildManifest:
        if not isinstance(d, dict):
            raise BuildFormatError(f"{where}: manifest must be a JSON object, got {type(d).__name__}")
        if d.get("kind") != KIND or d.get("format_version") != FORMAT_VERSION:
            raise BuildFormatError(
                f"{where}: expected kind {KIND!r} format version {FORMAT_VERSION}, got kind "
                f"{d.get('kind')!r} format version {d.get('format_version')!r}; rebuild it with this skewless"
            )
        try:
            return cls(
                build_id=d["build_id"],
                created_at=d["created_at"],
                checkpoint=CheckpointRef(**d["checkpoint"]),
                catalog=DatasetRef(**d["catalog"]),
                users=None if d["users"] is None else DatasetRef(**d["users"]),
                homogeneity=d["homogeneity"],
                index=IndexInfo(**{**d["index"], "shards": tuple(d["index"].get("shards", ()))}),
                quality=d["quality"],
                timings=d["timings"],
                skew_gate=d["skew_gate"],
                run=d["run"],
                based_on_seq=d["based_on_seq"],
                parts=d.get("parts", {}),
                comparison=d.get("comparison"),
                files=d.get("files", {}),
            )
        except (KeyError, TypeError) as e:
            raise BuildFormatError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from e


def now_iso(clock=time.time) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock()))


@dataclasses.dataclass(frozen=True)
class BuildDir:
    """One build directory (complete, or a staging directory being written)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    # ---- paths -----------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def index_path(self) -> Path:
        return self.root / _INDEX_FILE

    @property
    def checkpoint_path(self) -> Path:
        return self.root / _CHECKPOINT_DIR

    @property
    def parts_dir(self) -> Path:
        """Staging only: the rebuild's committed embedded partitions (core.rebuild.parts)."""
        return self.root / _PARTS_DIR

    @property
    def resume_path(self) -> Path:
        """Staging only: what the staged parts were embedded from (core.rebuild.build.resume_record)."""
        return self.root / _RESUME_FILE

    def shard_index_path(self, shard: int) -> Path:
        return self.root / _SHARDS_DIR / f"{shard:05d}.faiss"

    def table_path(self, name: str) -> Path:
        return self.root / _TABLES[name]

    def table_files(self, what: str) -> tuple[Path, Path]:
        """(ids .npy, vectors .npy) of the items or users table, which the rebuild's workers fill."""
        one = {"items": "item", "users": "user"}[what]
        return self.table_path(f"{one}_ids"), self.table_path(f"{one}_embeddings")

    STAGING_ONLY = (_PARTS_DIR, _RESUME_FILE)

    def build_files(self) -> list[tuple[str, Path]]:
        """(relative path, path) of every file a complete build consists of, its manifest excepted:
        what the rebuild's staging directory holds besides the staging-only parts and records (and
        hidden names: the owner record, temp files, markers)."""
        return tree_files(self.root, MANIFEST_FILE, self.STAGING_ONLY)

    def is_complete(self) -> bool:
        """A complete build has its manifest, which the writer adds last."""
        return self.manifest_path.is_file()

    # ---- writing (the rebuild, test fixtures) --------------------------------------------------
    def write_items(self, ids: np.ndarray, emb: np.ndarray) -> None:
        """Sorted ids + row-aligned vectors: serving memory-maps both and looks ids up by binary search."""
        _write_table_pair(self, "item", ids, emb)

    def write_users(self, ids: np.ndarray, emb: np.ndarray) -> None:
        _write_table_pair(self, "user", ids, emb)

    def write_index(self, index) -> None:
        ann.save(index, self.index_path)

    def shard_paths(self, shards) -> dict[int, str]:
        (self.root / _SHARDS_DIR).mkdir(exist_ok=True)
        return {int(s): str(self.shard_index_path(int(s))) for s in shards}

    def copy_checkpoint(self, checkpoint_dir: Path) -> None:
        shutil.copytree(checkpoint_dir, self.checkpoint_path)

    def write_manifest(self, manifest: BuildManifest) -> None:
        """Written last: its presence is what makes a build complete."""
        write_json_atomic(self.manifest_path, manifest.to_dict())

    # ---- reading (serving, registry, jobs, benchmarks) -----------------------------------------
    def read_manifest(self) -> BuildManifest:
        where = f"build {self.root.name}"
        try:
            d = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise BuildFormatError(f"{where}: no {MANIFEST_FILE} in {self.root} (incomplete build)") from None
        except ValueError as e:
            raise BuildFormatError(f"{where}: {MANIFEST_FILE} is not valid JSON: {e}") from e
        return BuildManifest.from_dict(d, where)

    def load_index(self, manifest: BuildManifest | None = None, mmap: bool = False):
        """The merged index, or (manifest.index.layout "sharded") the shards searched as one."""
        if manifest is not None and manifest.index.layout == "sharded":
            return ann.ShardedIndex(
                [ann.load(self.shard_index_path(s["shard"]), mmap=mmap) for s in manifest.index.shards]
            )
        return ann.load(self.index_path, mmap=mmap)

    def open_items(self, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N,), vectors (N, D)), memory-mapped read-only by default."""
        return _open_table_pair(self, "item", mmap)

    def open_users(self, manifest: BuildManifest, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(ids (U,), vectors (U, D)); empty tables when the build embedded no users."""
        if not manifest.has_users:
            d = manifest.index.dim
            return np.zeros(0, np.int64), np.zeros((0, d), np.float32)
        return _open_table_pair(self, "user", mmap)


def _write_table_pair(b: BuildDir, what: str, ids: np.ndarray, emb: np.ndarray) -> None:
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) != len(emb) or (len(ids) > 1 and not (ids[1:] > ids[:-1]).all()):
        raise BuildFormatError(f"{what} table: ids must be sorted, unique and row-aligned with the vectors")
    np.save(b.table_path(f"{what}_ids"), ids)
    np.save(b.table_path(f"{what}_embeddings"), np.ascontiguousarray(emb, dtype=np.float32))


def _open_table_pair(b: BuildDir, what: str, mmap: bool) -> tuple[np.ndarray, np.ndarray]:
    mode = "r" if mmap else None
    return (
        np.load(b.table_path(f"{what}_ids"), mmap_mode=mode),
        np.load(b.table_path(f"{what}_embeddings"), mmap_mode=mode),
    )
