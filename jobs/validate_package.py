"""Check a model package, and that a catalog and a users dataset fit it, before any rebuild.

  python -m jobs.validate_package PACKAGE [--catalog DIR] [--users DIR] [--trial-rows 1024]

Loads the package (every file against its manifest's hashes, graphs limited to torch operators, a
trial batch through each program), then for each dataset: every partition's declared columns and
their types, and a trial batch through the tower (every value validated; outputs finite, of the
declared dimension, unit norm when the similarity is cosine). Exit 0 = fits, 2 = one line naming the
column or file and what was expected.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from core.contract.check import check_dataset
from core.contract.towers import load_package
from core.storage.datasets import partition_files
from jobs.common import run_main


@dataclasses.dataclass(frozen=True)
class ValidateConfig:
    package: Path
    catalog: Path | None = None
    users: Path | None = None
    trial_rows: int = 1024


def parse(argv: list[str] | None) -> ValidateConfig:
    p = argparse.ArgumentParser(prog="python -m jobs.validate_package", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "package", type=Path, help="model package directory (written by core.contract.write_package)"
    )
    p.add_argument(
        "--catalog", type=Path, help="catalog dataset: the item id + the item tower's declared columns"
    )
    p.add_argument(
        "--users", type=Path, help="users dataset: the user id + the user tower's declared columns"
    )
    d = ValidateConfig(Path("."))
    p.add_argument("--trial-rows", type=int, default=d.trial_rows, help="rows run through each tower")
    a = p.parse_args(argv)
    return ValidateConfig(a.package, a.catalog, a.users, a.trial_rows)


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    m = load_package(cfg.package)
    report = {"package": m.version, "embed_dim": m.dim, "similarity": m.manifest.similarity,
              "towers": sorted(m.programs)}  # fmt: skip
    print(f"package {m.version}: towers {report['towers']}, dim {m.dim}, {m.manifest.similarity}")
    for tower, path, id_col in (
        ("item", cfg.catalog, m.manifest.item_id),
        ("user", cfg.users, m.manifest.user_id),
    ):
        if path is not None:
            report[tower] = check_dataset(m, tower, partition_files(path), id_col, cfg.trial_rows)
            print(f"{tower} tower fits {path}: {report[tower]}")
    print("SUMMARY " + json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    run_main(main)
