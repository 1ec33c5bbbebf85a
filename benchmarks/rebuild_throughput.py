"""Item-embedding throughput: the rebuild job's embedding on Ray Data vs a plain single-process loop.

Both do the SAME per-partition work on the same catalog: core.rebuild.parts.embed_part over every catalog
partition (read the item feature columns in batches of B rows, core.rebuild.embed.Embedder.items, the
per-partition gates of core.rebuild.validate.check_embedded, commit parts/<key>/ids.npy, vectors.npy,
part.json) into a fresh temp parts directory, on the same CPU budget (--cpus):
  ray-bB[-P]     the job's own path: jobs.embed_data.EmbedRun (ONE Ray Data execution: map_batches of
                 PartEmbedder on an ActorPoolStrategy, each actor reserving 1 CPU) driven by
                 core.rebuild.assemble.embed_all(run, plan("items", files), ...). 1 actor x --cpus
                 torch threads
  ray-bB-wN      the same with N = --cpus actors x 1 torch thread each
  plain-bB[-P]   Embedder(package, threads=--cpus, precision=P), then embed_part(embedder, task, ...,
                 "local") for each partition in turn, in a fresh process per run (spawned, with the
                 OMP_WAIT_POLICY=PASSIVE the job gives its actors; the process start is not timed)
  ray-bB-noop, plain-bB-noop  the same with Embedder.items replaced by zero vectors of the same shape
                 (core.rebuild.embed.embedding_table): read, output table, gates and commit are kept; the
                 Arrow -> tensor conversion and the tower are skipped. ray-noop - plain-noop is Ray
                 Data's own fixed cost (planning, actor start, dispatch)
P: fp32, or bf16 autocast. Ray is started once in-process (ray.init(address="local", num_cpus=--cpus))
and not timed; after each run the next waits, untimed, until the pool's CPUs are free again.

What is timed, per run (wall clock, seconds):
  total_s    ray: embed_all over the Ray Data execution (planning, actors start, import, load and
             verify the package, embed).  plain: Embedder construction (package load and verify) + the loop.
  start_s    the first part of total_s. ray: until the first part's record arrives, less that part's
             own seconds (Ray Data does not report its actors' start apart). plain: Embedder construction.
  embed_s    the rest: total_s - start_s.
  parts_s    the part records' `seconds` summed over partitions: the time inside embed_part as the
             worker measures it (read, embed, gate; the commit after it is not in it). With N workers
             it sums N workers' time; embed_s - parts_s / N is the commits plus what dispatching the
             parts costs on top (plain: the commits alone). part_seconds keeps them
             per partition: the first part of a fresh process also pays lazy imports (pyarrow's
             to_numpy imports pandas) and the first calls' warm-up, in both variants alike.
  steady_s   from the part records: the catalog's items at the rate inside embed_part of the parts
             after each worker's first, with all N workers at that rate; without start, first-part
             warm-up, commits and dispatch. Given when there are more partitions than workers.
The plain runs record their nice value: Ray starts its workers at 15, the plain
process runs at the launcher's; equal on an idle machine, not when other work wants the same cores.
Every variant runs once untimed, then --repeats rounds visit all variants in turn (A B C A B C ...);
ratios are of medians measured in this one run. With --roof-gflops (the fp32 GEMM roof of --cpus
threads, benchmarks/embed_roof.py), the embed phase's items/s is also given as a fraction of the item
MLP's roof (its FLOPs from the eager MovieLens tower of the training checkpoint the package was
exported from).

python -m benchmarks.rebuild_throughput --package packages/<v> --catalog data/synth-1m/catalog
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch

from benchmarks.embed_plain import eager_model, mlp_flops_per_item
from core.contract.towers import load_package
from core.rebuild import parts as partmod
from core.rebuild.assemble import embed_all
from core.rebuild.build import embed_settings
from core.rebuild.embed import Embedder, embedding_table
from core.storage.datasets import partition_files
from jobs.embed_data import EmbedRun, PartEmbedder, PoolOptions


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # "plain" | "ray"
    batch_size: int
    precision: str = "fp32"
    workers: int = 1  # ray: actors in the pool (each reserving 1 CPU)
    threads: int = 0  # torch threads per actor / in the plain process; 0: --cpus
    noop: bool = False  # zero vectors instead of the tower: the pipeline's floor


@dataclasses.dataclass(frozen=True)
class ThroughputConfig:
    package: Path
    catalog: Path
    batch_sizes: tuple[int, ...] = (8192, 65536)
    repeats: int = 5
    cpus: int = 2
    only: tuple[str, ...] = ()  # variant names to run (default: all)
    roof_gflops: float | None = None
    tmp: Path = Path(tempfile.gettempdir())
    out: Path = Path("benchmarks/results/rebuild_throughput.json")
    replot: bool = False


def variants(cfg: ThroughputConfig) -> list[Variant]:
    b0 = cfg.batch_sizes[0]
    vs = [Variant(f"plain-b{b0}", "plain", b0), Variant(f"ray-b{b0}", "ray", b0)]
    if cfg.cpus > 1:
        vs.append(Variant(f"ray-b{b0}-w{cfg.cpus}", "ray", b0, workers=cfg.cpus, threads=1))
    vs += [Variant(f"plain-b{b0}-bf16", "plain", b0, "bf16"), Variant(f"ray-b{b0}-bf16", "ray", b0, "bf16")]
    vs += [
        Variant(f"plain-b{b0}-noop", "plain", b0, noop=True),
        Variant(f"ray-b{b0}-noop", "ray", b0, noop=True),
    ]
    for b in cfg.batch_sizes[1:]:
        vs += [Variant(f"plain-b{b}", "plain", b), Variant(f"ray-b{b}", "ray", b)]
    return [v for v in vs if not cfg.only or v.name in cfg.only]


def plain_counterpart(v: Variant) -> str:
    """The plain variant a ray variant is compared with: same batch size, precision and noop."""
    name = v.name.replace("ray-", "plain-", 1)
    return name.removesuffix(f"-w{v.workers}") if v.workers > 1 else name


class ZeroEmbedder:
    """What embed_part needs of an Embedder (`columns`, `items`), returning zero vectors and never
    calling the tower (noop variants)."""

    def __init__(self, emb: Embedder):
        self.version, self.columns = emb.version, emb.columns
        self.dim, self.id_name = emb.model.dim, emb.model.manifest.item_id

    def items(self, batch: pa.Table) -> pa.Table:
        zeros = np.zeros((batch.num_rows, self.dim), np.float32)
        return embedding_table(batch.column(self.id_name).to_numpy(), zeros, self.version, self.id_name)


class NoopPartEmbedder(PartEmbedder):
    """The job's embedding actor with its embedder swapped for ZeroEmbedder after the package is loaded."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.embedder = ZeroEmbedder(self.embedder)


