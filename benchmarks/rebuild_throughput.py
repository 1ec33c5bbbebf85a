"""Item-embedding throughput: the rebuild job's Ray Data pipeline vs a plain single-process loop.

Both read the SAME catalog parquet files (item feature columns only), embed with core.embed.Embedder.items
and write the same embedding table (parquet, dictionary encoding only on checkpoint_version, as the job
does) to a fresh temp directory, on the same CPU budget:
  plain-bB[-P]   pyarrow iter_batches(B rows) -> Embedder.items -> ParquetWriter, torch threads = --cpus,
                 in a fresh process per run (precision P: fp32, or bf16 autocast)
  ray-bB[-P]     jobs.rebuild_index.embed_dataset itself (read_parquet -> map_batches(EmbedBatches,
                 ActorPoolStrategy(1), num_cpus=1) -> write_parquet), 1 actor x --cpus torch threads
  plain-bB-dictall  pyarrow's default dictionary attempt on every column (what the job did before)
  plain-bB-noop, ray-bB-noop  the same pipelines with Embedder.items replaced by zero vectors of the
                 same shape: read, the output table and write are kept, the column check, the
                 Arrow -> tensor conversion (~0.1 s per 1M items, embed_roof) and the tower are
                 skipped. Each pipeline's floor: ray-noop's total is Ray Data's own fixed cost per
                 execution plus that I/O
Ray is started once in-process (ray.init(address="local", num_cpus=--cpus)) and not timed.

What is timed, per run (wall clock, seconds):
  total_s    plain: Embedder construction (checkpoint load) + loop.  ray: Dataset construction + execution,
             INCLUDING actor-pool start and checkpoint load (a pool is created per execution).
  steady_s   plain: the loop only.  ray: first batch entering the actor's __call__ -> execution end, i.e.
             without actor start (per-batch timestamps written by the actor to a side directory).
  busy_s     time inside the embedding call summed over batches: the compute part.
Every variant runs once untimed, then --repeats rounds visit all variants in turn (A B C A B C ...);
ratios are of medians measured in this one run. The item MLP's compute roof (--roof-gflops, measured by
benchmarks/embed_roof.py) turns busy time into a fraction of the roof.

python -m benchmarks.rebuild_throughput --checkpoint checkpoints/<v> --catalog data/synth-1m/catalog
"""

# ruff: noqa: E402  (the heavy imports must come after _IMPORT_T0)
from __future__ import annotations

import time

# In an actor's process this module is imported when the callable class arrives: the time before the
# heavy imports splits the actor start into process start / imports / checkpoint load (see run_ray).
_IMPORT_T0 = time.time()

import argparse
import dataclasses
import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from benchmarks.embed_plain import mlp_flops_per_item
from core.datasets import partition_files
from core.embed import Embedder, embedding_table
from core.features import ITEM_FEATURE_COLUMNS
from jobs.rebuild_index import EmbedBatches, RebuildConfig, embed_dataset


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # "plain" | "ray"
    batch_size: int
    precision: str = "fp32"
    dict_all: bool = False  # pyarrow's default: try a dictionary on every column
    noop: bool = False  # zero vectors instead of the tower: the pipeline's floor


@dataclasses.dataclass(frozen=True)
class ThroughputConfig:
    checkpoint: Path
    catalog: Path
    batch_sizes: tuple[int, ...] = (8192, 65536)
    repeats: int = 5
    cpus: int = 2
    read_cpus: float = 0.25
    only: tuple[str, ...] = ()  # variant names to run (default: all)
    roof_gflops: float | None = None
    tmp: Path = Path(tempfile.gettempdir())
    out: Path = Path("benchmarks/results/rebuild_throughput.json")
    replot: bool = False


def variants(cfg: ThroughputConfig) -> list[Variant]:
    b0 = cfg.batch_sizes[0]
    vs = [Variant(f"plain-b{b0}", "plain", b0), Variant(f"ray-b{b0}", "ray", b0)]
    vs += [Variant(f"plain-b{b0}-bf16", "plain", b0, "bf16"), Variant(f"ray-b{b0}-bf16", "ray", b0, "bf16")]
    vs.append(Variant(f"plain-b{b0}-dictall", "plain", b0, dict_all=True))
    vs += [
        Variant(f"plain-b{b0}-noop", "plain", b0, noop=True),
        Variant(f"ray-b{b0}-noop", "ray", b0, noop=True),
    ]
    for b in cfg.batch_sizes[1:]:
        vs += [Variant(f"plain-b{b}", "plain", b), Variant(f"ray-b{b}", "ray", b)]
    return [v for v in vs if not cfg.only or v.name in cfg.only]


