"""Open-loop HTTP load on POST /score: capacity and latency of broadcast on vs off vs a no-op app.

Three Serve applications run side by side in one in-process local Ray, one replica each, behind one
HTTP proxy on 127.0.0.1:
  on    serve_app.app:build_app with broadcast=True   (route /on)
  off   serve_app.app:build_app with broadcast=False  (route /off; the per-row reference)
  noop  benchmarks.noop_app:build_noop_app            (route /noop; reads the body, returns a constant)
so noop's numbers are Serve's own cost (proxy + routing + replica + FastAPI dispatch) and the gap to the
real apps is the app's work (validation, batching, lookups, scoring, JSON out).

Load is open-loop: request i is sent at t0 + i/rate whatever happened to earlier ones, and its latency
runs from that SCHEDULED time to the last byte of the response (no coordinated omission: a stalled
server is charged for the requests it delayed). Bodies {"user_id": U, "item_ids": [N candidates]} are
serialized before the clock starts; U is uniform over all users of the live build, candidates uniform
(without replacement) over its items. Each point runs --warmup-s (discarded) then --duration-s measured.
503/429 (the app sheds load when its queue is full), other non-200s, client errors and time-outs
(--timeout-s) are failures; after a failed point the next waits until the app's /healthz is fast again.

A point PASSES if: achieved rate >= --min-achieved x offered (achieved = OK responses over the longer of
the schedule and the span of their completions, so a latency that grows during the point lowers it),
failures <= --max-fail-frac, p99 <= --slo-p99-ms (latency percentiles over OK responses). Offered rates lie on one geometric grid, --start-rate x
--step^k; capacity of (app, N) = the last passing rate of a ramp that steps k up until a point fails.
Round 1 ramps from k=0; later rounds start --back-steps below the previous round's capacity (walking
down if that fails). Every round also measures each (app, N) at --low-rate (unloaded latency).
Interleaved: each round visits every (N, app) in turn, the app order rotating with the round (on off
noop, then off noop on, ...); medians over --repeats rounds, every raw point kept in the JSON. After each round GET /stats of on and off gives
rows, unique users and user-table lookups (lookups per row shows what broadcast saved).

The load generator shares the machine with the proxy and the replicas (2 cores here): its CPU share is
recorded per point (driver_cpu_frac) and so is how late it sent (send_lag_p99_ms); a high noop
capacity on a small machine is bounded by this sharing, not by Serve alone. Where the time goes, per
point: CPU ms per request of the HTTP proxy, of the app's replica, of this generator and of the whole
machine (/proc), and the replica's own batch-scoring ms per request (GET /stats score_ms).

python -m benchmarks.serve_load --registry /tmp/sl-reg                       # full run, ~15 min on 2 cores
python -m benchmarks.serve_load --registry /tmp/sl-reg --repeats 1 --ns 1 100 --duration-s 1.5   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import aiohttp

from benchmarks.openloop import APPS, BODIES, LoadConfig, Runner, Workload
from benchmarks.serve_compare import aa_spread, cost_model, run_modes
from benchmarks.serve_plot import plot
from core.storage.registry import Registry
from serve_app.ingress import MODES, haproxy_pattern, ingress_env

# ---- Serve ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(cfg: LoadConfig, port: int) -> dict:
    """Start Serve on 127.0.0.1:port and run the apps; returns {app: build args} for the JSON."""
    from ray import serve

    from benchmarks.noop_app import build_noop_app
    from serve_app.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    real = {
        "registry": str(cfg.registry.resolve()),
        "max_candidates": max(2000, *cfg.ns),
        **dict(cfg.app_args),
    }
    args = {"on": {**real, "broadcast": True}, "off": {**real, "broadcast": False}, "noop": {},
            "on_b": {**real, "broadcast": True}}  # fmt: skip
    for app in cfg.apps:
        target = build_noop_app(args[app]) if app == "noop" else build_app(args[app])
        serve.run(target, name=app, route_prefix=f"/{app}")
        print(f"deployed {app} at /{app} with {args[app]}", flush=True)
    return {app: args[app] for app in cfg.apps}


async def wait_ready(runner: Runner, apps: tuple[str, ...], ns: tuple[int, ...], timeout_s: float) -> None:
    """Every app answers /healthz through the proxy, then one /score per N has the right shape."""
    deadline = time.monotonic() + timeout_s
    for app in apps:
        while True:
            try:
                await runner.get_json(f"/{app}/healthz")
                break
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{app}: /healthz not 200 after {timeout_s:.0f}s: {e}") from None
                await asyncio.sleep(0.5)
    for app in apps:
        for n in ns:
            body = runner.workload.bodies(1, n)[0]
            async with runner.session.post(
                f"{runner.base}/{app}/score", data=body, headers=runner.workload.headers
            ) as r:
                text = await r.text()
                if r.status != 200:
                    raise SystemExit(f"{app}: POST /score with N={n} answered {r.status}: {text[:300]}")
                got = len(json.loads(text)["scores"])
                if app != "noop" and got != n:
                    raise SystemExit(f"{app}: POST /score with N={n}: expected {n} scores, got {got}")


# ---- the run ----------------------------------------------------------------------------------------


def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else None


def _stats_delta(now: dict, before: dict | None) -> dict:
    keys = ("batches", "rows", "unique_users", "user_lookups")
    d = {k: now.get(k, 0) - (before or {}).get(k, 0) for k in keys}
    d["lookups_per_row"] = round(d["user_lookups"] / d["rows"], 5) if d["rows"] else None
    d["rows_per_batch"] = round(d["rows"] / d["batches"], 2) if d["batches"] else None
    return {"cumulative": now, "this_round": d}


async def measure(cfg: LoadConfig, base: str, workload: Workload) -> list[dict]:
    connector = aiohttp.TCPConnector(limit=10_000, limit_per_host=10_000)
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        runner = Runner(cfg, base, workload, session)
        await wait_ready(runner, cfg.apps, cfg.ns, cfg.ready_timeout_s)
        rounds, prev_k, prev_stats = [], {}, {}
        for r in range(cfg.repeats):
            print(f"round {r + 1}/{cfg.repeats}", flush=True)
            configs = []
            for n in cfg.ns:
                # the app order rotates with the round, so no app is always measured first in its N block
                for app in cfg.apps[r % len(cfg.apps) :] + cfg.apps[: r % len(cfg.apps)]:
                    unloaded = await runner.point(app, n, cfg.low_rate, cfg.low_duration_s, "unloaded")
                    k0 = prev_k[(app, n)] - cfg.back_steps if prev_k.get((app, n)) is not None else 0
                    # The unloaded point doubles as grid step 0 when --low-rate == --start-rate.
                    known = {0: unloaded} if math.isclose(cfg.low_rate, cfg.rate(0)) else {}
                    res = await runner.ramp(app, n, k0, known)
                    prev_k[(app, n)] = res["capacity_k"]
                    configs.append({"app": app, "n": n, "unloaded": unloaded, **res})
                    print(
                        f"  => {app} N={n}: capacity {res['capacity_rps']:.1f} req/s = "
                        f"{res['capacity_cps']:.0f} candidates/s",
                        flush=True,
                    )
            stats = {}
            for app in cfg.apps:
                if app != "noop":
                    now = await runner.get_json(f"/{app}/stats")
                    stats[app] = _stats_delta(now, prev_stats.get(app))
                    prev_stats[app] = now
            rounds.append({"round": r + 1, "configs": configs, "serve_stats": stats})
        return rounds


def summarize_rounds(cfg: LoadConfig, rounds: list[dict]) -> tuple[list[dict], dict]:
    by = {(c["app"], c["n"]): [] for c in rounds[0]["configs"]}
    for rd in rounds:
        for c in rd["configs"]:
            by[(c["app"], c["n"])].append(c)
    summary = []
    for (app, n), cs in by.items():
        summary.append(
            {
                "app": app,
                "n": n,
                "capacity_rps": _median([c["capacity_rps"] for c in cs]),
                "capacity_cps": _median([c["capacity_cps"] for c in cs]),
                "capacity_rps_rounds": [c["capacity_rps"] for c in cs],
                "p50_ms_at_capacity": _median([c["p50_ms_at_capacity"] for c in cs]),
                "p99_ms_at_capacity": _median([c["p99_ms_at_capacity"] for c in cs]),
                "unloaded_p50_ms": _median([c["unloaded"]["p50_ms"] for c in cs]),
                "unloaded_p99_ms": _median([c["unloaded"]["p99_ms"] for c in cs]),
                # the profile at the capacity point: CPU ms per request by process, scoring ms per request
                "cpu_ms_per_request_at_capacity": {
                    k: _median([c["cpu_ms_per_request_at_capacity"].get(k) for c in cs])
                    for k in ("proxy", "replica", "generator", "machine")
                },
                "score_ms_per_request_at_capacity": _median(
                    [c["score_ms_per_request_at_capacity"] for c in cs]
                ),
                # --low-rate above this config's capacity: its "unloaded" latency is a loaded one.
                "low_rate_above_capacity": any(cfg.low_rate > c["capacity_rps"] for c in cs),
                "hit_max_rate": any(c["hit_max_rate"] for c in cs),
            }
        )
    s = {(x["app"], x["n"]): x for x in summary}
    headline: dict = {"broadcast_capacity_ratio": {}, "noop_share_of_unloaded_p50": {}}
    for n in cfg.ns:
        if ("on", n) in s and ("off", n) in s:
            per_round = [
                round(on["capacity_rps"] / off["capacity_rps"], 3) if off["capacity_rps"] else None
                for on, off in zip(by[("on", n)], by[("off", n)], strict=True)
            ]
            off_med = s[("off", n)]["capacity_cps"]
            headline["broadcast_capacity_ratio"][str(n)] = {
                "median_of_rounds": _median(per_round),
                "of_medians": round(s[("on", n)]["capacity_cps"] / off_med, 3) if off_med else None,
                "rounds": per_round,
            }
        if ("on", n) in s and ("on_b", n) in s:
            headline.setdefault("aa_spread", {})[str(n)] = aa_spread(by[("on", n)], by[("on_b", n)])
        if ("noop", n) in s:
            headline.setdefault("cost_model", {})[str(n)] = cost_model(s, n)
            noop = s[("noop", n)]["unloaded_p50_ms"]
            headline["noop_share_of_unloaded_p50"][str(n)] = {
                app: round(noop / s[(app, n)]["unloaded_p50_ms"], 3)
                for app in ("on", "off")
                if (app, n) in s and noop and s[(app, n)]["unloaded_p50_ms"]
            }
    return summary, headline


def machine_facts() -> dict:
    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **{f"{p}_version": version(p) for p in ("torch", "ray", "faiss-cpu", "aiohttp", "uvloop", "fastapi")},
    }


def build_facts(registry: Path) -> tuple[Path, dict]:
    reg = Registry(registry)
    build_id = reg.current()
    if build_id is None:
        raise SystemExit(
            f"no live build in {registry}: expected {registry}/CURRENT naming one (publish a build)"
        )
    build_dir = reg.build_dir(build_id)
    manifest = reg.manifest(build_id)
    return build_dir, {
        "build_id": build_id,
        "checkpoint_version": manifest.checkpoint_version,
        "users": manifest.homogeneity["user_rows"],
        "items": manifest.catalog.row_count,
        "index": manifest.index.factory,
    }


def run(cfg: LoadConfig) -> dict:
    import ray
    from ray import serve

    build_dir, build = build_facts(cfg.registry)
    print(f"live build {build['build_id']}: {build['users']:,} users, {build['items']:,} items", flush=True)
    workload = Workload(build_dir, cfg.seed, cfg.body)
    port = cfg.port or free_port()
    t_start, load_start = time.time(), os.getloadavg()
    ray.init(address="local", num_cpus=cfg.ray_cpus, include_dashboard=False, log_to_driver=False)
    # Ray's own SIGTERM handler (installed by ray.init) exits at once and leaves this Ray's agents
    # behind; as KeyboardInterrupt it runs `finally` and shuts Serve and Ray down.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        apps = deploy(cfg, port)
        import uvloop

        rounds = uvloop.run(measure(cfg, f"http://127.0.0.1:{port}", workload))
    finally:
        serve.shutdown()
        ray.shutdown()
    summary, headline = summarize_rounds(cfg, rounds)
    return {
        "benchmark": "serve_load",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()},
        "machine": {**machine_facts(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "build": build,
        "apps": {app: {"route": f"/{app}", "args": args} for app, args in apps.items()},
        "wall_s": round(time.time() - t_start, 1),
        "headline": headline,
        "summary": summary,
        "rounds": rounds,
    }


def _app_arg(s: str) -> tuple[str, object]:
    key, sep, value = s.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    try:
        return key, json.loads(value)  # numbers and true/false typed, anything else a string
    except json.JSONDecodeError:
        return key, value


def parse(argv: list[str] | None = None) -> LoadConfig:
    d = LoadConfig(registry=Path())
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.serve_load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--registry", type=Path, required=True, help="registry whose CURRENT build is served")
    p.add_argument("--ns", type=int, nargs="+", default=list(d.ns), help="candidates per request")
    p.add_argument("--apps", nargs="+", choices=APPS, default=list(d.apps))
    p.add_argument("--repeats", type=int, default=d.repeats, help="interleaved rounds; medians over them")
    p.add_argument("--start-rate", type=float, default=d.start_rate, help="req/s at grid step 0")
    p.add_argument("--step", type=float, default=d.step, help="geometric factor between offered rates")
    p.add_argument("--min-rate", type=float, default=d.min_rate, help="lowest rate tried when walking down")
    p.add_argument("--max-rate", type=float, default=d.max_rate, help="highest rate tried (flagged if hit)")
    p.add_argument("--back-steps", type=int, default=d.back_steps, help="rounds 2+ start this far below")
    p.add_argument("--duration-s", type=float, default=d.duration_s, help="measured seconds per point")
    p.add_argument("--warmup-s", type=float, default=d.warmup_s, help="discarded seconds before each point")
    p.add_argument("--settle-s", type=float, default=d.settle_s, help="idle seconds between points")
    p.add_argument("--low-rate", type=float, default=d.low_rate, help="req/s of the unloaded-latency point")
    p.add_argument("--low-duration-s", type=float, default=d.low_duration_s)
    p.add_argument("--slo-p99-ms", type=float, default=d.slo_p99_ms)
    p.add_argument("--min-achieved", type=float, default=d.min_achieved, help="achieved/offered to pass")
    p.add_argument("--max-fail-frac", type=float, default=d.max_fail_frac)
    p.add_argument("--timeout-s", type=float, default=d.timeout_s, help="per-request client time-out, > SLO")
    p.add_argument(
        "--app-arg", type=_app_arg, action="append", default=[], metavar="KEY=VALUE",
        help="extra build_app argument for on and off, e.g. batch_wait_timeout_s=0.002 (repeatable)",
    )  # fmt: skip
    p.add_argument("--port", type=int, default=d.port, help="Serve HTTP port on 127.0.0.1 (0 = a free one)")
    p.add_argument("--ray-cpus", type=int, default=d.ray_cpus, help="logical CPUs of the local Ray")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out-dir", type=Path, default=d.out_dir)
    p.add_argument("--retries", type=int, default=d.retries, help="re-measure a failed point this often")
    p.add_argument("--body", choices=BODIES, default=d.body, help="request body format for every app")
    p.add_argument(
        "--ingress", nargs="+", choices=MODES, default=[d.ingress],
        help="Serve ingress mode(s) (serve_app/ingress.py); several run one after the other, each in its "
        "own process and local Ray, and a comparison is written to serve_load_ingress.json",
    )  # fmt: skip
    a = p.parse_args(argv)
    if a.step <= 1 or a.start_rate <= 0 or a.repeats < 1 or min(a.ns) < 1:
        p.error("need --step > 1, --start-rate > 0, --repeats >= 1 and every N >= 1")
    if a.timeout_s * 1e3 <= a.slo_p99_ms:
        p.error(f"--timeout-s {a.timeout_s} must exceed --slo-p99-ms {a.slo_p99_ms} ms")
    return LoadConfig(
        a.registry, tuple(a.ns), tuple(a.apps), a.repeats, a.start_rate, a.step, a.min_rate, a.max_rate,
        a.back_steps, a.duration_s, a.warmup_s, a.settle_s, a.low_rate, a.low_duration_s, a.slo_p99_ms,
        a.min_achieved, a.max_fail_frac, a.timeout_s, d.idle_latency_ms, d.drain_timeout_s,
        tuple(a.app_arg), a.port, a.ray_cpus, d.ready_timeout_s, a.seed, a.out_dir, a.retries, a.body,
        ",".join(dict.fromkeys(a.ingress)),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse(argv)
    if "," in cfg.ingress:
        return run_modes(cfg, argv)
    want = ingress_env(cfg.ingress)
    if any(os.environ.get(k) != v for k, v in want.items()):
        # the variables must be in place before this process (and the Ray it starts) imports Serve
        private = Path(tempfile.mkdtemp(prefix="shp-", dir="/tmp"))
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.serve_load", *argv],
                  {**os.environ, **ingress_env(cfg.ingress, private)})  # fmt: skip
    try:
        result = run(cfg)
    except KeyboardInterrupt:
        print("interrupted: Serve and Ray shut down, nothing written", file=sys.stderr)
        return 130
    finally:
        pattern = haproxy_pattern(dict(os.environ))
        if pattern:  # Ray's shutdown leaves HAProxy running and holding the port
            subprocess.run(["pkill", "-f", pattern], check=False)
    result["ingress"] = cfg.ingress
    result["ingress_env"] = {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    stem = cfg.out_dir / (f"serve_load_{cfg.ingress}" + ("" if cfg.body == "json" else f"_{cfg.body}"))
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, stem.with_suffix(".png"))
    print(f"\n{'app':<5} {'N':>5} {'req/s':>9} {'cand/s':>10} {'p50@cap':>8} {'p99@cap':>8} {'p50@low':>8}")
    for s in result["summary"]:
        print(
            f"{s['app']:<5} {s['n']:>5} {s['capacity_rps']:>9.1f} {s['capacity_cps']:>10.0f} "
            f"{s['p50_ms_at_capacity'] or float('nan'):>8.1f} {s['p99_ms_at_capacity'] or float('nan'):>8.1f} "
            f"{s['unloaded_p50_ms'] or float('nan'):>8.1f}"
        )
    for s in result["summary"]:
        if s["hit_max_rate"]:
            print(f"WARNING {s['app']} N={s['n']}: passed at --max-rate; its capacity is a lower bound")
        if s["low_rate_above_capacity"]:
            print(
                f"WARNING {s['app']} N={s['n']}: --low-rate exceeds its capacity; 'unloaded' latency is loaded"
            )
    print("\nCPU ms per request at capacity (proxy / replica / generator / whole machine), scoring ms:")
    for s in result["summary"]:
        c = s["cpu_ms_per_request_at_capacity"]
        print(
            f"{s['app']:<5} {s['n']:>5}  "
            + " / ".join(
                "-" if c.get(k) is None else f"{c[k]:.2f}"
                for k in ("proxy", "replica", "generator", "machine")
            )
            + f"   scoring {s['score_ms_per_request_at_capacity']}"
        )
    for n, r in result["headline"]["broadcast_capacity_ratio"].items():
        print(f"broadcast on/off capacity N={n}: {r['median_of_rounds']}x (rounds {r['rounds']})")
    for n, r in result["headline"]["noop_share_of_unloaded_p50"].items():
        print(f"no-op share of unloaded p50 N={n}: {r}")
    for n, r in result["headline"].get("aa_spread", {}).items():
        print(f"A/A (on / on_b) capacity N={n}: {r['median_of_rounds']}x (rounds {r['rounds']})")
    for n, r in result["headline"].get("cost_model", {}).items():
        print(
            f"N={n}: F {r['F_ms']} ms, T {r['T_ms']}, model gain {r.get('model_gain')}, measured {r.get('measured_gain')}"
        )
    print(f"wrote {stem}.json and {stem}.png in {result['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