def wait_cpus_free(cpus: int, timeout_s: float = 60.0) -> None:
    """After a run (Ray Data kills its actors when the execution ends, asynchronously): wait until their
    CPUs are back, so that the next run is not timed waiting for them."""
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < cpus and time.monotonic() < deadline:
        time.sleep(0.05)


def run_ray(v: Variant, cfg: ThroughputConfig, tasks, settings, parts: Path) -> dict:
    threads = v.threads or cfg.cpus
    opts = PoolOptions(min_workers=v.workers, max_workers=v.workers, cpus_per_worker=1.0, threads=threads,
                       wait_for_min_actors_s=120)  # fmt: skip
    run = EmbedRun(cfg.package, parts, settings, opts, NoopPartEmbedder if v.noop else None)
    first: list[float] = []

    def progress(_m):
        first.append(time.perf_counter()) if not first else None

    t0 = time.perf_counter()
    try:
        emb = embed_all(run, tasks, parts, settings, progress, lambda _n: None)
        t2 = time.perf_counter()
    finally:
        wait_cpus_free(cfg.cpus)
    assert emb.embedded == len(tasks), f"{v.name}: {emb.reused} parts reused from a fresh directory"
    recs = list(emb.records.values())
    first_rec = next(iter(emb.records.values()))
    start = first[0] - t0 - first_rec["seconds"]
    return {
        "rows": sum(r["rows"] for r in recs),
        "total_s": t2 - t0,
        "start_s": start,
        "embed_s": t2 - t0 - start,
        "parts_s": sum(r["seconds"] for r in recs),
        "part_seconds": {r["key"]: r["seconds"] for r in recs},
        "retries": run.stats["retries"],
    }