def parquet_options(v: Variant) -> dict:
    return {} if v.dict_all else {"use_dictionary": ["checkpoint_version"]}


def zero_items(emb: Embedder, batch: pa.Table) -> pa.Table:
    """The table Embedder.items would return, with zero vectors and no tower call (noop variants)."""
    zeros = np.zeros((batch.num_rows, emb.model.cfg.embed_dim), np.float32)
    return embedding_table(batch.column("item_id").to_numpy(), zeros, emb.ckpt.version, "item_id")


class TimedEmbedBatches(EmbedBatches):
    """The job's callable class, plus one line per batch (start, end, rows) in a side file."""

    def __init__(
        self,
        checkpoint: str,
        what: str,
        threads: int,
        precision: str,
        log_dir: str,
        noop: bool,
        nice: int = 0,
    ):
        t_init = time.time()
        super().__init__(checkpoint, what, threads, precision, nice=nice)
        if noop:
            self.fn = lambda batch: zero_items(self.embedder, batch)
        with open(os.path.join(log_dir, f"init-{os.getpid()}.json"), "w") as f:
            json.dump({"import_t0": _IMPORT_T0, "init_t0": t_init, "init_t1": time.time()}, f)
        self.log = open(os.path.join(log_dir, f"actor-{os.getpid()}.tsv"), "a", buffering=1)  # noqa: SIM115

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.time()
        out = super().__call__(batch)
        self.log.write(f"{t0}\t{time.time()}\t{out.num_rows}\n")
        return out


def run_ray(v: Variant, cfg: ThroughputConfig, files: list[Path], out: Path, log_dir: Path) -> dict:
    job = RebuildConfig(
        checkpoint=cfg.checkpoint, catalog=cfg.catalog, users=None, registry=cfg.tmp, num_workers=1,
        cpus_per_worker=1.0, read_cpus=cfg.read_cpus, batch_size=v.batch_size, torch_threads=cfg.cpus,
        precision=v.precision,
    )  # fmt: skip
    t0 = time.time()
    embed_dataset(
        job,
        files,
        ITEM_FEATURE_COLUMNS,
        "items",
        out,
        TimedEmbedBatches,
        {"log_dir": str(log_dir), "noop": v.noop},
    )
    t_end = time.time()
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in out.glob("*.parquet"))
    batches = [
        tuple(map(float, line.split())) for f in log_dir.glob("*.tsv") for line in f.read_text().splitlines()
    ]
    first = min(b[0] for b in batches)
    init = json.loads(next(log_dir.glob("init-*.json")).read_text())
    return {
        "rows": rows,
        "total_s": t_end - t0,
        "steady_s": t_end - first,
        "busy_s": sum(b[1] - b[0] for b in batches),
        "start_s": first - t0,
        # where the start goes: Ray Data planning + actor scheduling + worker start (+ imports when the
        # worker is fresh), Embedder construction (checkpoint load + verify), then the first block.
        # Ray may place the actor in a worker that imported this module during an earlier execution;
        # worker_reused says so, and then no import time is inside start_to_init_s.
        "start_to_init_s": init["init_t0"] - t0,
        "worker_reused": init["import_t0"] < t0,
        "start_checkpoint_s": init["init_t1"] - init["init_t0"],
        "start_first_block_s": first - init["init_t1"],
    }


