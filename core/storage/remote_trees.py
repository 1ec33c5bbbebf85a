"""Directory artifacts on an object store: a tree of files committed by one object put last.

Object stores have no rename, so a directory artifact (a build, a model package, a dataset) becomes
visible by its commit object alone: every other file is uploaded first, then the commit object (the
artifact's own manifest) with a create-only put. A reader that finds the commit object finds every
file; an upload killed at any moment leaves objects without one, which no reader takes for an
artifact. Nodes use a local copy (faiss, torch and numpy read local files): downloaded beside its
final place and renamed into place once whole.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

from core.storage.fsutil import sha256_file
from core.storage.store import CREATE, open_store


def cache_root() -> Path:
    """This node's cache of remote artifacts (SKEWLESS_CACHE_DIR, else ~/.cache/skewless): put it on
    a local disk with room for the builds a replica serves."""
    return Path(os.environ.get("SKEWLESS_CACHE_DIR") or Path.home() / ".cache" / "skewless")


def url_key(url: str) -> str:
    return hashlib.sha256(str(url).encode()).hexdigest()[:16]


def tree_files(local: Path, commit: str, skip: tuple[str, ...] = ()) -> list[tuple[str, Path]]:
    """(relative path, path) of the files an upload of `local` sends before its commit object:
    everything but the commit object, hidden names (temp files, markers) and the `skip` top-level names."""
    out = []
    for p in sorted(Path(local).rglob("*")):
        rel = p.relative_to(local)
        hidden = any(n.startswith(".") for n in rel.parts)
        if p.is_file() and rel.as_posix() != commit and rel.parts[0] not in skip and not hidden:
            out.append((rel.as_posix(), p))
    return out


def upload_tree(store, local: Path, prefix: str, commit: str, commit_data=None, progress=None,
                skip: tuple[str, ...] = ()) -> dict:  # fmt: skip
    """Upload `local` under `prefix` ("" or ending in "/"): its files, then `commit` create-only (its
    local bytes, or `commit_data(files)`'s); AlreadyExists if that artifact is committed there already.
    Returns `files`: {relative path: {"bytes", "sha256"}} of the files sent."""
    files = {}
    for rel, path in tree_files(local, commit, skip):
        files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        store.upload(path, prefix + rel)
        if progress is not None:
            progress(f"uploaded {rel} ({files[rel]['bytes']:,} bytes)")
    data = commit_data(files) if commit_data is not None else (Path(local) / commit).read_bytes()
    store.put(prefix + commit, data, mode=CREATE)
    return files


def fetch_tree(url: str, commit: str, kind: str) -> Path:
    """This node's copy of the artifact at `url` (every object under it), reused while its commit
    object is unchanged. FileNotFoundError when nothing is committed there."""
    store = open_store(url)
    try:
        data, _ = store.get(commit)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {kind} at {url}: {commit} not found (uploads put it last)") from None
    final = cache_root() / kind / url_key(store.url)
    if _same(final / commit, data):
        return final
    tmp = final.with_name(f".fetch-{final.name}-{uuid.uuid4().hex[:8]}")
    try:
        for key, _ in list(store.list("")):
            if key != commit and not any(n.startswith(".") for n in key.split("/")):
                store.download(key, tmp / key)
        (tmp / commit).write_bytes(data)  # last: a copy with its commit object is whole
        if _same(final / commit, data):  # another process on this node got there first: use theirs
            return final
        shutil.rmtree(final, ignore_errors=True)  # a stale copy (the artifact there was replaced)
        try:
            os.rename(tmp, final)
        except OSError:  # another process renamed its copy in between
            if not _same(final / commit, data):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _same(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except OSError:
        return False
