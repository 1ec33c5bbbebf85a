"""Item-embedding throughput of a plain single-process loop (no Ray): the baseline for the rebuild job.

Reads the catalog partitions with pyarrow in record batches, embeds each with `core.rebuild.embed.Embedder.items`
(the package's exported item tower) and times "read" (parquet -> Arrow) apart from "embed" (Arrow ->
validated arrays -> item tower -> Arrow). After one untimed warm-up pass and --repeats timed passes it
runs two diagnostics: one pass split into stages (prep: Arrow -> validated tensors, h2d, tower, out: d2h
+ output table), and the item tower's MLP alone on random input, the compute ceiling. FLOPs count only
the MLP's Linear layers (2 * in * out per item). The MLP diagnostics take the eager MovieLens tower from
the training checkpoint the package was exported from (its manifest's metadata names it).

python -m benchmarks.embed_plain --package packages/<version> --catalog data/synth-1m/catalog \
    --device cpu --threads 2 --dtype fp32 --out benchmarks/results/embed_plain_cpu_fp32.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from core.contract import encode
from core.rebuild.embed import Embedder, embedding_table
from core.storage.datasets import partition_files
from examples.movielens.checkpoint import load_checkpoint
from examples.movielens.model import TwoTower
from examples.movielens.train import checkpoint_of


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    package: Path
    catalog: Path
    device: str = "cpu"
    threads: int | None = None
    batch_size: int = 8192
    repeats: int = 5
    dtype: str = "fp32"
    out: Path | None = None


def autocast_factory(device: torch.device, dtype: str) -> Callable[[], contextlib.AbstractContextManager]:
    if dtype == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def mlp_flops_per_item(mlp: nn.Module) -> int:
    return sum(2 * m.in_features * m.out_features for m in mlp.modules() if isinstance(m, nn.Linear))


def eager_model(package: Path, checkpoints: Path = Path("checkpoints")) -> TwoTower:
    """The eager MovieLens TwoTower a package was exported from (its training checkpoint, found by the
    package's metadata), for the diagnostics that look inside the tower."""
    return load_checkpoint(checkpoint_of(package, checkpoints)).model


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def catalog_batches(files: list[Path], batch_size: int, columns: list[str]) -> Iterator[pa.Table]:
    for f in files:
        for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns):
            yield pa.Table.from_batches([rb])


def timed_pass(files: list[Path], emb: Embedder, cfg: BenchConfig, autocast) -> tuple[int, float, float]:
    """One pass over the catalog -> (rows embedded, read seconds, embed seconds)."""
    rows, read_s, embed_s = 0, 0.0, 0.0
    batches = catalog_batches(files, cfg.batch_size, emb.columns("items"))
    while True:
        t0 = time.perf_counter()
        table = next(batches, None)
        t1 = time.perf_counter()
        read_s += t1 - t0
        if table is None:
            return rows, read_s, embed_s
        with autocast():
            out = emb.items(table)
        embed_s += time.perf_counter() - t1
        rows += out.num_rows


@torch.inference_mode()
def stage_breakdown(tables: list[pa.Table], emb: Embedder, autocast) -> dict[str, float]:
    """Embedder.items split into its stages, with a device sync after each (one pass, seconds)."""
    stages = dict.fromkeys(("prep", "h2d", "tower", "out"), 0.0)
    specs, id_name = emb.model.item_inputs, emb.model.manifest.item_id
    for table in tables:
        t0 = time.perf_counter()
        x = encode.to_tensors(encode.table_arrays(table, specs, "catalog batch"))
        t1 = time.perf_counter()
        x = {k: v.to(emb.device) for k, v in x.items()}
        sync(emb.device)
        t2 = time.perf_counter()
        with autocast():
            y = emb.model.call("item", **x)
        sync(emb.device)
        t3 = time.perf_counter()
        embedding_table(table.column(id_name).to_numpy(), y.float().cpu().numpy(), emb.version, id_name)
        t4 = time.perf_counter()
        for k, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            stages[k] += dt
    return stages


