"""The build registry: immutable build directories plus one small `CURRENT` pointer.

    REGISTRY/builds/<build_id>/   a complete build (renamed into place only once complete)
    REGISTRY/builds/.tmp-*        a build being written (or left by a crash: `gc` removes it)
    REGISTRY/CURRENT              JSON: live build, canary build and its percentage (when one is being
                                  ramped in), a sequence number, the rollback stack, an event log
    REGISTRY/.lock                serialises pointer updates (flock)

The pointer is the only mutable thing and is replaced atomically (temp file, fsync, os.replace), so a
crash at any moment leaves it naming a complete build. Each update is a compare-and-swap on `seq`: a
rebuild remembers the sequence it started from and refuses to publish if someone published meanwhile.
On an object store the same layout works with a conditional put of the one pointer object.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from core.storage.build_dir import BuildDir, BuildManifest
from core.storage.fsutil import locked, write_json_atomic

log = logging.getLogger(__name__)

POINTER = "CURRENT"
MAX_LOG = 50
MAX_STACK = 100


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
    def __init__(self, root: Path, clock: Callable[[], str] = _now):
        self.root = Path(root)
        self.builds = self.root / "builds"
        self._clock = clock

    # ---- reading -------------------------------------------------------------------------------
    def pointer(self) -> Pointer:
        path = self.root / POINTER
        if not path.exists():
            return EMPTY
        d = json.loads(path.read_text())
        c = d.get("canary") or {}
        return Pointer(
            d["build_id"],
            d["seq"],
            tuple(d["stack"]),
            tuple(d["log"]),
            c.get("build_id"),
            c.get("percent", 0.0),
        )

    def current(self) -> str | None:
        return self.pointer().build_id

    def build_dir(self, build_id: str) -> Path:
        path = self.builds / build_id
        if build_id.startswith(".") or "/" in build_id or not BuildDir(path).is_complete():
            raise RegistryError(f"no complete build {build_id!r} in {self.builds}")
        return path

    def manifest(self, build_id: str) -> BuildManifest:
        return BuildDir(self.build_dir(build_id)).read_manifest()

    def list_builds(self) -> list[str]:
        if not self.builds.is_dir():
            return []
        return sorted(
            p.name for p in self.builds.iterdir() if not p.name.startswith(".") and BuildDir(p).is_complete()
        )

    # ---- writing -------------------------------------------------------------------------------
    def staging(self, build_id: str) -> Path:
        self.builds.mkdir(parents=True, exist_ok=True)
        tmp = self.builds / f".tmp-{build_id}"
        tmp.mkdir()
        (tmp / ".owner").write_text(
            json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "started": self._clock()})
        )
        return tmp

    def resume_staging(self, build_id: str) -> Path:
        """The staging directory of a stopped rebuild, now owned by this process."""
        tmp = self.builds / f".tmp-{build_id}"
        if (self.builds / build_id).exists():
            raise FileExistsError(f"build {build_id} is already committed; nothing to resume")
        if not tmp.is_dir():
            raise FileNotFoundError(
                f"no staged rebuild {build_id} in {self.builds} (never started here, or removed by "
                "`jobs.registry gc` or by a refused gate)"
            )
        (tmp / ".owner").write_text(
            json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "started": self._clock()})
        )
        return tmp

    def _locked(self):
        return locked(self.root / ".lock")

    def _swap(
        self, expected_seq: int | None, make: Callable[[Pointer], Pointer], before_replace=None
    ) -> Pointer:
        with self._locked():
            cur = self.pointer()
            if expected_seq is not None and cur.seq != expected_seq:
                raise PublishConflict(
                    f"CURRENT moved while this build ran: expected seq {expected_seq}, found seq {cur.seq} "
                    f"(live build {cur.build_id}); not publishing. Promote it explicitly if it should go live."
                )
            new = make(cur)
            write_json_atomic(self.root / POINTER, new.to_dict(), before_replace=before_replace)
            return new

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
        self.build_dir(build_id)  # must be complete before it can go live

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
        self.build_dir(build_id)

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
            self.build_dir(target)
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
            self.build_dir(stack[-1])
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
                    shutil.rmtree(self.builds / b)
            for tmp in self.root.glob(f".{POINTER}.tmp-*"):
                removed.append(tmp.name)  # a pointer update killed before its replace (we hold the lock)
                if not dry_run:
                    tmp.unlink()
            if self.builds.is_dir():
                for p in self.builds.iterdir():
                    if p.name.startswith(".tmp-") and _staging_is_dead(p, stale_staging_s):
                        removed.append(p.name)
                        if not dry_run:
                            shutil.rmtree(p)
        return removed


def _staging_is_dead(path: Path, stale_s: float) -> bool:
    try:
        owner = json.loads((path / ".owner").read_text())
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
