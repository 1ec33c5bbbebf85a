"""How close item embedding gets to the machine's compute roof, what bounds it, and what bf16 costs.

1. roof: torch fp32 and bf16 GEMM and numpy fp32 GEMM (--gemm-n cubed) and the item MLP's own GEMM shapes, --threads threads.
2. stages: the eager MovieLens item tower (the training checkpoint the package was exported from) on
   real catalog batches split into arrow->tensors, the id/year embedding lookups, the three
   EmbeddingBags, cat, each Linear and ReLU, normalize, output table.
3. bf16: the whole catalog embedded (Embedder.items: the package's exported tower) in fp32 and under bf16 autocast (interleaved, median of --repeats),
   then retrieval recall@10 of EXACT search over the bf16 item vectors against exact search over the fp32
   ones, for the same user queries (user embeddings of a build; tie-tolerant, core.ann.index.recall_at_k).
All timings are medians of --repeats, variants interleaved.

python -m benchmarks.embed_roof --package packages/<v> --catalog data/synth-1m/catalog \
    --build /tmp/bench-reg-1m/builds/<id>
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from benchmarks.embed_plain import catalog_batches, eager_model, mlp_flops_per_item
from core.ann import index as ann
from core.rebuild.embed import Embedder, embedding_table, embeddings_to_numpy
from core.storage.build_dir import BuildDir
from core.storage.datasets import partition_files
from examples.movielens.model import TwoTower, item_inputs_from_arrow


@dataclasses.dataclass(frozen=True)
class RoofConfig:
    package: Path
    catalog: Path
    build: Path | None = None
    threads: int = 2
    batch_size: int = 8192
    gemm_n: int = 2048
    repeats: int = 5
    queries: int = 2000
    out: Path = Path("benchmarks/results/embed_roof.json")


def timeit(fn, repeats: int, inner: int = 1) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        out.append((time.perf_counter() - t0) / inner)
    return out


@torch.inference_mode()
def roof(cfg: RoofConfig, mlp: torch.nn.Sequential) -> dict:
    n = cfg.gemm_n
    a, b = torch.randn(n, n), torch.randn(n, n)
    ab, bb = a.bfloat16(), b.bfloat16()
    an, bn = a.numpy(), b.numpy()  # numpy's own BLAS (OpenBLAS): MKL may not take its best path on AMD
    shapes = [(cfg.batch_size, m.in_features, m.out_features) for m in mlp if isinstance(m, torch.nn.Linear)]
    xs = {s: (torch.randn(s[0], s[1]), torch.randn(s[2], s[1])) for s in shapes}  # x (B, in), W (out, in)
    res = defaultdict(list)
    for _ in range(cfg.repeats):  # interleaved
        res["fp32"] += timeit(lambda: a @ b, 1, 3)
        res["bf16"] += timeit(lambda: ab @ bb, 1, 3)
        res["fp32_numpy"] += timeit(lambda: an @ bn, 1, 3)
        for s, (x, w) in xs.items():
            res[f"linear {s[1]}->{s[2]} (B={s[0]})"] += timeit(lambda x=x, w=w: F.linear(x, w), 1, 10)
    out = {"gemm_n": n}
    for k, ts in res.items():
        flops = (
            2 * n**3
            if k in ("fp32", "bf16", "fp32_numpy")
            else 2 * np.prod(next(s for s in shapes if k.endswith(f"{s[1]}->{s[2]} (B={s[0]})")))
        )
        out[f"{k}_gflops"] = round(flops / statistics.median(ts) / 1e9, 1)
    return out


@torch.inference_mode()
def stages(emb: Embedder, model: TwoTower, tables: list[pa.Table], repeats: int) -> dict:
    tower, schema = model.item_tower, model.schema
    sec = defaultdict(list)
    for _ in range(repeats):
        acc = defaultdict(float)
        for table in tables:
            t = time.perf_counter()

            def lap(name, t0, acc=acc):
                now = time.perf_counter()
                acc[name] += now - t0
                return now

            x = item_inputs_from_arrow(table, schema)
            t = lap("arrow->tensors", t)
            parts = [tower.id_emb(x.id_rows), tower.year_emb(x.year_slot)]
            t = lap("id+year embedding", t)
            parts += [tower.genre_bag(x.genre_vals, x.genre_offs)]
            t = lap("genre bag", t)
            parts += [tower.title_bag(x.title_vals, x.title_offs)]
            t = lap("title bag", t)
            parts += [tower.tag_bag(x.tag_vals, x.tag_offs)]
            t = lap("tag bag", t)
            h = torch.cat(parts, dim=1)
            t = lap("cat", t)
            for i, m in enumerate(tower.mlp):
                h = m(h)
                t = lap(f"mlp[{i}] {m.__class__.__name__}", t)
            y = F.normalize(h, dim=1)
            t = lap("normalize", t)
            embedding_table(table.column("item_id").to_numpy(), y.numpy(), emb.version, "item_id")
            lap("output table", t)
        for k, v in acc.items():
            sec[k].append(v)
    med = {k: statistics.median(v) for k, v in sec.items()}
    total = sum(med.values())
    return {k: {"s": round(v, 4), "share": round(v / total, 3)} for k, v in med.items()}


@torch.inference_mode()
def embed_all(emb: Embedder, tables: list[pa.Table], bf16: bool) -> tuple[np.ndarray, np.ndarray, float]:
    emb.precision = "bf16" if bf16 else "fp32"  # the job's --precision path
    t0 = time.perf_counter()
    outs = [emb.items(t) for t in tables]
    dt = time.perf_counter() - t0
    emb.precision = "fp32"
    table = pa.concat_tables(outs)
    return table.column("item_id").to_numpy(), embeddings_to_numpy(table), dt


def bf16_check(cfg: RoofConfig, emb: Embedder, tables: list[pa.Table]) -> dict:
    times = defaultdict(list)
    for _ in range(cfg.repeats):
        for name in ("fp32", "bf16"):
            ids, x, dt = embed_all(emb, tables, name == "bf16")
            times[name].append(dt)
            if name == "fp32":
                ids32, x32 = ids, x
            else:
                ids16, x16 = ids, x
    n = len(ids32)
    out = {f"{k}_items_per_s": round(n / statistics.median(v)) for k, v in times.items()}
    out["bf16_speedup"] = round(statistics.median(times["fp32"]) / statistics.median(times["bf16"]), 3)
    assert (ids16 == ids32).all()
    cos = np.einsum("nd,nd->n", x32, x16)
    out["cosine_fp32_vs_bf16"] = {
        "min": float(cos.min()),
        "p01": float(np.percentile(cos, 1)),
        "mean": float(cos.mean()),
    }
    if cfg.build is not None:
        bd = BuildDir(cfg.build)
        users = bd.open_users(bd.read_manifest())[1]  # (U, D)
        rng = np.random.default_rng(1)
        xq = np.ascontiguousarray(users[np.sort(rng.choice(len(users), min(cfg.queries, len(users)), False))])
        exact32 = ann.exact_topk(x32, xq, 10)
        found16 = ids32[ann.exact_topk(x16, xq, 10)]  # exact search over the bf16 vectors
        out["recall_at_10_bf16_exact_vs_fp32_exact"] = round(
            ann.recall_at_k(x32, ids32, xq, found16, 10, exact32), 4
        )
        out["queries"] = len(xq)
    return out


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


def run(cfg: RoofConfig) -> dict:
    ann.configure(cfg.threads)
    emb = Embedder(cfg.package, threads=cfg.threads)
    model = eager_model(cfg.package)
    mlp = model.item_tower.mlp
    tables = list(catalog_batches(partition_files(cfg.catalog), cfg.batch_size, emb.columns("items")))
    items = sum(t.num_rows for t in tables)
    r = roof(cfg, mlp)
    flops_item = mlp_flops_per_item(mlp)
    st = stages(emb, model, tables, cfg.repeats)
    bf = bf16_check(cfg, emb, tables)
    roof_gflops = max(r["fp32_gflops"], r["fp32_numpy_gflops"])  # the best fp32 GEMM measured
    roof_items = roof_gflops * 1e9 / flops_item
    return {
        "benchmark": "embed_roof",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()},
        "items": items,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "mlp_flops_per_item": flops_item,
        "roof": r,
        "cpu_model": cpu_model(),
        "fp32_roof_gflops": roof_gflops,
        "fp32_roof_items_per_s": round(roof_items),
        "embed_fp32_fraction_of_roof": round(bf["fp32_items_per_s"] / roof_items, 3),
        "stages": st,
        "bf16": bf,
    }


def plot(result: dict, path: Path) -> None:
    """Left: the GEMM roof, each Linear layer's own GEMM and the whole tower, in GFLOP/s (the tower's
    rate counts only its MLP FLOPs, as the roof fraction does). Right: where the tower's time goes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r, bf, flops = result["roof"], result["bf16"], result["mlp_flops_per_item"]
    bars = {k[: -len("_gflops")]: v for k, v in r.items() if k.endswith("_gflops")}
    bars["tower fp32 (whole Embedder.items)"] = bf["fp32_items_per_s"] * flops / 1e9
    bars["tower bf16 autocast"] = bf["bf16_items_per_s"] * flops / 1e9
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.8))
    names = list(bars)[::-1]
    a1.barh(names, [bars[n] for n in names], color="tab:blue")
    a1.axvline(result["fp32_roof_gflops"], color="tab:red", ls="--", label="fp32 roof")
    a1.axvline(0.5 * result["fp32_roof_gflops"], color="tab:red", ls=":", label="50% of it (target)")
    a1.set(
        xlabel="GFLOP/s (median)",
        title=f"roof and tower: {result['embed_fp32_fraction_of_roof']:.1%} of roof",
    )
    a1.tick_params(axis="y", labelsize=8)
    a1.legend(fontsize=8)
    st = result["stages"]
    names = list(st)[::-1]
    a2.barh(names, [st[n]["s"] for n in names], color="tab:gray")
    a2.set(xlabel="seconds for the whole catalog (median)", title=f"tower stages, {result['items']:,} items")
    a2.tick_params(axis="y", labelsize=8)
    for a in (a1, a2):
        a.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse(argv: list[str] | None = None) -> tuple[RoofConfig, bool]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.embed_roof",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--package", "--checkpoint", dest="package", type=Path, help="model package; required unless --replot"
    )
    p.add_argument("--catalog", type=Path, help="required unless --replot")
    p.add_argument(
        "--build", type=Path, default=None, help="build dir whose user_embeddings.npy are the queries"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--gemm-n", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--out", type=Path, default=RoofConfig.out)
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from --out's JSON")
    a = p.parse_args(argv)
    if not a.replot and (a.package is None or a.catalog is None):
        p.error("--package and --catalog are required (unless --replot)")
    cfg = RoofConfig(
        a.package, a.catalog, a.build, a.threads, a.batch_size, a.gemm_n, a.repeats, a.queries, a.out
    )
    return cfg, a.replot


def main(argv: list[str] | None = None) -> int:
    cfg, replot = parse(argv)
    if replot:
        plot(json.loads(cfg.out.read_text()), cfg.out.with_suffix(".png"))
        return 0
    result = run(cfg)
    text = json.dumps(result, indent=2)
    print(text)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(text + "\n")
    plot(result, cfg.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