@torch.inference_mode()
def mlp_only(mlp: nn.Module, emb: Embedder, cfg: BenchConfig, items: int, autocast) -> list[float]:
    """The item MLP alone on random device-resident input, same item count and batch size (seconds)."""
    mlp = mlp.to(emb.device)
    x = torch.randn(cfg.batch_size, mlp[0].in_features, device=emb.device)
    n_batches = -(-items // cfg.batch_size)
    times = []
    for i in range(cfg.repeats + 1):  # the first is warm-up
        sync(emb.device)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            with autocast():
                mlp(x)
        sync(emb.device)
        if i:
            times.append(time.perf_counter() - t0)
    return times


def run(cfg: BenchConfig) -> dict:
    files = partition_files(cfg.catalog)
    emb = Embedder(cfg.package, device=cfg.device, threads=cfg.threads)
    autocast = autocast_factory(emb.device, cfg.dtype)
    mlp = eager_model(cfg.package).item_tower.mlp
    flops_per_item = mlp_flops_per_item(mlp)

    t0 = time.perf_counter()
    items, _, _ = timed_pass(files, emb, cfg, autocast)
    warmup_s = time.perf_counter() - t0
    reads, embeds = [], []
    for _ in range(cfg.repeats):
        n, read_s, embed_s = timed_pass(files, emb, cfg, autocast)
        assert n == items, f"pass embedded {n} rows, warm-up {items}"
        reads.append(read_s)
        embeds.append(embed_s)
    totals = [r + e for r, e in zip(reads, embeds, strict=True)]
    stages = stage_breakdown(
        list(catalog_batches(files, cfg.batch_size, emb.columns("items"))), emb, autocast
    )
    mlp_times = mlp_only(mlp, emb, cfg, items, autocast)

    med, med_embed, med_mlp = (
        statistics.median(totals),
        statistics.median(embeds),
        statistics.median(mlp_times),
    )
    gflop = flops_per_item * items / 1e9
    return {
        "benchmark": "embed_plain",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()},
        "package_version": emb.version,
        "items": items,
        "partitions": len(files),
        "device": str(emb.device),
        "device_name": device_name(emb.device),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "pyarrow_version": pa.__version__,
        "torch_threads": torch.get_num_threads(),
        "dtype": cfg.dtype,
        "warmup_s": warmup_s,
        "repeat_times_s": totals,
        "read_times_s": reads,
        "embed_times_s": embeds,
        "median_s": med,
        "median_read_s": statistics.median(reads),
        "median_embed_s": med_embed,
        "items_per_s": items / med,
        "embed_items_per_s": items / med_embed,
        "mlp_flops_per_item": flops_per_item,
        "mlp_gflops_per_s": gflop / med,
        "mlp_gflops_per_s_embed_only": gflop / med_embed,
        "stage_breakdown_s": stages,
        "mlp_only_times_s": mlp_times,
        "mlp_only_items_per_s": items / med_mlp,
        "mlp_only_gflops_per_s": gflop / med_mlp,
    }


def parse(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(prog="python -m benchmarks.embed_plain", description=__doc__)
    p.add_argument(
        "--package", "--checkpoint", dest="package", type=Path, required=True,
        help="model package directory (examples.movielens.train)",
    )  # fmt: skip
    p.add_argument("--catalog", type=Path, required=True, help="catalog dataset dir with part-*.parquet")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: item tower under autocast"
    )
    p.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    a = p.parse_args(argv)
    if a.batch_size < 1 or a.repeats < 1:
        p.error("--batch-size and --repeats must be >= 1")
    return BenchConfig(a.package, a.catalog, a.device, a.threads, a.batch_size, a.repeats, a.dtype, a.out)


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    result = run(cfg)
    text = json.dumps(result, indent=2)
    print(text)
    if cfg.out:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
