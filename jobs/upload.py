"""Upload model packages and datasets to object storage, each committed as one artifact.

  python -m jobs.upload packages/ml-two-tower-XXXX s3://BUCKET/packages/ml-two-tower-XXXX
  python -m jobs.upload data s3://BUCKET/data        # every dataset under data/ (catalog, users, ...)

Each artifact's files go up first and its own manifest (a package's manifest.json, a dataset's
_dataset.json) last, create-only: a reader (a rebuild, an embedding actor, a replica) finds a whole
artifact or none, and an existing artifact is never overwritten (upload to a new prefix instead). A
package is loaded and verified before anything is sent. Credentials and endpoint come from the
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL for a server
that is not AWS; GOOGLE_APPLICATION_CREDENTIALS for gs://).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from core.contract import package as pkg
from core.contract.towers import load_package
from core.storage.datasets import DATASET_MANIFEST
from core.storage.remote_trees import upload_tree
from core.storage.store import AlreadyExists, is_remote, open_store
from jobs.common import run_main


def artifacts(src: Path) -> list[tuple[Path, str]]:
    """(directory, its commit object) of every package or dataset at or under `src`."""
    found = []
    for mf in sorted([*src.rglob(DATASET_MANIFEST), *src.rglob(pkg.MANIFEST)]):
        d = mf.parent
        if mf.name == pkg.MANIFEST and (d / DATASET_MANIFEST).exists():
            continue
        found.append((d, mf.name))
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.upload", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("src", type=Path, help="a package or dataset directory, or a directory holding several")
    p.add_argument("url", help="where it goes: s3://BUCKET/PREFIX or gs://BUCKET/PREFIX")
    a = p.parse_args(argv)
    if not is_remote(a.url):
        p.error(f"expected an s3:// or gs:// URL, got {a.url!r}")
    found = artifacts(a.src)
    if not found:
        p.error(f"no model package ({pkg.MANIFEST}) or dataset ({DATASET_MANIFEST}) at or under {a.src}")
    for d, commit in found:
        if commit == pkg.MANIFEST:
            load_package(d)  # never upload a package that would not load
        rel = d.relative_to(a.src).as_posix()
        url = a.url.rstrip("/") + ("" if rel == "." else f"/{rel}")
        try:
            files = upload_tree(open_store(url), d, "", commit)
        except AlreadyExists:
            print(f"{url} already holds a committed artifact; not overwritten (upload to a new prefix)")
            return 2
        kind = "package" if commit == pkg.MANIFEST else "dataset"
        print(f"{kind} {d} -> {url} ({len(files)} files, {sum(f['bytes'] for f in files.values()):,} bytes)")
    return 0


if __name__ == "__main__":
    run_main(main)
