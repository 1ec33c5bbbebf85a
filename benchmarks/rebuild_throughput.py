"""Item-embedding throughput: the rebuild job's Ray Data pipeline vs a plain single-process loop.

Both read the SAME catalog parquet files (item feature columns only), embed with core.embed.Embedder.items
and write the embedding table to parquet in a fresh temp directory, on the same CPU budget:
  plain      pyarrow iter_batches -> Embedder.items -> ParquetWriter, torch threads = --cpus, in a fresh
             process per run
  ray-AxT    jobs.rebuild_index._embed's pipeline: read_parquet(num_cpus=read_cpus) -> map_batches(
             EmbedBatches, ActorPoolStrategy(size=A), num_cpus=cpus_per_actor) -> sink; T torch threads
             per actor; sink "write" = ds.write_parquet (what the job does) or "iter" = ds.iter_batches.
  -nodict    parquet written with use_dictionary=["checkpoint_version"] (pyarrow's default tries a
             dictionary on the float embedding column of every row group).
  -passive   the same with OMP_WAIT_POLICY=PASSIVE in the embedding process (libgomp's default spinning
             costs 2-6x when other processes share the 2 cores).
Ray is started once in-process (ray.init(address="local", num_cpus=--cpus)) and not timed.

What is timed, per run (wall clock, seconds):
  total_s    plain: Embedder construction (checkpoint load) + loop.  ray: Dataset construction + execution,
             INCLUDING actor-pool start and checkpoint load (a pool is created per execution).
  steady_s   plain: the loop only.  ray: first batch entering any actor's __call__ -> execution end, i.e.
             without actor start (per-batch timestamps written by the actors to a side directory).
  busy_s     time inside the embedding call summed over batches (/ actors for ray): the compute part.
Every variant runs once untimed, then --repeats rounds visit all variants in turn (A B C A B C ...);
ratios are of medians measured in this one run.

python -m benchmarks.rebuild_throughput --checkpoint checkpoints/<v> --catalog data/synth-1m/catalog
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

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from core.datasets import partition_files
from core.embed import Embedder
from core.features import ITEM_FEATURE_COLUMNS
from jobs.rebuild_index import EmbedBatches


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # "plain" | "ray"
    batch_size: int
    actors: int = 1
    threads: int = 2
    cpus_per_actor: float = 1.0
    sink: str = "write"  # "write" | "iter"
    omp_wait_policy: str | None = None  # None: libgomp's default (spin, then sleep)
    dict_version_only: bool = False  # parquet dictionary encoding only for checkpoint_version


@dataclasses.dataclass(frozen=True)
class ThroughputConfig:
    checkpoint: Path
    catalog: Path
    batch_sizes: tuple[int, ...] = (8192, 32768, 65536)
    repeats: int = 5
    cpus: int = 2
    read_cpus: float = 0.25
    tmp: Path = Path(tempfile.gettempdir())
    out: Path = Path("benchmarks/results/rebuild_throughput.json")


def variants(cfg: ThroughputConfig) -> list[Variant]:
    b0, c = cfg.batch_sizes[0], cfg.cpus
    vs = [
        Variant(f"plain-b{b0}", "plain", b0, threads=c),
        Variant(f"ray-1x{c}-b{b0}", "ray", b0, 1, c, 1.0),
        Variant(f"plain-b{b0}-passive", "plain", b0, threads=c, omp_wait_policy="PASSIVE"),
        Variant(f"ray-1x{c}-b{b0}-passive", "ray", b0, 1, c, 1.0, omp_wait_policy="PASSIVE"),
        # Ray 2.60's read_parquet starts with a ListFiles task that reserves 1 whole CPU whatever
        # read_parquet(num_cpus=) says: actors holding more than cpus - 1 deadlock the pipeline
        Variant(f"ray-2x1-b{b0}", "ray", b0, 2, 1, (c - 1) / 2),
        Variant(f"ray-1x{c}-b{b0}-iter", "ray", b0, 1, c, 1.0, sink="iter"),
        Variant(f"plain-b{b0}-nodict", "plain", b0, threads=c, dict_version_only=True),
        Variant(f"ray-1x{c}-b{b0}-nodict", "ray", b0, 1, c, 1.0, dict_version_only=True),
    ]
    for b in cfg.batch_sizes[1:]:
        vs += [Variant(f"plain-b{b}", "plain", b, threads=c), Variant(f"ray-1x{c}-b{b}", "ray", b, 1, c)]
    return vs


def parquet_options(v: Variant) -> dict:
    # pyarrow tries a dictionary for every column of every row group; on the float embedding column
    # that is wasted work that dominates the write of small (8192-row) row groups
    return {"use_dictionary": ["checkpoint_version"]} if v.dict_version_only else {}


class TimedEmbedBatches(EmbedBatches):
    """The job's callable class, plus one line per batch (start, end, rows) in a side file."""

    def __init__(self, checkpoint: str, what: str, threads: int, log_dir: str):
        super().__init__(checkpoint, what, threads)
        self.log = open(os.path.join(log_dir, f"actor-{os.getpid()}.tsv"), "a", buffering=1)  # noqa: SIM115

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.time()
        out = super().__call__(batch)
        self.log.write(f"{t0}\t{time.time()}\t{out.num_rows}\n")
        return out


