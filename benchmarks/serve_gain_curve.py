"""Broadcast's end-to-end gain against the ranker's user-side cost, at 1000 candidates per request.

For each user-side MLP (`--hidden`, e.g. none, 256, 1024,1024 (the default model), 2048,2048), trains a
MovieLens model with that `ranker_user_hidden` (1 epoch: the weights' values do not change the
cost) and exports it as a package, rebuilds it into its own registry, and runs `benchmarks.serve_load` with on / off / no-op at
N=1000 in the chosen ingress mode. Per point: the measured capacity ratio on/off, the cost model's
(F + T_off) / (F + T_on) from the same run, and the user side's MFLOP per user. The plot shows where on
this curve a user's own model sits and at what user-side cost broadcast reaches 7x.

python -m benchmarks.serve_gain_curve --ingress fast                # ~4 min per point on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from examples.movielens.model import ModelConfig


def user_side_mflop(hidden: tuple[int, ...]) -> float:
    """Multiply-adds x 2 of the user-side MLP for one user (d -> hidden... -> ranker_hidden)."""
    cfg = ModelConfig()
    dims = [cfg.embed_dim, *hidden, cfg.ranker_hidden]
    return sum(2 * a * b for a, b in zip(dims, dims[1:], strict=False)) / 1e6


def _run(*cmd: str) -> str:
    p = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd[:2])} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
        )
    return p.stdout


def point(hidden: str, a: argparse.Namespace) -> dict:
    name = "h-" + (hidden.replace(",", "x") or "linear")
    work = a.work_dir / name
    ck_root, pkg_root = work / "checkpoints", work / "packages"
    registry, out = work / "registry", work / "out"
    pkgs = sorted(pkg_root.glob("*/manifest.json")) if pkg_root.exists() else []
    if not pkgs:
        print(f"[{name}] training and exporting a model package (1 epoch)", flush=True)
        _run("examples.movielens.train", "--data", str(a.data), "--out", str(pkg_root), "--checkpoints",
             str(ck_root), "--epochs", "1", f"--ranker-user-hidden={hidden}")  # fmt: skip
        pkgs = sorted(pkg_root.glob("*/manifest.json"))
    if not (registry / "CURRENT").exists():
        print(f"[{name}] rebuilding", flush=True)
        _run("jobs.rebuild_index", "--package", str(pkgs[0].parent), "--catalog", str(a.data / "catalog"),
             "--users", str(a.data / "users"), "--registry", str(registry), "--address", "local",
             "--force-unchecked")  # fmt: skip
    print(f"[{name}] serve_load on/off/noop at N={a.n}, ingress {a.ingress}", flush=True)
    subprocess.run([sys.executable, "-m", "benchmarks.serve_load", "--registry", str(registry), "--ns", str(a.n),
                    "--apps", "on", "off", "noop", "--repeats", str(a.repeats), "--ingress", a.ingress,
                    "--step", str(a.step), "--start-rate", str(a.start_rate), "--back-steps", "2",
                    "--duration-s", "1.5", "--low-duration-s", "2", "--out-dir", str(out)], check=True)  # fmt: skip
    return summarize(hidden, json.loads((out / f"serve_load_{a.ingress}.json").read_text()), a.n)


def summarize(hidden: str, r: dict, n: int) -> dict:
    sizes = tuple(int(x) for x in hidden.split(",") if x)
    cm = r["headline"]["cost_model"][str(n)]
    ratio = r["headline"]["broadcast_capacity_ratio"][str(n)]
    return {"hidden": list(sizes), "user_side_mflop": round(user_side_mflop(sizes), 3),
            "measured_gain": ratio["median_of_rounds"], "measured_gain_rounds": ratio["rounds"],
            "model_gain": cm.get("model_gain"), "F_ms": cm["F_ms"], "T_ms": cm["T_ms"],
            "build": r["build"]["build_id"], "repeats": r["config"]["repeats"]}  # fmt: skip


def plot(points: list[dict], ingress: str, n: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = sorted(points, key=lambda p: p["user_side_mflop"])
    x = [p["user_side_mflop"] for p in pts]
    ax.plot(
        x, [p["measured_gain"] for p in pts], "o-", label="measured: capacity on / off (median of rounds)"
    )
    ax.plot(x, [p["model_gain"] for p in pts], "s--", label="model: (F + T_off) / (F + T_on), same run")
    ax.axhline(7, color="grey", ls=":", label="7x (Pinterest's published gain)")
    for p in pts:
        ax.annotate(",".join(map(str, p["hidden"])) or "linear", (p["user_side_mflop"], p["measured_gain"]),
                    textcoords="offset points", xytext=(4, -12), fontsize=8)  # fmt: skip
    ax.set(xscale="log", xlabel="ranker user-side MFLOP per user (ranker_user_hidden)",
           ylabel="broadcast gain, candidates/s", title=f"N={n} candidates per request, {ingress} ingress")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_gain_curve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--data",
        type=Path,
        default=Path("data/movielens"),
        help="output of examples.movielens.prepare movielens",
    )
    p.add_argument("--hidden", nargs="+", default=["", "256", "1024,1024", "2048,2048"],
                   help="ranker_user_hidden per point, comma-separated ('' = one linear layer)")  # fmt: skip
    p.add_argument("--n", type=int, default=1000, help="candidates per request")
    p.add_argument("--ingress", choices=("default", "fast"), default="fast")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--step", type=float, default=1.2, help="serve_load's rate grid factor")
    p.add_argument("--start-rate", type=float, default=40.0, help="serve_load's first rate, req/s")
    p.add_argument(
        "--work-dir", type=Path, default=Path("/tmp/skewless-gain"), help="checkpoints, packages, registries"
    )
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument(
        "--reuse", action="append", default=[], metavar="HIDDEN=SERVE_LOAD_JSON",
        help="take this point from an earlier serve_load result at the same N and ingress (e.g. the main "
        "run's 1024,1024=benchmarks/results/serve_load_fast.json) instead of measuring it again",
    )  # fmt: skip
    a = p.parse_args(argv)
    points = [point(h, a) for h in a.hidden]
    for spec in a.reuse:
        hidden, _, path = spec.partition("=")
        r = json.loads(Path(path).read_text())
        if r.get("ingress", "default") != a.ingress:
            raise SystemExit(f"{path} was measured with the {r.get('ingress')} ingress, not {a.ingress}")
        points.append({**summarize(hidden, r, a.n), "from": path})
    a.out_dir.mkdir(parents=True, exist_ok=True)
    out = a.out_dir / f"serve_gain_curve_{a.ingress}.json"
    out.write_text(
        json.dumps(
            {"benchmark": "serve_gain_curve", "n": a.n, "ingress": a.ingress, "points": points}, indent=2
        )
        + "\n"
    )
    plot(points, a.ingress, a.n, out.with_suffix(".png"))
    print(
        f"\n{'hidden':<12} {'MFLOP/user':>10} {'measured':>9} {'model':>7} {'F ms':>6} {'T_on':>7} {'T_off':>7}"
    )
    for q in points:
        print(f"{','.join(map(str, q['hidden'])) or 'linear':<12} {q['user_side_mflop']:>10.3f} {q['measured_gain']:>9} "
              f"{q['model_gain']:>7} {q['F_ms']:>6} {q['T_ms'].get('on'):>7} {q['T_ms'].get('off'):>7}")  # fmt: skip
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
