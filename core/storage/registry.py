"""The build registry: immutable builds plus one small `CURRENT` pointer, in a local directory or
under an object-store prefix (s3://bucket/prefix, gs://...; core.storage.store).

    REGISTRY/builds/<build_id>/   a complete build: locally renamed into place once complete; on an
                                  object store uploaded file by file, its manifest put last and
                                  create-only (core.storage.remote_builds), so it exists from then on
    REGISTRY/builds/.tmp-*        (local) a build being written (or left by a crash: `gc` removes it)
    REGISTRY/CURRENT              JSON: live build, canary build and its percentage (when one is being
                                  ramped in), a sequence number, the rollback stack, an event log
    REGISTRY/.lock                (local) held by each pointer update and by `gc`

The pointer is the only mutable thing. Every update reads it with its version and writes the new one
with a compare-and-swap on that version (a local check under flock then an atomic replace; S3
If-Match on the ETag, GCS generation match), so a crash at any moment leaves it naming a complete
build and of two racing writers exactly one wins. A rebuild also remembers the `seq` it started from
and refuses to publish if someone published meanwhile (PublishConflict names who).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from core.storage import remote_builds
from core.storage.build_dir import OWNER_FILE, BuildDir, BuildManifest
from core.storage.fsutil import commit_dir
from core.storage.store import CREATE, AlreadyExists, Version, VersionConflict, is_remote, open_store

log = logging.getLogger(__name__)

POINTER = "CURRENT"
MAX_LOG = 50
MAX_STACK = 100
MAX_SWAP_TRIES = 20


class RegistryError(RuntimeError):
    pass


class PublishConflict(RegistryError):
    """The pointer moved since the caller read it: somebody else published or rolled back."""


@dataclasses.dataclass(frozen=True)
class Pointer:
    build_id: str | None
    seq: int
    stack: tuple[str, ...]  # live builds, oldest first; stack[-1] == build_id
    log: tuple[dict, ...]
    canary: str | None = None  # a build serving `percent` % of users (core.serving.canary routes them)
    percent: float = 0.0

    def to_dict(self) -> dict:
        canary = None if self.canary is None else {"build_id": self.canary, "percent": self.percent}
        return {"build_id": self.build_id, "seq": self.seq, "stack": list(self.stack), "log": list(self.log),
                "canary": canary}  # fmt: skip


EMPTY = Pointer(None, 0, (), ())


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Registry:
    def __init__(self, root: Path | str, clock: Callable[[], str] = _now, cache: Path | None = None,
                 scratch: Path | None = None):  # fmt: skip
        """`cache`: this node's copies of a remote registry's builds (default: under SKEWLESS_CACHE_DIR);
        `scratch`: where a remote registry's builds are staged (default: under the cache)."""
        self.store = open_store(root)
        self.remote = is_remote(root)
        # local: the registry directory; remote: its URL (`cache` holds verified copies and staging)
        self.root = root if self.remote else Path(root)
        self.cache = Path(cache) if cache else remote_builds.cache_dir(self.store.url)
        self.builds = self.cache / "builds" if self.remote else self.root / "builds"
        self._scratch = Path(scratch) if scratch else self.cache / "staging"
        self._clock = clock

    # ---- reading -------------------------------------------------------------------------------
    def pointer(self) -> Pointer:
        return self._read_pointer()[0]

    def _read_pointer(self) -> tuple[Pointer, Version | None]:
        try:
            data, version = self.store.get(POINTER)
        except FileNotFoundError:
            return EMPTY, None
        d = json.loads(data)
        c = d.get("canary") or {}
        p = Pointer(d["build_id"], d["seq"], tuple(d["stack"]), tuple(d["log"]), c.get("build_id"),
                    c.get("percent", 0.0))  # fmt: skip
        return p, version

    def current(self) -> str | None:
        return self.pointer().build_id

    def is_committed(self, build_id: str) -> bool:
        if build_id.startswith(".") or "/" in build_id:
            return False
        if self.remote:
            return self.store.exists(remote_builds.manifest_key(build_id))
        return BuildDir(self.root / "builds" / build_id).is_complete()

    def _require(self, build_id: str) -> None:
        if not self.is_committed(build_id):
            raise RegistryError(f"no complete build {build_id!r} in {self.store.url}/builds")

    def build_dir(self, build_id: str) -> Path:
        """A local directory holding the complete build: the build itself on a local registry, a
        verified cached copy (fetched once per node) on an object store."""
        self._require(build_id)
        if self.remote:
            return remote_builds.fetch_build(self.store, build_id, self.builds)
        return self.builds / build_id

    def manifest(self, build_id: str) -> BuildManifest:
        if self.remote:
            self._require(build_id)
            return remote_builds.read_manifest(self.store, build_id)
        return BuildDir(self.build_dir(build_id)).read_manifest()

    def list_builds(self) -> list[str]:
        if self.remote:
            return remote_builds.committed(self.store)
        if not self.builds.is_dir():
            return []
        return sorted(
            p.name for p in self.builds.iterdir() if not p.name.startswith(".") and BuildDir(p).is_complete()
        )

    # ---- writing -------------------------------------------------------------------------------
    def staging(self, build_id: str) -> Path:
        """A new local directory the rebuild writes the build into (on an object store, on this
        node's disk until `commit` uploads it)."""
        self._staging_parent().mkdir(parents=True, exist_ok=True)
        tmp = self._staging_parent() / f".tmp-{build_id}"
        tmp.mkdir()
        self._own(tmp)
        return tmp

    def _staging_parent(self) -> Path:
        return self._scratch if self.remote else self.builds

    def _own(self, tmp: Path) -> None:
        (tmp / OWNER_FILE).write_text(
            json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "started": self._clock()})
        )

    def resume_staging(self, build_id: str) -> Path:
        """The staging directory of a stopped rebuild, now owned by this process."""
        tmp = self._staging_parent() / f".tmp-{build_id}"
        if self.is_committed(build_id):
            raise FileExistsError(f"build {build_id} is already committed; nothing to resume")
        if not tmp.is_dir():
            raise FileNotFoundError(
                f"no staged rebuild {build_id} in {self._staging_parent()} (never started here, or removed "
                "by `jobs.registry gc` or by a refused gate)"
            )
        self._own(tmp)
        return tmp

    def commit(self, staging: Path, build_id: str, progress=None) -> None:
        """Make a complete staged build (its manifest written) visible under its id, never half of it.
        `progress(line)`: told of each file uploaded to an object store."""
        if self.remote:
            remote_builds.upload_build(self.store, staging, build_id, progress)
            remote_builds.adopt(staging, self.builds / build_id)  # the verified local copy
            return
        commit_dir(staging, self.builds / build_id)

    def _locked(self):
        return self.store.lock() if not self.remote else contextlib.nullcontext()

    def _swap(
        self, expected_seq: int | None, make: Callable[[Pointer], Pointer], before_replace=None
    ) -> Pointer:
        """Read the pointer with its version, make the new one, write it if the version is unchanged;
        a lost race is retried from a fresh read, unless the caller expected a sequence (a rebuild
        publishing what it built against `expected_seq`): that is a PublishConflict naming the winner."""
        for _ in range(MAX_SWAP_TRIES):
            cur, version = self._read_pointer()
            if expected_seq is not None and cur.seq != expected_seq:
                raise PublishConflict(
                    f"CURRENT moved while this build ran: expected seq {expected_seq}, found seq {cur.seq} "
                    f"(live build {cur.build_id}); not publishing. Promote it explicitly if it should go live."
                )
            new = make(cur)
            data = (json.dumps(new.to_dict(), indent=2, sort_keys=True) + "\n").encode()
            try:
                self.store.put(POINTER, data, mode=version or CREATE, before_replace=before_replace)
                return new
            except (VersionConflict, AlreadyExists):
                continue  # someone wrote between our read and our write: read again
        raise RegistryError(f"CURRENT kept changing under {MAX_SWAP_TRIES} tries; try again")

    def _event(self, cur: Pointer, action: str, build_id: str, **extra) -> tuple[dict, ...]:
        entry = {
            "action": action,
            "build_id": build_id,
            "from": cur.build_id,
            "seq": cur.seq + 1,
            "at": self._clock(),
            **extra,
        }
        return (*cur.log, entry)[-MAX_LOG:]

    def publish(self, build_id: str, expected_seq: int | None, before_replace=None) -> Pointer:
        """Make `build_id` live. With `expected_seq`, refuse (PublishConflict) if the pointer moved.
        Refused while a canary is being ramped in: that decision (promote or abort) comes first."""
        self._require(build_id)  # must be complete before it can go live

        def make(cur: Pointer) -> Pointer:
            if cur.canary is not None:
                raise PublishConflict(
                    f"canary {cur.canary} serves {cur.percent:g}% of users; not publishing {build_id} over it. "
                    "`jobs.registry promote` or `abort` the canary first, then promote this build."
                )
            stack = (*cur.stack, build_id)[-MAX_STACK:]
            return Pointer(build_id, cur.seq + 1, stack, self._event(cur, "publish", build_id))

        return self._swap(expected_seq, make, before_replace)

    def canary(self, build_id: str, percent: float, before_replace=None) -> Pointer:
        """Serve `build_id` to `percent` % of users (by a stable hash of the user id) beside the live
        build; called again with the same build, it ramps the percentage (users already in stay in)."""
        if not 0 < percent <= 100:
            raise RegistryError(f"canary percent must be in (0, 100], got {percent:g}")
        self._require(build_id)

        def make(cur: Pointer) -> Pointer:
            if cur.build_id is None:
                raise RegistryError(f"no live build to canary {build_id} against; promote it instead")
            if build_id == cur.build_id:
                raise RegistryError(f"{build_id} is the live build already")
            if cur.canary not in (None, build_id):
                raise RegistryError(
                    f"canary {cur.canary} is in progress at {cur.percent:g}%; promote or abort it first"
                )
            event = self._event(cur, "canary", build_id, percent=percent)
            return dataclasses.replace(
                cur, seq=cur.seq + 1, log=event, canary=build_id, percent=float(percent)
            )

        return self._swap(None, make, before_replace)

    def promote(self, build_id: str | None = None, before_replace=None) -> Pointer:
        """Make `build_id` live for every user; without one, the canary. Promoting another build while
        a canary runs is refused: abort the canary first."""

        def make(cur: Pointer) -> Pointer:
            target = build_id or cur.canary
            if target is None:
                raise RegistryError("no canary in progress; name the build to promote")
            if cur.canary not in (None, target):
                raise RegistryError(f"canary {cur.canary} is in progress; abort it before promoting {target}")
            self._require(target)
            stack = (*cur.stack, target)[-MAX_STACK:]
            return Pointer(target, cur.seq + 1, stack, self._event(cur, "promote", target))

        return self._swap(None, make, before_replace)

    def abort(self, before_replace=None) -> Pointer:
        """End the canary: every user back on the live build."""

        def make(cur: Pointer) -> Pointer:
            if cur.canary is None:
                raise RegistryError(f"no canary in progress (live build {cur.build_id})")
            event = self._event(cur, "abort", cur.canary, percent=cur.percent)
            return dataclasses.replace(cur, seq=cur.seq + 1, log=event, canary=None, percent=0.0)

        return self._swap(None, make, before_replace)

    def rollback(self) -> Pointer:
        """One step back: during a canary, end it (as `abort`); else return to the build that was live
        before the current one."""

        def make(cur: Pointer) -> Pointer:
            if cur.canary is not None:
                event = self._event(cur, "rollback", cur.build_id, aborted_canary=cur.canary)
                return dataclasses.replace(cur, seq=cur.seq + 1, log=event, canary=None, percent=0.0)
            if len(cur.stack) < 2:
                raise RegistryError(
                    f"nothing to roll back to: live build {cur.build_id}, no earlier live build"
                )
            stack = cur.stack[:-1]
            self._require(stack[-1])
            return Pointer(stack[-1], cur.seq + 1, stack, self._event(cur, "rollback", stack[-1]))

        return self._swap(None, make)

    # ---- retention -----------------------------------------------------------------------------
    def protected(self, rollback_window: int = 2) -> set[str]:
        """The live build, the canary, and the last `rollback_window` builds the live one could roll
        back to."""
        cur = self.pointer()
        return set(cur.stack[-(rollback_window + 1) :]) | ({cur.canary} - {None})

    def gc(
        self,
        rollback_window: int = 2,
        keep_extra: int = 2,
        stale_staging_s: float = 3600.0,
        dry_run: bool = False,
    ) -> list[str]:
        """Delete complete builds that are neither live, nor within `rollback_window` rollbacks, nor
        among the `keep_extra` newest others; and staging directories of dead rebuilds (owner process
        gone on this host, or older than `stale_staging_s`)."""
        removed = []
        with self._locked():
            protected = self.protected(rollback_window)
            unprotected = [b for b in self.list_builds() if b not in protected]  # oldest first
            for b in unprotected[: max(0, len(unprotected) - keep_extra)]:
                removed.append(b)
                if not dry_run:
                    self._delete(b)
            if self.remote:  # uploads that never put their manifest (killed, or failed)
                removed += remote_builds.gc_orphans(self.store, stale_staging_s, dry_run)
            else:
                for tmp in self.root.glob(f".{POINTER}.tmp-*"):
                    removed.append(tmp.name)  # a pointer update killed before its replace (we hold the lock)
                    if not dry_run:
                        tmp.unlink()
            staged = self._staging_parent()
            for p in sorted(staged.iterdir()) if staged.is_dir() else ():
                if p.name.startswith(".tmp-") and _staging_is_dead(p, stale_staging_s):
                    removed.append(p.name)
                    if not dry_run:
                        shutil.rmtree(p)
        return removed

    def _delete(self, build_id: str) -> None:
        if self.remote:
            remote_builds.delete_build(self.store, build_id)
        shutil.rmtree(self.builds / build_id, ignore_errors=self.remote)  # remote: the cached copy, if any


def _staging_is_dead(path: Path, stale_s: float) -> bool:
    try:
        owner = json.loads((path / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return time.time() - path.stat().st_mtime > stale_s
    if owner.get("host") == os.uname().nodename:
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return time.time() - path.stat().st_mtime > stale_s