def run_ray(v: Variant, cfg: ThroughputConfig, files: list[Path], out: Path, log_dir: Path) -> dict:
    t0 = time.time()
    ds = ray.data.read_parquet([str(f) for f in files], num_cpus=cfg.read_cpus).select_columns(
        list(ITEM_FEATURE_COLUMNS)
    )
    ds = ds.map_batches(  # the same call as jobs.rebuild_index._embed
        TimedEmbedBatches,
        fn_constructor_kwargs={
            "checkpoint": str(cfg.checkpoint.resolve()),
            "what": "items",
            "threads": v.threads,
            "log_dir": str(log_dir),
        },
        batch_size=v.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=v.actors),
        num_cpus=v.cpus_per_actor,
        udf_modifying_row_count=False,
        runtime_env={"env_vars": {"OMP_WAIT_POLICY": v.omp_wait_policy}} if v.omp_wait_policy else None,
    )
    if v.sink == "write":
        ds.write_parquet(str(out), **parquet_options(v))
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in out.glob("*.parquet"))
    else:
        rows = sum(b.num_rows for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    t_end = time.time()
    batches = [
        tuple(map(float, line.split())) for f in log_dir.glob("*.tsv") for line in f.read_text().splitlines()
    ]
    first = min(b[0] for b in batches)
    busy = sum(b[1] - b[0] for b in batches) / v.actors
    return {
        "rows": rows,
        "total_s": t_end - t0,
        "steady_s": t_end - first,
        "busy_s": busy,
        "start_s": first - t0,
    }


def run_plain(v: Variant, cfg: ThroughputConfig, files: list[Path], out: Path) -> dict:
    t0 = time.perf_counter()
    emb = Embedder(cfg.checkpoint, threads=v.threads)
    t1 = time.perf_counter()
    rows, busy = 0, 0.0
    out.mkdir(parents=True)
    for i, f in enumerate(files):
        writer = None
        for rb in pq.ParquetFile(f).iter_batches(batch_size=v.batch_size, columns=list(ITEM_FEATURE_COLUMNS)):
            tb = time.perf_counter()
            table = emb.items(pa.Table.from_batches([rb]))
            busy += time.perf_counter() - tb
            writer = writer or pq.ParquetWriter(
                out / f"part-{i:05d}.parquet", table.schema, **parquet_options(v)
            )
            writer.write_table(table)
            rows += table.num_rows
        if writer:
            writer.close()
    t2 = time.perf_counter()
    return {"rows": rows, "total_s": t2 - t0, "steady_s": t2 - t1, "busy_s": busy, "start_s": t1 - t0}


def run_plain_isolated(v: Variant, cfg: ThroughputConfig, files: list[Path], out: Path) -> dict:
    """run_plain in a fresh process (libgomp reads OMP_WAIT_POLICY once, at load), away from the
    driver's Ray threads; the process start is not timed."""
    env = dict(os.environ)
    if v.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = v.omp_wait_policy
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(run_plain, v, cfg, files, out).result()
    finally:
        os.environ.clear()
        os.environ.update(env)


def run_once(v: Variant, cfg: ThroughputConfig, files: list[Path]) -> dict:
    work = Path(tempfile.mkdtemp(prefix="rbt-", dir=cfg.tmp))
    try:
        if v.kind == "plain":
            return run_plain_isolated(v, cfg, files, work / "out")
        (work / "log").mkdir()
        return run_ray(v, cfg, files, work / "out", work / "log")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def summarize(v: Variant, runs: list[dict], items: int) -> dict:
    med = {k: statistics.median(r[k] for r in runs) for k in ("total_s", "steady_s", "busy_s", "start_s")}
    return {
        **dataclasses.asdict(v),
        "runs": runs,
        **{f"median_{k}": round(x, 4) for k, x in med.items()},
        "items_per_s_total": round(items / med["total_s"]),
        "items_per_s_steady": round(items / med["steady_s"]),
        "items_per_s_busy": round(items / med["busy_s"]),
    }


def run(cfg: ThroughputConfig) -> dict:
    files = partition_files(cfg.catalog)
    items = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    vs = variants(cfg)
    ray.init(address="local", num_cpus=cfg.cpus, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.max_errored_blocks = 0
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    try:
        for v in vs:  # untimed warm-up: page cache, worker imports
            run_once(v, cfg, files)
        runs: dict[str, list[dict]] = {v.name: [] for v in vs}
        for r in range(cfg.repeats):
            for v in vs:
                res = run_once(v, cfg, files)
                assert res["rows"] == items, f"{v.name}: {res['rows']} rows, expected {items}"
                runs[v.name].append(res)
                print(
                    f"round {r + 1} {v.name}: total {res['total_s']:.2f}s steady {res['steady_s']:.2f}s",
                    flush=True,
                )
    finally:
        ray.shutdown()
    rows = [summarize(v, runs[v.name], items) for v in vs]
    by = {r["name"]: r for r in rows}
    ratios = {}
    for r in rows:
        if r["kind"] == "ray":
            suffix = "-passive" if r["omp_wait_policy"] else "-nodict" if r["dict_version_only"] else ""
            base = by[f"plain-b{r['batch_size']}{suffix}"]
            ratios[r["name"]] = {
                k: round(base[f"median_{k}_s"] / r[f"median_{k}_s"], 3) for k in ("total", "steady", "busy")
            }
    return {
        "benchmark": "rebuild_throughput",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()},
        "items": items,
        "partitions": len(files),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "ray_version": ray.__version__,
        "driver_torch_threads": torch.get_num_threads(),
        "ray_vs_plain_speed": ratios,  # > 1: Ray faster; target >= 0.9
        "variants": rows,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["variants"]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    x = range(len(rows))
    for off, key, label in (
        (-0.27, "total", "total (incl. actor start)"),
        (0, "steady", "steady"),
        (0.27, "busy", "embed call only"),
    ):
        ax.bar([i + off for i in x], [r[f"items_per_s_{key}"] / 1e3 for r in rows], 0.27, label=label)
    ax.set_xticks(list(x), [r["name"] for r in rows], rotation=20, fontsize=8)
    ax.set(
        ylabel="k items/s (median)",
        title=f"item embedding, {result['items']:,} items, {result['cpu_count']} CPUs",
    )
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse(argv: list[str] | None = None) -> ThroughputConfig:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.rebuild_throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--catalog", type=Path, required=True, help="catalog dataset directory")
    p.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[8192, 32768, 65536], help="first = main one"
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cpus", type=int, default=2, help="Ray num_cpus and the plain loop's torch threads")
    p.add_argument("--read-cpus", type=float, default=0.25, help="as the job's --read-cpus")
    p.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="where outputs are written")
    p.add_argument("--out", type=Path, default=ThroughputConfig.out)
    a = p.parse_args(argv)
    return ThroughputConfig(
        a.checkpoint, a.catalog, tuple(a.batch_sizes), a.repeats, a.cpus, a.read_cpus, a.tmp, a.out
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    if "OMP_WAIT_POLICY" in os.environ:
        raise SystemExit("unset OMP_WAIT_POLICY: the variants set it themselves (default vs PASSIVE)")
    result = run(cfg)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, cfg.out.with_suffix(".png"))
    for r in result["variants"]:
        print(
            f"{r['name']:>22}: total {r['items_per_s_total']:>9,} steady {r['items_per_s_steady']:>9,} "
            f"busy {r['items_per_s_busy']:>9,} items/s (actor/model start {r['median_start_s']:.2f}s)"
        )
    print("ray / plain speed (median):", json.dumps(result["ray_vs_plain_speed"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
