"""Committed parts on an object store: how the embedding hands its parts to the assembly when the
rebuild's nodes share no file system (an object-store registry without --scratch).

    <registry>/staging/<build id>/parts/items-00003/ids.npy
                                                   /vectors.npy
                                                   /part.json     the part's record plus each file's
                                                                  size and sha256 (uploaded last)
                                       /.attempts/<key>.<nonce>   one empty object per attempt
                                       /.actor-starts/<actor>.<nonce>

An embedding actor commits its part on its own disk (core.rebuild.parts), then uploads it here,
part.json last: a part whose part.json is in the bucket is complete, whichever node embedded it, so
a resumed rebuild on any node reuses it (the staged build's resume record is kept here too). The
driver's node fetches each part it lacks into its staging directory (verified against those hashes,
renamed into place whole) and assembles from there. A retried task uploads the same part again: the
objects are replaced whole, part.json last, and the bucket's record is the one the driver trusts.
"""

from __future__ import annotations

import json
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from core.rebuild import parts as partmod
from core.storage.fsutil import sha256_file
from core.storage.remote_builds import STAGING
from core.storage.store import Uri, open_store

_RECORD = "part.json"
_RESUME = "resume.json"  # what the parts were embedded from: a --resume on any node checks it
_DATA = ("ids.npy", "vectors.npy")


def parts_url(registry_url: str, build_id: str) -> str:
    return str(Uri(str(registry_url)) / STAGING.rstrip("/") / build_id / "parts")


class BucketParts:
    def __init__(self, url: str):
        self.url = str(url)
        self.store = open_store(self.url)

    # ---- written by the embedding actors -------------------------------------------------------
    def upload(self, part_dir: Path) -> dict:
        """Upload a committed local part, its record last (with each file's size and sha256)."""
        part_dir = Path(part_dir)
        record = partmod.read_record(part_dir)
        if record is None:
            raise FileNotFoundError(f"{part_dir} holds no committed part")
        files = {}
        for name in _DATA:
            p = part_dir / name
            files[name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            self.store.upload(p, f"{record['key']}/{name}")
        record = {**record, "files": files}
        self.store.put(f"{record['key']}/{_RECORD}", json.dumps(record).encode())
        return record

    # ---- the staged build's resume record (core.rebuild.build.resume_record) --------------------
    def put_resume(self, record: dict) -> None:
        self.store.put(_RESUME, json.dumps(record).encode())

    def get_resume(self) -> dict | None:
        try:
            return json.loads(self.store.get(_RESUME)[0])
        except FileNotFoundError:
            return None

    def mark(self, kind: str, name: str) -> None:
        """One empty object per attempt or actor start (counted by the driver: retries, restarts)."""
        self.store.put(f"{kind}/{name}.{uuid.uuid4().hex[:8]}", b"")

    # ---- read by the driver --------------------------------------------------------------------
    def marks(self, kind: str) -> list[str]:
        return [k.split("/", 1)[1].split(".", 1)[0] for k, _ in self.store.list(kind + "/")]

    def clear_marks(self, kind: str) -> None:
        for k, _ in list(self.store.list(kind + "/")):
            self.store.delete(k)

    def record(self, key: str) -> dict | None:
        try:
            data, _ = self.store.get(f"{key}/{_RECORD}")
        except FileNotFoundError:
            return None
        return json.loads(data)

    def fetch(self, record: dict, parts: Path) -> bool:
        """Make `parts/<key>` this record's part: kept if it already is, else downloaded beside it,
        checked against the record's sizes and hashes, and renamed into place. True if downloaded."""
        final = Path(parts) / record["key"]
        if same_part(partmod.read_record(final), record):
            return False
        tmp = Path(parts) / f".tmp-{record['key']}-{uuid.uuid4().hex[:8]}"  # discard_partial's prefix
        try:
            for name, want in record["files"].items():
                self.store.download(f"{record['key']}/{name}", tmp / name)
                got = {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
                if got != want:
                    raise OSError(f"{self.url}/{record['key']}/{name}: got {got}, its part.json says {want}")
            (tmp / _RECORD).write_text(json.dumps(record))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return True

    def fetch_all(self, records: list[dict], parts: Path, threads: int = 8) -> int:
        """Every part of `records` into `parts` (several downloads at once); returns how many came
        from the bucket."""
        Path(parts).mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(lambda r: self.fetch(r, parts), records))

    def delete(self) -> int:
        """Every object of this build's staged parts (after its commit, or when it was refused)."""
        keys = [k for k, _ in self.store.list("")]
        for k in keys:
            self.store.delete(k)
        return len(keys)


def same_part(local: dict | None, remote: dict) -> bool:
    """A local part record is the bucket's part (the bucket's adds the files' hashes)."""
    return local is not None and {k: v for k, v in remote.items() if k != "files"} == {
        k: v for k, v in local.items() if k != "files"
    }