def run_plain(v: Variant, cfg: ThroughputConfig, tasks, settings, parts: Path) -> dict:
    t0 = time.perf_counter()
    emb = Embedder(cfg.package, threads=v.threads or cfg.cpus, precision=v.precision)
    embedder = ZeroEmbedder(emb) if v.noop else emb
    t1 = time.perf_counter()
    recs = [partmod.embed_part(embedder, t, parts, settings, "local") for t in tasks]
    t2 = time.perf_counter()
    return {
        "rows": sum(r["rows"] for r in recs),
        "total_s": t2 - t0,
        "start_s": t1 - t0,
        "embed_s": t2 - t1,
        "parts_s": sum(r["seconds"] for r in recs),
        "part_seconds": {r["key"]: r["seconds"] for r in recs},
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
    }


def run_plain_isolated(v: Variant, cfg: ThroughputConfig, tasks, settings, parts: Path) -> dict:
    """run_plain in a fresh process, away from the driver's Ray threads, with the same
    OMP_WAIT_POLICY=PASSIVE the job gives its actors; the process start is not timed."""
    env = dict(os.environ)
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(run_plain, v, cfg, tasks, settings, parts).result()
    finally:
        os.environ.clear()
        os.environ.update(env)


def steady_seconds(part_seconds: dict[str, float], tasks, workers: int) -> float | None:
    """The whole catalog at the rate inside embed_part of the parts after each worker's first, with
    all `workers` at that rate. Each worker's first part is one of the first `workers` tasks (the pool
    hands them out in order, one per idle worker): where lazy imports and first-call warm-up land."""
    rest = tasks[workers:]
    rows = sum(t.rows for t in rest)
    if not rows:
        return None
    per_row = sum(part_seconds[t.key] for t in rest) / rows
    return sum(t.rows for t in tasks) * per_row / workers


def run_once(v: Variant, cfg: ThroughputConfig, tasks, settings) -> dict:
    work = Path(tempfile.mkdtemp(prefix="rbt-", dir=cfg.tmp))
    try:
        run_fn = run_plain_isolated if v.kind == "plain" else run_ray
        res = run_fn(v, cfg, tasks, settings, work / "parts")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    steady = steady_seconds(res["part_seconds"], tasks, v.workers)
    return {**res, "steady_s": steady} if steady is not None else res


def summarize(v: Variant, runs: list[dict], items: int) -> dict:
    keys = [k for k in runs[0] if k.endswith("_s")]
    med = {k: statistics.median(r[k] for r in runs) for k in keys}
    return {
        **dataclasses.asdict(v),
        "runs": runs,
        **{f"median_{k}": round(x, 4) for k, x in med.items()},
        "items_per_s_total": round(items / med["total_s"]),
        "items_per_s_embed": round(items / med["embed_s"]),
        **({"items_per_s_steady": round(items / med["steady_s"])} if "steady_s" in med else {}),
        # per worker: the rate of one worker inside embed_part (before the commit)
        "items_per_s_part_per_worker": round(items / (med["parts_s"] / v.workers)),
    }


def run(cfg: ThroughputConfig) -> dict:
    files = partition_files(cfg.catalog)
    tasks = partmod.plan("items", files)
    items = sum(t.rows for t in tasks)
    vs = variants(cfg)
    if not vs:
        raise SystemExit(f"no variant matches --only {' '.join(cfg.only)}")
    m = load_package(cfg.package)
    settings = {(v.precision, v.batch_size): embed_settings(m, v.precision, v.batch_size) for v in vs}
    ray.init(address="local", num_cpus=cfg.cpus, include_dashboard=False, log_to_driver=False)
    try:
        for v in vs:  # untimed warm-up: page cache, imports' files
            run_once(v, cfg, tasks, settings[v.precision, v.batch_size])
        runs: dict[str, list[dict]] = {v.name: [] for v in vs}
        for r in range(cfg.repeats):
            for v in vs:
                res = run_once(v, cfg, tasks, settings[v.precision, v.batch_size])
                assert res["rows"] == items, f"{v.name}: {res['rows']} rows, expected {items}"
                runs[v.name].append(res)
                print(
                    f"round {r + 1} {v.name}: total {res['total_s']:.2f}s (start {res['start_s']:.2f}s, "
                    f"embed {res['embed_s']:.2f}s)",
                    flush=True,
                )
    finally:
        ray.shutdown()
    rows = [summarize(v, runs[v.name], items) for v in vs]
    by = {r["name"]: r for r in rows}
    ratios, compared = {}, {}
    for v, r in zip(vs, rows, strict=True):
        base = by.get(plain_counterpart(v))
        if v.kind == "ray" and base:
            key = f"{v.name} vs {base['name']}"
            ratios[key] = {
                k: round(base[f"median_{k}_s"] / r[f"median_{k}_s"], 3)
                for k in ("total", "embed", "steady")
                if f"median_{k}_s" in r and f"median_{k}_s" in base
            }
            compared[key] = v
    # the best ray variant that does the real work, each against its own plain counterpart
    best = max((k for k, v in compared.items() if not v.noop), key=lambda k: ratios[k]["total"], default=None)
    b0 = cfg.batch_sizes[0]
    flops = mlp_flops_per_item(eager_model(cfg.package).item_tower)
    if cfg.roof_gflops:
        roof_items_s = cfg.roof_gflops * 1e9 / flops
        for r in (r for r in rows if not r["noop"]):
            r["embed_fraction_of_fp32_roof"] = round(r["items_per_s_embed"] / roof_items_s, 3)
    return {
        "benchmark": "rebuild_throughput",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()},
        "items": items,
        "partitions": len(files),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "ray_version": ray.__version__,
        "mlp_flops_per_item": flops,
        "fp32_roof_gflops": cfg.roof_gflops,
        # throughput ratios (plain seconds / ray seconds, medians): > 1: Ray faster; target >= 0.9
        "headline": {
            "ray_vs_plain": ratios.get(f"ray-b{b0} vs plain-b{b0}"),
            "best_ray": best,
            "best_ray_vs_plain": ratios.get(best) if best else None,
        },
        "ray_vs_plain_speed": ratios,
        "variants": rows,
    }


