"""Builds on an object store: how a staged build is uploaded, how a node gets a verified local copy,
and what `gc` removes there.

    PREFIX/builds/<build_id>/<file>            every file of the build (index, tables, checkpoint copy)
    PREFIX/builds/<build_id>/manifest.json     put LAST and create-only, with every file's size and
                                               sha256: the build exists from this put on

Object stores have no rename: a build becomes visible by its manifest alone, so a reader that finds
a manifest finds every file it lists, and an upload killed at any moment leaves objects without a
manifest, which no reader takes for a build (`gc_orphans` deletes them once stale). faiss and numpy
read local files (and serving memory-maps them), so a node works on a cached copy: downloaded beside
its final place, each file checked against the manifest's size and sha256, then renamed into place;
a copy that is there was verified, and a restarted replica reuses it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

from core.storage import remote_trees
from core.storage.build_dir import MANIFEST_FILE, BuildDir, BuildFormatError, BuildManifest
from core.storage.fsutil import sha256_file

BUILDS = "builds/"
STAGING = "staging/"  # parts of rebuilds in progress (core.rebuild.bucket_parts)


def manifest_key(build_id: str) -> str:
    return f"{BUILDS}{build_id}/{MANIFEST_FILE}"


def cache_dir(url: str) -> Path:
    """This node's directory for one remote registry: verified build copies and local staging."""
    return remote_trees.cache_root() / "registries" / remote_trees.url_key(url)


def upload_build(store, staging: Path, build_id: str, progress=None) -> dict:
    """Upload a complete staged build (its manifest written locally); returns the file list recorded
    in the uploaded manifest. The manifest's create-only put commits the build: if a build of that id
    is there already, nothing of it is replaced (its files are never listed in another manifest)."""
    b = BuildDir(staging)
    manifest = json.loads(b.manifest_path.read_text())
    if store.exists(manifest_key(build_id)):
        raise FileExistsError(f"build {build_id} is already committed in {store.url}")

    def with_files(files: dict) -> bytes:
        return (json.dumps({**manifest, "files": files}, indent=2, sort_keys=True) + "\n").encode()

    files = remote_trees.upload_tree(store, staging, f"{BUILDS}{build_id}/", MANIFEST_FILE, with_files, progress,
                                     skip=BuildDir.STAGING_ONLY)  # fmt: skip
    b.manifest_path.write_bytes(with_files(files))  # the staged copy now says what the bucket says
    return files


def adopt(staging: Path, cached: Path) -> None:
    """Keep the uploaded staging directory as this node's verified copy (its files were hashed as
    they went up), without the staging-only parts; dropped instead when it cannot be renamed there
    (another file system, or a copy already there): the copy is then fetched when first needed."""
    shutil.rmtree(BuildDir(staging).parts_dir, ignore_errors=True)
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(staging, cached)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)


def read_manifest(store, build_id: str) -> BuildManifest:
    data, _ = store.get(manifest_key(build_id))
    return BuildManifest.from_dict(json.loads(data), f"build {build_id} in {store.url}")


def fetch_build(store, build_id: str, cache_builds: Path) -> Path:
    """A verified local copy of the build: the cached one when it matches the bucket's manifest,
    else a fresh download (each file checked against its size and sha256 before the copy is used)."""
    data, _ = store.get(manifest_key(build_id))
    files = json.loads(data).get("files")
    if not files:
        raise BuildFormatError(
            f"build {build_id} in {store.url}: its manifest lists no files (not uploaded by skewless)"
        )
    final = Path(cache_builds) / build_id
    if _matches(final, data, files):
        return final
    tmp = final.with_name(f".fetch-{build_id}-{uuid.uuid4().hex[:8]}")
    try:
        for rel, meta in files.items():
            local = tmp / rel
            store.download(f"{BUILDS}{build_id}/{rel}", local)
            size, digest = local.stat().st_size, sha256_file(local)
            if (size, digest) != (meta["bytes"], meta["sha256"]):
                raise BuildFormatError(
                    f"build {build_id} in {store.url}: {rel} is {size} bytes sha256 {digest[:12]}, the manifest "
                    f"says {meta['bytes']} bytes sha256 {meta['sha256'][:12]}; not using it"
                )
        (tmp / MANIFEST_FILE).write_bytes(data)  # last: a copy with its manifest is complete
        if _matches(final, data, files):  # another process on this node got there first: use theirs
            return final
        shutil.rmtree(final, ignore_errors=True)  # a broken copy under the same name
        try:
            os.rename(tmp, final)
        except OSError:  # another process on this node renamed its verified copy first
            if not _matches(final, data, files):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _matches(local: Path, manifest: bytes, files: dict) -> bool:
    """A cached copy is the bucket's build if it has the same manifest and every file at its size
    (it was hashed before it was renamed into place; sizes catch a file truncated since)."""
    try:
        if (local / MANIFEST_FILE).read_bytes() != manifest:
            return False
        return all((local / rel).stat().st_size == meta["bytes"] for rel, meta in files.items())
    except OSError:
        return False


def committed(store) -> list[str]:
    """Ids of the builds whose manifest is in the bucket, sorted."""
    return sorted(
        key[len(BUILDS) :].split("/", 1)[0]
        for key, _ in store.list(BUILDS)
        if key.endswith("/" + MANIFEST_FILE) and key.count("/") == 2
    )


def delete_build(store, build_id: str) -> None:
    """Manifest first: from then on no reader takes the rest for a build."""
    store.delete(manifest_key(build_id))
    for key, _ in list(store.list(f"{BUILDS}{build_id}/")):
        store.delete(key)


def gc_orphans(store, stale_s: float, dry_run: bool, now: float | None = None) -> list[str]:
    """Objects under builds/<id>/ without a manifest, last written more than `stale_s` ago: an
    upload that was killed or failed (a running upload writes at least one object per file); and
    under staging/<id>/ (parts a stopped rebuild committed to the bucket, core.rebuild.bucket_parts),
    last written more than `stale_s` ago."""
    removed = _stale(store, BUILDS, stale_s, dry_run, now, keep=lambda b, keys: manifest_key(b) in keys)
    return removed + _stale(store, STAGING, stale_s, dry_run, now, keep=lambda b, keys: False)


def _stale(store, top: str, stale_s: float, dry_run: bool, now: float | None, keep) -> list[str]:
    now = time.time() if now is None else now
    by_build: dict[str, list[str]] = {}
    for key, _ in store.list(top):
        by_build.setdefault(key[len(top) :].split("/", 1)[0], []).append(key)
    removed = []
    for build_id, keys in sorted(by_build.items()):
        if keep(build_id, keys):
            continue
        newest = max(store.modified(k) for k in keys)
        if now - newest > stale_s:
            removed.append(
                f"{top}{build_id}/ ({len(keys)} objects, "
                + ("no manifest)" if top == BUILDS else "stopped rebuild)")
            )
            if not dry_run:
                for k in keys:
                    store.delete(k)
    return removed