def run_plain(v: Variant, cfg: ThroughputConfig, files: list[Path], out: Path) -> dict:
    t0 = time.perf_counter()
    emb = Embedder(cfg.checkpoint, threads=cfg.cpus, precision=v.precision)
    embed = (lambda batch: zero_items(emb, batch)) if v.noop else emb.items
    t1 = time.perf_counter()
    rows, busy = 0, 0.0
    out.mkdir(parents=True)
    for i, f in enumerate(files):
        writer = None
        for rb in pq.ParquetFile(f).iter_batches(batch_size=v.batch_size, columns=list(ITEM_FEATURE_COLUMNS)):
            tb = time.perf_counter()
            table = embed(pa.Table.from_batches([rb]))
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
    """run_plain in a fresh process, away from the driver's Ray threads, with the same
    OMP_WAIT_POLICY=PASSIVE the job gives its actors; the process start is not timed."""
    env = dict(os.environ)
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
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
    keys = [k for k in runs[0] if k.endswith("_s")]
    med = {k: statistics.median(r[k] for r in runs) for k in keys}
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
        base = by.get(r["name"].replace("ray-", "plain-", 1))
        if r["kind"] == "ray" and base:
            ratios[r["name"]] = {
                k: round(base[f"median_{k}_s"] / r[f"median_{k}_s"], 3) for k in ("total", "steady", "busy")
            }
    flops = mlp_flops_per_item(Embedder(cfg.checkpoint).model.item_tower)
    if cfg.roof_gflops:
        roof_items_s = cfg.roof_gflops * 1e9 / flops
        for r in (r for r in rows if not r["noop"]):
            r["busy_fraction_of_fp32_roof"] = round(r["items_per_s_busy"] / roof_items_s, 3)
    return {
        "benchmark": "rebuild_throughput",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()},
        "items": items,
        "partitions": len(files),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "ray_version": ray.__version__,
        "driver_torch_threads": torch.get_num_threads(),
        "mlp_flops_per_item": flops,
        "fp32_roof_gflops": cfg.roof_gflops,
        "ray_vs_plain_speed": ratios,  # > 1: Ray faster; target >= 0.9
        "variants": rows,
    }


def plot(result: dict, path: Path) -> None:
    """Median seconds per variant: the start (until the first batch is embedded) and the rest, with the
    time inside the embedding call drawn within the rest. Seconds, not items/s: the no-tower variants'
    call rates are 100x the others' and would flatten the chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["variants"]
    y = list(range(len(rows)))[::-1]
    start = [r["median_start_s"] for r in rows]
    rest = [r["median_total_s"] - r["median_start_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(10, 5.2))
    ax.barh(y, start, 0.6, color="tab:gray", label="start (actor or model) until the first batch")
    ax.barh(y, rest, 0.6, left=start, color="tab:blue", label="rest of the run")
    # the embedding calls' summed time, drawn inside the part after the start where it happened
    ax.barh(y, [r["median_busy_s"] for r in rows], 0.18, left=start, color="tab:orange",
            label="of which inside the embedding call")  # fmt: skip
    ax.set_yticks(y, [r["name"] for r in rows], fontsize=8)
    ax.set(
        xlabel="seconds (median)",
        title=f"item embedding, {result['items']:,} items, {result['cpu_count']} CPUs",
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
    p.add_argument("--checkpoint", type=Path, help="required unless --replot")
    p.add_argument("--catalog", type=Path, help="catalog dataset directory; required unless --replot")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8192, 65536], help="first = main one")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cpus", type=int, default=2, help="Ray num_cpus and the torch threads of both")
    p.add_argument("--read-cpus", type=float, default=0.25, help="as the job's --read-cpus")
    p.add_argument("--only", nargs="*", default=[], help="run only these variants (names as printed)")
    p.add_argument(
        "--roof-gflops", type=float, default=None, help="fp32 GEMM roof (benchmarks.embed_roof) for busy/roof"
    )
    p.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="where outputs are written")
    p.add_argument("--out", type=Path, default=ThroughputConfig.out)
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from --out's JSON")
    a = p.parse_args(argv)
    if not a.replot and (a.checkpoint is None or a.catalog is None):
        p.error("--checkpoint and --catalog are required (unless --replot)")
    return ThroughputConfig(
        a.checkpoint, a.catalog, tuple(a.batch_sizes), a.repeats, a.cpus, a.read_cpus, tuple(a.only),
        a.roof_gflops, a.tmp, a.out, a.replot,
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
            f"{r['name']:>22}: total {r['items_per_s_total']:>9,} steady {r['items_per_s_steady']:>9,} "
            f"busy {r['items_per_s_busy']:>9,} items/s (actor/model start {r['median_start_s']:.2f}s)"
        )
    print("ray / plain speed (median):", json.dumps(result["ray_vs_plain_speed"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
