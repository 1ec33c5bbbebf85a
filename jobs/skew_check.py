"""Version-skew sensitivity check for a model family: a readiness gate before it is trusted.

  python -m jobs.skew_check --packages packages/A packages/B [...] --data DATA \\
      [--registry registry] [--k 10] [--max-relative-drop 0.2] [--split test]

DATA holds catalog/, users/ (the towers' declared columns; `seen_item_ids` masks seen items) and
interactions/SPLIT/ (user_id, item_id: the held-out interactions).

For every (query-tower version, index version) pair: Recall@K on held-out interactions and overlap@K
with the matched-version retrieval. Prints the matrix, saves JSON + a heatmap PNG into the registry
(`skew/<family>/`). Exit 0 = passed, 3 = the family failed the check (its results are still stored).
Runs the same through `ray job submit --working-dir . -- python -m jobs.skew_check ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from core.contract.towers import load_package
from core.quality import skew, skew_gate
from core.storage import datasets
from core.storage.store import Uri, location
from jobs.common import run_main


@dataclasses.dataclass(frozen=True)
class SkewConfig:
    checkpoints: tuple[Path, ...]
    data: Path
    registry: Path
    k: int
    max_relative_drop: float
    split: str


def _heatmap(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'); skipping the heatmap PNG")
        return False
    short = [v.rsplit("-", 1)[-1][:8] for v in result["versions"]]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 2.2 * len(short), 3 + 0.6 * len(short)))
    for ax, key, label in (
        (axes[0], "recall", f"Recall@{result['k']}"),
        (axes[1], "overlap", f"overlap@{result['k']} with (i, i)"),
    ):
        im = ax.imshow(result[key], cmap="viridis")
        ax.set_xticks(range(len(short)), short, rotation=45)
        ax.set_yticks(range(len(short)), short)
        ax.set_xlabel("index (item tower) version")
        ax.set_ylabel("query (user tower) version")
        ax.text(0.5, 1.03, label, transform=ax.transAxes, ha="center")
        for q, row in enumerate(result[key]):
            for i, v in enumerate(row):
                ax.text(i, q, f"{v:.3f}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.8)
    verdict = "PASSED" if result["passed"] else "FAILED"
    fig.text(0.5, 0.99, f"{result['family']}: {verdict} (max relative drop {result['max_relative_drop']})",
             ha="center", va="top")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse(argv: list[str] | None) -> SkewConfig:
    p = argparse.ArgumentParser(
        prog="python -m jobs.skew_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--packages", "--checkpoints", dest="checkpoints", type=location, nargs="+", required=True,
                   help="two or more model packages of ONE family")  # fmt: skip
    p.add_argument(
        "--data", type=location, required=True, help="a directory with catalog/, users/, interactions/SPLIT/"
    )
    p.add_argument(
        "--registry",
        type=location,
        default=Path("registry"),
        help="results go to REGISTRY/skew/<family>/ (a directory, or s3://... / gs://...)",
    )
    p.add_argument("--k", type=int, default=10)
    p.add_argument(
        "--max-relative-drop",
        type=float,
        default=0.2,
        help="largest allowed off-diagonal Recall@K drop, relative to (i, i)",
    )
    p.add_argument("--split", choices=["val", "test"], default="test")
    a = p.parse_args(argv)
    if len(a.checkpoints) < 2:
        p.error("--packages needs at least two packages")
    return SkewConfig(tuple(a.checkpoints), a.data, a.registry, a.k, a.max_relative_drop, a.split)


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    cks = [load_package(c) for c in cfg.checkpoints]
    result = skew_gate.judge(
        skew.skew_matrix(
            cks,
            datasets.read_table(cfg.data / "catalog"),
            datasets.read_table(cfg.data / "users"),
            datasets.read_table(cfg.data / f"interactions/{cfg.split}"),
            cfg.k,
        ),
        cfg.max_relative_drop,
    )
    path = skew_gate.save(cfg.registry, result)
    png = None  # beside the verdict in a local registry (object stores get the JSON only)
    if not isinstance(cfg.registry, Uri) and _heatmap(result, Path(path).with_suffix(".png")):
        png = Path(path).with_suffix(".png")
    width = max(len(v) for v in result["versions"])
    print(f"Recall@{cfg.k} (rows: query version, columns: index version); overlap@{cfg.k} in brackets")
    print(" " * width + "  " + "  ".join(v.rjust(width) for v in result["versions"]))
    for q, vq in enumerate(result["versions"]):
        cells = [
            f"{result['recall'][q][i]:.4f} [{result['overlap'][q][i]:.2f}]".rjust(width)
            for i in range(len(result["versions"]))
        ]
        print(vq.rjust(width) + "  " + "  ".join(cells))
    worst = max(p["relative_drop"] for p in result["pairs"].values())
    verdict = "PASSED" if result["passed"] else "FAILED"
    print(
        f"{verdict}: worst off-diagonal relative drop {worst:.3f} (allowed {cfg.max_relative_drop}); results: {path}"
        + (f", {png}" if png else "")
    )
    print("SKEW " + json.dumps({"passed": result["passed"], "path": str(path), "worst_relative_drop": worst}))
    return 0 if result["passed"] else 3


if __name__ == "__main__":
    run_main(main)
