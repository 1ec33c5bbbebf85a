"""Where artifacts live: a local directory or an object-store prefix (s3://, gs://), behind one API.

Small control objects (the live pointer, manifests, skew verdicts) need what object stores offer
instead of rename and flock: a create-only put (S3 `If-None-Match: *`, GCS `ifGenerationMatch=0`)
and a compare-and-swap put on the version read with the object (S3 `If-Match: <ETag>`, GCS
generation). `obstore` gives both, for S3 and GCS, with the usual credential chains. Bulk data
(catalog partitions that Ray Data and pyarrow read) goes through pyarrow's file systems:
`arrow_fs()`.

A local directory keeps the POSIX guarantees it always had: create-only is a hard link of a fully
written temp file (fails if the name exists), compare-and-swap is a check under flock followed by an
atomic replace.

Configuration comes from the environment, as the storage SDKs read it: AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN (or the instance's role), AWS_REGION, and AWS_ENDPOINT_URL
for an S3-compatible server that is not AWS (MinIO, SeaweedFS, Ceph); GOOGLE_APPLICATION_CREDENTIALS
for GCS. No credential is ever part of a URL, a log line or an error message here.
"""

from __future__ import annotations

import contextlib
import functools
import os
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from core.storage.fsutil import fsync_dir, locked, write_bytes_atomic

REMOTE_SCHEMES = ("s3", "gs")


class AlreadyExists(FileExistsError):
    """A create-only put found the object there."""


class VersionConflict(RuntimeError):
    """A compare-and-swap put found another version than the one it was given (someone wrote since)."""


class Version(NamedTuple):
    """What a compare-and-swap put compares: the ETag (S3) or generation (GCS) read with the object;
    for a local file its inode and change time (every write is a rename of a new file)."""

    e_tag: str | None
    version: str | None = None


CREATE = "create"  # put mode: fail with AlreadyExists if the key exists
OVERWRITE = "overwrite"


def is_remote(url: str | os.PathLike) -> bool:
    return isinstance(url, str) and urllib.parse.urlsplit(url).scheme in REMOTE_SCHEMES


class Uri(str):
    """An object-store URL with the few path-like parts the code asks of a location (name, parent,
    "/"), so that a dataset's or a package's location is a Path or a Uri and code reads either."""

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Uri:
        return Uri(self.rstrip("/").rsplit("/", 1)[0])

    def __truediv__(self, other) -> Uri:
        return Uri(f"{self.rstrip('/')}/{other}")

    def resolve(self) -> Uri:
        return self


def location(p: str | os.PathLike) -> Path | Uri:
    """A command-line location: a Uri for s3:// and gs://, else a local Path."""
    if isinstance(p, Uri | Path):
        return p
    if isinstance(p, str) and "://" in p and not is_remote(p):
        raise ValueError(f"unsupported storage URL {p!r}: expected a local path, s3://... or gs://...")
    return Uri(p) if is_remote(p) else Path(p)


def open_store(url: str | os.PathLike) -> LocalStore | ObjectStore:
    """A store for a local path or an `s3://bucket/prefix` / `gs://bucket/prefix` URL."""
    if is_remote(url):
        return ObjectStore(str(url))
    if isinstance(url, str) and "://" in url:
        raise ValueError(f"unsupported storage URL {url!r}: expected a local path, s3://... or gs://...")
    return LocalStore(Path(url))


class LocalStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = str(self.root)

    def path(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> tuple[bytes, Version]:
        """The object's bytes and version; FileNotFoundError if there is none."""
        p = self.path(key)
        with open(p, "rb") as f:
            st = os.fstat(f.fileno())
            return f.read(), Version(f"{st.st_ino}-{st.st_ctime_ns}")

    def put(self, key: str, data: bytes, mode: str | Version = OVERWRITE, before_replace=None) -> None:
        """Write `data` atomically. mode: OVERWRITE, CREATE (AlreadyExists if there), or the Version
        read with the object (VersionConflict if it changed since). `before_replace`: a test hook,
        called once the new bytes are durable and before they become visible."""
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        if mode == CREATE:
            tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.write_bytes(data)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            if before_replace is not None:
                before_replace(tmp)
            try:
                os.link(tmp, p)  # atomic, and refuses an existing name
            except FileExistsError:
                raise AlreadyExists(f"{p} exists") from None
            finally:
                tmp.unlink()
            fsync_dir(p.parent)
            return
        if mode == OVERWRITE:
            write_bytes_atomic(p, data, before_replace)
            return
        with self.lock():
            try:
                _, now = self.get(key)
            except FileNotFoundError:
                now = None
            if now != mode:
                raise VersionConflict(f"{p} changed since it was read")
            write_bytes_atomic(p, data, before_replace)

    def lock(self):
        """The store's flock: held by every compare-and-swap (and by whoever must not overlap one)."""
        return locked(self.root / ".lock")

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """(key, bytes) of every object under `prefix` (a directory-like prefix ending in "/" or ""):
        hidden names (temp files, locks) are not objects."""
        base = self.path(prefix)
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith("."):
                    continue
                p = Path(dirpath) / name
                yield p.relative_to(self.root).as_posix(), p.stat().st_size

    def modified(self, key: str) -> float:
        """When the object was last written (epoch seconds)."""
        return self.path(key).stat().st_mtime

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()

    def upload(self, local: Path, key: str) -> None:
        raise NotImplementedError("a local store is written in place")

    def download(self, key: str, local: Path) -> None:
        raise NotImplementedError("a local store is read in place")


class ObjectStore:
    """An S3 or GCS prefix. Keys are relative to the prefix, "/"-separated."""

    def __init__(self, url: str):
        import obstore  # only a remote store needs it

        self._obs = obstore
        parts = urllib.parse.urlsplit(url)
        self.scheme, self.bucket = parts.scheme, parts.netloc
        self.prefix = parts.path.strip("/")
        if not self.bucket:
            raise ValueError(f"storage URL {url!r} names no bucket: expected {self.scheme}://BUCKET/PREFIX")
        self.url = f"{self.scheme}://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self._store = _obstore_for(self.scheme, self.bucket, self.prefix)

    def get(self, key: str) -> tuple[bytes, Version]:
        try:
            r = self._obs.get(self._store, key)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url}/{key}") from None
        meta = r.meta
        return bytes(r.bytes()), Version(meta.get("e_tag"), meta.get("version"))

    def put(self, key: str, data: bytes, mode: str | Version = OVERWRITE, before_replace=None) -> None:
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        if before_replace is not None:
            before_replace(None)
        obs_mode = mode if mode in (CREATE, OVERWRITE) else {k: v for k, v in mode._asdict().items() if v}
        try:
            self._obs.put(self._store, key, data, mode=obs_mode)
        except AlreadyExistsError:
            raise AlreadyExists(f"{self.url}/{key} exists") from None
        except PreconditionError:
            if mode == CREATE:  # some servers answer a lost create-only race with 412
                raise AlreadyExists(f"{self.url}/{key} exists") from None
            raise VersionConflict(f"{self.url}/{key} changed since it was read") from None

    def exists(self, key: str) -> bool:
        try:
            self._obs.head(self._store, key)
            return True
        except FileNotFoundError:
            return False

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        for chunk in self._obs.list(self._store, prefix or None):
            for meta in chunk:
                yield meta["path"], int(meta["size"])

    def modified(self, key: str) -> float:
        return self._obs.head(self._store, key)["last_modified"].timestamp()

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._obs.delete(self._store, key)

    def upload(self, local: Path, key: str) -> None:
        """One object from a local file (multipart above a few MB: visible only once complete)."""
        self._obs.put(self._store, key, Path(local))

    def download(self, key: str, local: Path) -> None:
        """To `local`, written beside it and renamed: a partial download is never at `local`."""
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.part-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                for chunk in self._obs.get(self._store, key).stream(min_chunk_size=8 << 20):
                    f.write(chunk)
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)

    def arrow_fs(self):
        """(pyarrow FileSystem, "bucket/prefix") for bulk reads and writes (Ray Data, parquet)."""
        return arrow_filesystem(self.scheme), f"{self.bucket}/{self.prefix}".rstrip("/")


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _obstore_for(scheme: str, bucket: str, prefix: str):
    from obstore.store import GCSStore, S3Store

    if scheme == "gs":
        return GCSStore(bucket, prefix=prefix or None)
    endpoint = _endpoint()
    config = {}
    if endpoint:  # an S3-compatible server: path-style addressing, any region name it accepts
        config.update(endpoint=endpoint, virtual_hosted_style_request=False)
    if not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
        config["region"] = "us-east-1"
    client = {"allow_http": True} if endpoint and endpoint.startswith("http://") else None
    return S3Store(bucket, prefix=prefix or None, config=config or None, client_options=client)


def arrow_path(f: str | os.PathLike):
    """(pyarrow FileSystem or None for a local path, path for it) of a file location."""
    if not is_remote(str(f)):
        return None, str(f)
    u = urllib.parse.urlsplit(str(f))
    return arrow_filesystem(u.scheme), u.netloc + u.path


@functools.cache
def arrow_filesystem(scheme: str):
    """pyarrow's file system for `scheme`, configured from the same environment as the object store
    (pyarrow's S3 constructor does not read AWS_ENDPOINT_URL, and without a region it may ask the
    network for the bucket's)."""
    from pyarrow import fs

    if scheme == "gs":
        return fs.GcsFileSystem()
    endpoint = _endpoint()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    if not endpoint:
        return fs.S3FileSystem(region=region)
    u = urllib.parse.urlsplit(endpoint)
    return fs.S3FileSystem(endpoint_override=u.netloc, scheme=u.scheme or "https", region=region)