def plot(result: dict, path: Path) -> None:
    """Median seconds per variant: the start (pool or model) and the embedding of all partitions, with
    the time inside embed_part per worker drawn within the latter. Seconds, not items/s: the no-tower
    variants' rates are many times the others' and would flatten the chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["variants"]
    y = list(range(len(rows)))[::-1]
    start = [r["median_start_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(10, 5.2))
    ax.barh(y, start, 0.6, color="tab:gray", label="start: Ray Data (plan, actors, package) / Embedder")
    ax.barh(y, [r["median_embed_s"] for r in rows], 0.6, left=start, color="tab:blue",
            label="embed all partitions")  # fmt: skip
    ax.barh(y, [r["median_parts_s"] / r["workers"] for r in rows], 0.18, left=start, color="tab:orange",
            label="of which in embed_part before the commit, per worker")  # fmt: skip
    ax.set_yticks(y, [r["name"] for r in rows], fontsize=8)
    ax.set(
        xlabel="seconds (median)",
        title=f"item embedding, {result['items']:,} items, {result['config']['cpus']} CPUs",
    )
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse(argv: list[str] | None = None) -> ThroughputConfig:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.rebuild_throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--package", "--checkpoint", dest="package", type=Path, help="model package; required unless --replot"
    )
    p.add_argument("--catalog", type=Path, help="catalog dataset directory; required unless --replot")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8192, 65536], help="first = main one")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cpus", type=int, default=2, help="Ray num_cpus and the torch threads of both")
    p.add_argument("--only", nargs="*", default=[], help="run only these variants (names as printed)")
    p.add_argument(
        "--roof-gflops", type=float, default=None, help="fp32 GEMM roof (benchmarks.embed_roof): embed/roof"
    )
    p.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="where outputs are written")
    p.add_argument("--out", type=Path, default=ThroughputConfig.out)
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from --out's JSON")
    a = p.parse_args(argv)
    if not a.replot and (a.package is None or a.catalog is None):
        p.error("--package and --catalog are required (unless --replot)")
    return ThroughputConfig(
        a.package, a.catalog, tuple(a.batch_sizes), a.repeats, a.cpus, tuple(a.only), a.roof_gflops,
        a.tmp, a.out, a.replot,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    if cfg.replot:
        plot(json.loads(cfg.out.read_text()), cfg.out.with_suffix(".png"))
        return 0
    result = run(cfg)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, cfg.out.with_suffix(".png"))
    for r in result["variants"]:
        print(
            f"{r['name']:>18}: total {r['median_total_s']:7.2f}s {r['items_per_s_total']:>9,} items/s, "
            f"embed {r['items_per_s_embed']:>9,} steady {r.get('items_per_s_steady', 0):>9,} items/s "
            f"(start {r['median_start_s']:.2f}s)"
        )
    print("ray / plain speed (median):", json.dumps(result["ray_vs_plain_speed"]))
    h = result["headline"]
    print(f"headline: ray-b{cfg.batch_sizes[0]} vs plain: {h['ray_vs_plain']}; best ray {h['best_ray']}: "
          f"{h['best_ray_vs_plain']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
