"""Serving latency while a rebuild shares the serving node's cores, and what the rebuild's --nice buys.

One in-process local Ray (ray.init(num_cpus=--ray-cpus)) serves serve_app.app:build_app, one replica,
on the live build of --registry, behind Serve's HTTP proxy on 127.0.0.1. Each repeat visits every
variant in turn, the order rotating with the repeat (baseline nice0 nice19, then nice0 nice19
baseline, ...):
  baseline   no rebuild: the load alone for --duration-s
  niceN      `python -m jobs.rebuild_index --nice N --force-unchecked --address <THIS cluster's GCS>`
             as a subprocess, into a fresh scratch COPY of --registry (so the serving app's registry is
             never swapped mid-measurement; the copy is removed afterwards), on the same Ray cluster as
             serving, so its actors, its Ray Data tasks and its driver share the cores with the replica
             and the proxy as a rebuild on a serving node does
Load is open-loop at --rate req/s on POST /score (benchmarks/openloop.py: latency from each request's
SCHEDULED send time, so a stalled server is charged for the requests it delayed), bodies
{"user_id": U, "item_ids": [--candidates ids]} drawn from the live build's users and items like
benchmarks/serve_load.py, one pool cycled in the same order in every window. The load starts
--warmup-s before the window (discarded); the window is the rebuild's life, from its start until the
process exits (baseline: --duration-s). Per window: latency p50/p90/p99/max over OK responses, failed
fraction (non-200s, client errors, time-outs after --timeout-s), the rebuild's wall time and exit
code, latency by rebuild phase (the phases are cut at lines the rebuild prints: driver ready, each
Ray Data execution start/finish, published), a 1 s latency timeline, and CPU seconds by process of
this Ray cluster sampled from /proc once a second (replica, proxy, embedding actors, other Ray
workers such as Ray Data's read/write tasks, the rebuild driver (exact, from wait4), this load
generator, the whole machine) with the nice values seen. The rebuild's --nice lowers the priority of
its embedding actors and its driver only (the driver after its imports and ray.init). Note that
Ray's raylet starts EVERY worker at nice 15 (RAY_worker_niceness, default 15): the serving replica,
the proxy, the Ray Data read/write tasks and the embedding actors, while the rebuild's driver runs at
this process's nice (0 here; `ray job submit` also runs drivers at 0). So a nice-0 driver outweighs
the replica ~28x (kernel weights 1024 vs 36), and --nice 19 moves the actors from 15 to 19 only
(36 vs 15, ~2.4x). `nice_seen` of each group records the values actually seen.

Unless --no-warmup-rebuild, one rebuild runs first under the same load, untimed: the first Ray Data
job on a cluster also starts Ray Data's own long-lived actors and Ray's worker processes, which would
charge whichever variant happened to come first. Results: medians over repeats per variant, every raw
window kept, and ratios to the baseline of the SAME repeat (median of the per-repeat ratios).
Outputs --out (JSON), the PNG next to it and a table; `--replot JSON` redraws the PNG from a JSON.
Logs of every rebuild stay in the scratch directory (printed at the end).

python -m benchmarks.serve_during_rebuild --registry /tmp/sdr-reg \\
    --package packages/ml-two-tower-XXXX --catalog data/movielens/catalog --repeats 5
python -m benchmarks.serve_during_rebuild --replot benchmarks/results/serve_during_rebuild.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import numpy as np

from benchmarks.openloop import _CLK, LoadConfig, Runner, Workload, _machine_busy_s, _send, summarize
from benchmarks.serve_load import _app_arg, build_facts, free_port, machine_facts, wait_ready
from core.storage.registry import Registry

APP = "live"  # Serve application name and route prefix
REPO = Path(__file__).resolve().parents[1]
# Lines of the rebuild's output that cut its life into phases: (marker name, regex). A regex that
# matches again names its k-th match name<k> (the items dataset, then the users one).
MARKERS = (
    (
        "driver_ready",
        re.compile(r"^rebuild \S+: (?:checkpoint|package)"),
    ),  # imports + preflight done; ray.init next
    ("data_start", re.compile(r"Starting execution of Dataset")),
    ("data_done", re.compile(r"execution finished in", re.IGNORECASE)),
    ("published", re.compile(r"^published ")),
)


@dataclasses.dataclass(frozen=True)
class Config:
    registry: Path
    package: Path
    catalog: Path
    users: Path | None = None  # None: the job's own default (CATALOG/../users if present)
    rate: float = 50.0  # req/s, open loop
    candidates: int = 100  # item ids per request
    nice: tuple[int, ...] = (0, 19)  # one rebuild variant per value
    repeats: int = 3
    duration_s: float = 20.0  # the baseline window (about one MovieLens rebuild on 2 cores)
    warmup_s: float = 3.0  # load before each window, discarded
    settle_s: float = 5.0  # idle seconds after a window (and after the app drained)
    warmup_rebuild: bool = True
    max_rebuild_s: float = 900.0  # the job's --timeout-s; killed 60 s later if still running
    timeout_s: float = 30.0  # per request: a time-out is a failure
    slo_p99_ms: float = 500.0  # only for the within_slo flag of each window
    pool: int = 3000  # distinct request bodies, cycled
    rebuild_args: tuple[str, ...] = ()  # extra jobs.rebuild_index arguments
    app_args: tuple[tuple[str, object], ...] = ()  # extra build_app arguments
    ray_cpus: int = 4  # logical CPUs: the replica reserves 1, the rebuild 1 per actor + reads
    port: int = 0
    seed: int = 0
    scratch: Path | None = None  # None: a new temp directory
    out: Path = Path("benchmarks/results/serve_during_rebuild.json")

    def variants(self) -> list[str]:
        return ["baseline"] + [f"nice{n}" for n in self.nice]


def load_config(cfg: Config) -> LoadConfig:
    """The openloop/serve_load pieces read their settings from a LoadConfig."""
    return LoadConfig(
        registry=cfg.registry, ns=(cfg.candidates,), apps=(APP,), repeats=cfg.repeats,
        duration_s=cfg.duration_s, warmup_s=cfg.warmup_s, settle_s=0.0, slo_p99_ms=cfg.slo_p99_ms,
        timeout_s=cfg.timeout_s, drain_timeout_s=120.0, ray_cpus=cfg.ray_cpus, seed=cfg.seed,
    )  # fmt: skip


# ---- the load: open loop until told to stop ------------------------------------------------------


class OpenLoop:
    """benchmarks.openloop.open_loop with an end decided while it runs: request i is sent at
    t0 + i/rate until a request would be scheduled at or after `stop_at` (perf_counter seconds)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, bodies: list[bytes], rate: float, cap: int):
        self.session, self.url, self.bodies, self.rate = session, url, bodies, rate
        self.sched, self.sent = np.full(cap, np.nan), np.full(cap, np.nan)
        self.done, self.status = np.full(cap, np.nan), np.zeros(cap, dtype=np.int64)
        self.n, self.stop_at, self.truncated = 0, math.inf, False

    async def run(self) -> None:
        cap = len(self.sched)
        self.sched[:] = time.perf_counter() + 0.01 + np.arange(cap) / self.rate
        tasks, i = [], 0
        while i < cap and self.sched[i] < self.stop_at:
            now = time.perf_counter()
            while i < cap and self.sched[i] <= now and self.sched[i] < self.stop_at:
                self.sent[i] = now
                body = self.bodies[i % len(self.bodies)]
                tasks.append(
                    asyncio.create_task(_send(self.session, self.url, body, i, self.done, self.status))
                )
                i += 1
            self.n = i
            if i < cap:
                await asyncio.sleep(max(0.0, self.sched[i] - time.perf_counter()))
        self.truncated = i == cap and self.stop_at == math.inf
        await asyncio.gather(*tasks)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        n = self.n
        return self.sched[:n], self.sent[:n], self.done[:n], self.status[:n]


def _pct(x: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(x, q)), 3) if len(x) else None


def latency_stats(lat_ms: np.ndarray, ok: np.ndarray) -> dict:
    good = lat_ms[ok]
    return {
        "requests": int(len(ok)),
        "failed": int((~ok).sum()),
        "p50_ms": _pct(good, 50),
        "p99_ms": _pct(good, 99),
        "max_ms": round(float(good.max()), 3) if len(good) else None,
    }


def timeline(t: np.ndarray, lat_ms: np.ndarray, ok: np.ndarray, bin_s: float = 1.0) -> list[list]:
    """[t_start_s, requests, failed, p50_ms, p99_ms, max_ms] per bin of scheduled time (t from the
    window's start; the warm-up has t < 0)."""
    if not len(t):
        return []
    b = np.floor(t / bin_s).astype(np.int64)
    out = []
    for k in range(int(b.min()), int(b.max()) + 1):
        m = b == k
        if m.any():
            s = latency_stats(lat_ms[m], ok[m])
            out.append([k * bin_s, s["requests"], s["failed"], s["p50_ms"], s["p99_ms"], s["max_ms"]])
    return out


def phase_stats(t: np.ndarray, lat_ms: np.ndarray, ok: np.ndarray, markers: dict, end_s: float) -> list[dict]:
    """Latency of the requests scheduled between consecutive markers (start, markers..., exit)."""
    cuts = [("start", 0.0)] + sorted(markers.items(), key=lambda kv: kv[1]) + [("exit", end_s)]
    out = []
    for (a, ta), (b, tb) in itertools.pairwise(cuts):
        m = (t >= ta) & (t < tb)
        out.append(
            {
                "phase": f"{a}->{b}",
                "from_s": round(ta, 3),
                "to_s": round(tb, 3),
                **latency_stats(lat_ms[m], ok[m]),
            }
        )
    return out


# ---- where the CPU goes: this cluster's processes, from /proc ---------------------------------------


def _stat(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()  # [0] = state (field 3), so field k = [k - 3]
    except OSError:
        return None


def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def find_raylet(gcs_address: str) -> int | None:
    """The raylet of THIS cluster (others may run on the machine): its command line names our GCS."""
    for d in Path("/proc").glob("[0-9]*"):
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"raylet") and f"--gcs-address={gcs_address}".encode() in argv:
            return int(d.name)
    return None


def classify(title: str) -> str:
    if title.startswith(f"ray::ServeReplica:{APP}:"):
        return "replica"
    if title.startswith("ray::ProxyActor"):
        return "proxy"
    if "PartEmbedder" in title or "AssemblyWorker" in title:  # the rebuild's embedding and assembly actors
        return "embed_actors"
    return "other_ray"  # Serve's controller, idle workers, other tasks


class CpuSampler:
    """CPU seconds of the raylet's children (Ray's workers: replica, proxy, actors, tasks) by group, plus
    extra pids (the rebuild driver). Processes alive at the first sample count from there, later ones
    from their start; CPU a process used between its last sample and its exit is missed."""

    GROUPS = ("replica", "proxy", "embed_actors", "other_ray", "rebuild_driver")

    def __init__(self, raylet: int | None):
        self.raylet, self.extra = raylet, {}
        self.last: dict[int, float] = {}
        self.cpu = collections.defaultdict(float)
        self.by_title = collections.defaultdict(float)
        self.nice = collections.defaultdict(set)
        self.samples = 0
        self.t0 = self.t1 = time.perf_counter()
        self.gen0 = self.gen1 = time.process_time()
        self.mach0 = self.mach1 = _machine_busy_s()

    def sample(self) -> None:
        first = self.samples == 0
        for d in os.scandir("/proc"):
            if not d.name.isdigit():
                continue
            pid = int(d.name)
            f = _stat(pid)
            if f is None:
                continue
            if pid in self.extra:
                group = title = self.extra[pid]
            elif self.raylet is not None and int(f[1]) == self.raylet:
                title = _title(pid)
                group = classify(title)
            else:
                continue
            cpu = (int(f[11]) + int(f[12])) / _CLK
            delta = cpu - self.last.get(pid, cpu if first else 0.0)
            self.last[pid] = cpu
            self.cpu[group] += delta
            self.by_title[re.sub(r"\d+", "N", title)[:80]] += delta
            self.nice[group].add(int(f[16]))
        self.samples += 1
        self.t1, self.gen1, self.mach1 = time.perf_counter(), time.process_time(), _machine_busy_s()

    def result(self, exact: dict[str, float] | None = None) -> dict:
        wall = max(1e-9, self.t1 - self.t0)
        cpu = {g: round(self.cpu.get(g, 0.0), 3) for g in self.GROUPS}
        cpu.update({k: round(v, 3) for k, v in (exact or {}).items()})
        cpu["generator"] = round(self.gen1 - self.gen0, 3)
        cpu["machine"] = round(self.mach1 - self.mach0, 3) if None not in (self.mach0, self.mach1) else None
        top = sorted(self.by_title.items(), key=lambda kv: -kv[1])[:8]
        return {
            "wall_s": round(wall, 3),
            "cpu_s": cpu,
            "cores": {g: None if v is None else round(v / wall, 3) for g, v in cpu.items()},
            "nice_seen": {g: sorted(v) for g, v in self.nice.items()},
            "top_titles_cpu_s": {t: round(v, 3) for t, v in top},
            "raylet_found": self.raylet is not None,
        }


# ---- the rebuild subprocess ---------------------------------------------------------------------------


class Rebuild:
    """jobs.rebuild_index as a child process: its output, time-stamped, goes to a log file; markers and
    the SUMMARY line are picked up as they come; its exit is reaped with wait4 (exact CPU time)."""

    def __init__(self, cfg: Config, nice: int, registry: Path, gcs: str, log_path: Path):
        self.argv = [
            sys.executable, "-m", "jobs.rebuild_index",
            "--package", str(cfg.package.resolve()), "--catalog", str(cfg.catalog.resolve()),
            *(["--users", str(cfg.users.resolve())] if cfg.users else []),
            "--registry", str(registry), "--address", gcs, "--nice", str(nice), "--force-unchecked",
            "--timeout-s", f"{cfg.max_rebuild_s:g}", *cfg.rebuild_args,
        ]  # fmt: skip
        self.log_path, self.markers, self.summary, self.tail = (
            log_path,
            {},
            None,
            collections.deque(maxlen=15),
        )
        self.proc: subprocess.Popen | None = None
        self.pump: threading.Thread | None = None
        self.t0 = 0.0

    def start(self, t0: float) -> int:
        """Start the job; its marker times count from t0 (perf_counter), the window's start."""
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
        self.t0 = t0
        self.proc = subprocess.Popen(
            self.argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace",
        )  # fmt: skip
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()
        return self.proc.pid

    def _pump(self) -> None:
        seen: collections.Counter = collections.Counter()
        with open(self.log_path, "w") as log:
            log.write("$ " + shlex.join(self.argv) + "\n")
            for line in self.proc.stdout:
                t = time.perf_counter() - self.t0
                log.write(f"{t:9.3f} {line}")
                text = line.strip()
                self.tail.append(text[:300])
                for name, rx in MARKERS:
                    if rx.search(text):
                        seen[name] += 1
                        self.markers.setdefault(
                            name if seen[name] == 1 else f"{name}{seen[name]}", round(t, 3)
                        )
                if text.startswith("SUMMARY "):
                    with contextlib.suppress(json.JSONDecodeError):
                        self.summary = json.loads(text[len("SUMMARY ") :])

    async def wait(self, limit_s: float) -> tuple[int, float, float]:
        """Exit code, wall seconds, CPU seconds (user + system) of the driver; SIGTERM past limit_s."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, os.wait4, self.proc.pid, 0)
        try:
            _, status, ru = await asyncio.wait_for(asyncio.shield(fut), limit_s)
        except asyncio.TimeoutError:
            print(
                f"    rebuild still running after {limit_s:.0f}s: SIGTERM to pid {self.proc.pid}", flush=True
            )
            self.proc.terminate()
            _, status, ru = await fut
        wall = time.perf_counter() - self.t0
        self.proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        await loop.run_in_executor(None, self.pump.join, 10.0)  # its last lines (SUMMARY) are read
        return self.proc.returncode, wall, ru.ru_utime + ru.ru_stime

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()


# ---- one window ---------------------------------------------------------------------------------------


class Bench:
    def __init__(
        self, cfg: Config, runner: Runner, bodies: list[bytes], gcs: str, scratch: Path, build_id: str
    ):
        self.cfg, self.runner, self.bodies, self.gcs, self.scratch = cfg, runner, bodies, gcs, scratch
        self.lcfg, self.build_id = load_config(cfg), build_id
        self.raylet = find_raylet(gcs)
        self.rebuild: Rebuild | None = None  # the one running, for cleanup on interrupt
        if self.raylet is None:
            print(f"WARNING: no raylet with --gcs-address={gcs} in /proc: CPU by Ray process not sampled")

    async def served_build(self) -> str | None:
        return (await self.runner.get_json(f"/{APP}/version")).get("build_id")

    async def window(self, variant: str, tag: str) -> dict:
        cfg = self.cfg
        nice = None if variant == "baseline" else int(variant.removeprefix("nice"))
        reg_copy = None
        if nice is not None:
            reg_copy = self.scratch / f"registry-{tag}"
            shutil.copytree(cfg.registry, reg_copy, symlinks=True)
        before = await self.served_build()
        window_max = cfg.duration_s if nice is None else cfg.max_rebuild_s + 60
        load = OpenLoop(
            self.runner.session, f"{self.runner.base}/{APP}/score", self.bodies, cfg.rate,
            math.ceil(cfg.rate * (cfg.warmup_s + window_max)) + 2,
        )  # fmt: skip
        load_task = asyncio.create_task(load.run())
        await asyncio.sleep(cfg.warmup_s)
        sampler = CpuSampler(self.raylet)
        sampler.sample()
        t_w0 = time.perf_counter()
        ticker = asyncio.create_task(self._tick(sampler, load, t_w0))
        rb, exact, rebuild_info = None, None, None
        try:
            if nice is None:
                await asyncio.sleep(cfg.duration_s)
            else:
                rb = self.rebuild = Rebuild(
                    cfg, nice, reg_copy, self.gcs, self.scratch / f"rebuild-{tag}.log"
                )
                pid = rb.start(t_w0)
                sampler.extra[pid] = "rebuild_driver"
                print(f"    rebuild started (pid {pid}, --nice {nice}), log {rb.log_path}", flush=True)
                rc, wall, driver_cpu = await rb.wait(cfg.max_rebuild_s + 60)
                exact = {"rebuild_driver": driver_cpu}
            t_w1 = time.perf_counter()
            load.stop_at = t_w1
        finally:
            ticker.cancel()
        sampler.sample()
        cpu0, wall0 = sampler.gen0, sampler.t0
        await load_task
        sched, sent, done, status = load.arrays()
        n_warm = int(np.searchsorted(sched, t_w0))
        cpu_frac = (time.process_time() - cpu0) / max(1e-9, time.perf_counter() - wall0)
        pt = summarize(self.lcfg, cfg.rate, sched, sent, done, status, n_warm, cpu_frac)
        pt["within_slo"] = pt.pop("passed")
        pt["why_not"] = pt.pop("why_failed")
        t, lat_ms, ok = sched - t_w0, (done - sched) * 1e3, status == 200
        end_s = t_w1 - t_w0
        res = {
            "variant": variant,
            "nice": nice,
            "window_s": round(end_s, 3),
            "fail_frac": round(pt["failed"] / pt["requests"], 5) if pt["requests"] else None,
            **pt,
            "load_truncated": load.truncated,
            "cpu": sampler.result(exact),
            "timeline": timeline(t, lat_ms, ok),
        }
        if rb is not None:
            self.rebuild = None
            published = rb.summary is not None and Registry(reg_copy).current() == rb.summary["build_id"]
            rebuild_info = {
                "exit_code": rc,
                "wall_s": round(wall, 3),
                "driver_cpu_s": round(driver_cpu, 3),
                "published": published,
                "job_seconds": (rb.summary or {}).get("seconds"),  # the job's own total (after imports)
                "job_timings": (rb.summary or {}).get("timings"),
                "index": (rb.summary or {}).get("index"),
                "markers_s": rb.markers,
                "log": str(rb.log_path),
            }
            if rc != 0:
                rebuild_info["output_tail"] = list(rb.tail)
            res["rebuild"] = rebuild_info
            res["phases"] = phase_stats(t[n_warm:], lat_ms[n_warm:], ok[n_warm:], rb.markers, end_s)
            shutil.rmtree(reg_copy, ignore_errors=True)
        after = await self.served_build()
        res["served_build"] = {"before": before, "after": after, "changed": before != after}
        res["drain_s"] = await self.runner.drain(APP)
        self._print(res)
        await asyncio.sleep(cfg.settle_s)
        return res

    async def _tick(self, sampler: CpuSampler, load: OpenLoop, t_w0: float) -> None:
        """Samples CPU once a second; every 10 s a progress line (last 10 s of completed requests)."""
        k = 0
        while True:
            await asyncio.sleep(1.0)
            sampler.sample()
            k += 1
            if k % 10 == 0:
                now = time.perf_counter()
                n = load.n
                sched, done, status = load.sched[:n], load.done[:n], load.status[:n]
                recent = (sched >= now - 10) & ~np.isnan(done)
                ok = recent & (status == 200)
                p99 = _pct((done[ok] - sched[ok]) * 1e3, 99)
                phase = (
                    max(self.rebuild.markers.items(), key=lambda kv: kv[1])[0]
                    if self.rebuild and self.rebuild.markers
                    else "-"
                )
                print(
                    f"    {now - t_w0:5.0f}s: {n} sent, last 10 s: {int(recent.sum())} done, "
                    f"{int((recent & (status != 200)).sum())} failed, p99 {p99 or float('nan'):.0f} ms; "
                    f"last marker {phase}",
                    flush=True,
                )

    @staticmethod
    def _print(r: dict) -> None:
        rb = r.get("rebuild")
        c = r["cpu"]["cores"]
        print(
            f"    => {r['variant']}: {r['window_s']:.1f}s window, p50 {r['p50_ms'] or float('nan'):.1f} "
            f"p99 {r['p99_ms'] or float('nan'):.1f} max {r['max_ms'] or float('nan'):.1f} ms, "
            f"failed {r['failed']}/{r['requests']}, replica {c['replica']:.2f} cores"
            + (
                f", rebuild exit {rb['exit_code']} in {rb['wall_s']:.1f}s (embed actors {c['embed_actors']:.2f}, "
                f"other ray {c['other_ray']:.2f}, driver {c['rebuild_driver']:.2f} cores)"
                if rb
                else ""
            )
            + (" SERVED BUILD CHANGED" if r["served_build"]["changed"] else ""),
            flush=True,
        )

    async def run(self) -> dict:
        cfg, out = self.cfg, {"warmup": None, "repeats": []}
        if cfg.warmup_rebuild:
            print(f"warm-up rebuild (nice {cfg.nice[0]}, under load, not counted)", flush=True)
            out["warmup"] = await self.window(f"nice{cfg.nice[0]}", "warmup")
        vs = cfg.variants()
        for r in range(cfg.repeats):
            order = vs[r % len(vs) :] + vs[: r % len(vs)]
            print(f"repeat {r + 1}/{cfg.repeats}: {' '.join(order)}", flush=True)
            windows = []
            for v in order:
                print(f"  {v}", flush=True)
                windows.append(await self.window(v, f"r{r + 1}-{v}"))
            out["repeats"].append({"repeat": r + 1, "order": order, "windows": windows})
        return out


# ---- summary --------------------------------------------------------------------------------------------


def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else None


def summarize_repeats(cfg: Config, repeats: list[dict]) -> tuple[list[dict], dict]:
    by = {v: [] for v in cfg.variants()}
    for rp in repeats:
        for w in rp["windows"]:
            by[w["variant"]].append(w)
    summary = []
    for v, ws in by.items():
        rbs = [w.get("rebuild") or {} for w in ws]
        s = {"variant": v, "nice": ws[0]["nice"] if ws else None, "windows": len(ws)}
        for k in (
            "p50_ms",
            "p90_ms",
            "p99_ms",
            "max_ms",
            "fail_frac",
            "achieved_rps",
            "window_s",
            "send_lag_p99_ms",
        ):
            s[k] = _median([w[k] for w in ws])
            s[f"{k}_repeats"] = [w[k] for w in ws]
        s["cores"] = (
            {g: _median([w["cpu"]["cores"].get(g) for w in ws]) for g in ws[0]["cpu"]["cores"]} if ws else {}
        )
        seen = collections.defaultdict(set)
        for w in ws:
            for g, vals in w["cpu"]["nice_seen"].items():
                seen[g].update(vals)
        s["nice_seen"] = {g: sorted(vals) for g, vals in sorted(seen.items())}
        if v != "baseline":
            s["rebuild_wall_s"] = _median([r.get("wall_s") for r in rbs])
            s["rebuild_wall_s_repeats"] = [r.get("wall_s") for r in rbs]
            s["rebuild_exit_codes"] = [r.get("exit_code") for r in rbs]
            s["rebuild_driver_cpu_s"] = _median([r.get("driver_cpu_s") for r in rbs])
            phases = collections.defaultdict(list)
            for w in ws:
                for p in w.get("phases", []):
                    phases[p["phase"]].append(p)
            s["phases"] = [
                {
                    "phase": name,
                    "windows": len(ps),
                    "duration_s": _median([p["to_s"] - p["from_s"] for p in ps]),
                    "p50_ms": _median([p["p50_ms"] for p in ps]),
                    "p99_ms": _median([p["p99_ms"] for p in ps]),
                    "max_ms": _median([p["max_ms"] for p in ps]),
                }
                for name, ps in phases.items()
            ]
        summary.append(s)

    def value(w: dict | None, key: str) -> float | None:
        if w is None:
            return None
        return (w.get("rebuild") or {}).get("wall_s") if key == "rebuild_wall_s" else w.get(key)

    def ratios(key: str, num: str, den: str) -> dict:
        """num/den within each repeat (the same minutes of the machine's life), then their median."""
        per = []
        for rp in repeats:
            w = {x["variant"]: x for x in rp["windows"]}
            a, b = value(w.get(num), key), value(w.get(den), key)
            per.append(round(a / b, 3) if a is not None and b else None)
        return {"median_of_repeats": _median(per), "repeats": per}

    headline: dict = {}
    rebuilds = [v for v in cfg.variants() if v != "baseline"]
    for v in rebuilds:
        headline[f"{v}/baseline"] = {k: ratios(k, v, "baseline") for k in ("p50_ms", "p99_ms", "max_ms")}
    for v in rebuilds[1:]:
        headline[f"{v}/{rebuilds[0]}"] = {
            k: ratios(k, v, rebuilds[0]) for k in ("p50_ms", "p99_ms", "max_ms", "rebuild_wall_s")
        }
    return summary, headline


# ---- plot ---------------------------------------------------------------------------------------------------


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    names = [s["variant"] for s in summary]
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    fig, ((lat, wall), (tl, cpu)) = plt.subplots(2, 2, figsize=(14, 9))
    x = np.arange(len(names))

    def bars(ax, xs, key, width, color, label, hatch=None):
        med = [s[key] if s.get(key) is not None else np.nan for s in summary]
        reps = [[r for r in s.get(f"{key}_repeats", []) if r is not None] or [np.nan] for s in summary]
        lo = [max(0.0, m - min(r)) if not np.isnan(m) else 0 for m, r in zip(med, reps, strict=True)]
        hi = [max(0.0, max(r) - m) if not np.isnan(m) else 0 for m, r in zip(med, reps, strict=True)]
        ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, color=color, label=label, hatch=hatch, alpha=0.85)
        for xi, m in zip(xs, med, strict=True):
            if not np.isnan(m):
                ax.annotate(f"{m:.0f}", (xi, m), ha="center", va="bottom", fontsize=7)

    bars(lat, x - 0.27, "p50_ms", 0.27, "C0", "p50")
    bars(lat, x, "p99_ms", 0.27, "C3", "p99")
    bars(lat, x + 0.27, "max_ms", 0.27, "grey", "max")
    cfg = result["config"]
    lat.set(
        xticks=x, xticklabels=names, yscale="log", ylabel="latency of OK responses, ms",
        title=f"POST /score at {cfg['rate']:g} req/s, N={cfg['candidates']}, over each rebuild "
        f"(median of {cfg['repeats']}, bars min-max)",
    )  # fmt: skip
    for xi, s in zip(x, summary, strict=True):
        if s.get("fail_frac"):
            lat.annotate(f"{100 * s['fail_frac']:.1f}% failed", (xi, 1), xycoords=("data", "axes fraction"),
                         ha="center", va="top", fontsize=8, color="C3")  # fmt: skip
    lat.legend(fontsize=8)

    rb = [s for s in summary if s["variant"] != "baseline"]
    rx = np.arange(len(rb))
    med = [s.get("rebuild_wall_s") or np.nan for s in rb]
    reps = [[r for r in s.get("rebuild_wall_s_repeats", []) if r is not None] or [np.nan] for s in rb]
    err = [
        [max(0.0, m - min(r)) if not np.isnan(m) else 0 for m, r in zip(med, reps, strict=True)],
        [max(0.0, max(r) - m) if not np.isnan(m) else 0 for m, r in zip(med, reps, strict=True)],
    ]
    wall.bar(rx, med, 0.5, yerr=err, capsize=3, color=[colors[s["variant"]] for s in rb])
    for xi, m in zip(rx, med, strict=True):
        if not np.isnan(m):
            wall.annotate(f"{m:.1f}s", (xi, m), ha="center", va="bottom", fontsize=8)
    wall.set(xticks=rx, xticklabels=[s["variant"] for s in rb], ylabel="rebuild wall time, s",
             title="the rebuild's own cost: wall time, process start to exit")  # fmt: skip

    last = result["repeats"][-1]["windows"] if result["repeats"] else []
    for w in last:
        pts = [p for p in w["timeline"] if p[4] is not None]
        tl.plot(
            [p[0] for p in pts],
            [p[4] for p in pts],
            "-",
            color=colors[w["variant"]],
            label=f"{w['variant']} p99",
        )
        for name, t in ((w.get("rebuild") or {}).get("markers_s") or {}).items():
            tl.axvline(t, color=colors[w["variant"]], ls=":", lw=0.8)
            tl.annotate(name, (t, 1), xycoords=("data", "axes fraction"), rotation=90, fontsize=6,
                        va="top", color=colors[w["variant"]])  # fmt: skip
    tl.set(yscale="log", xlabel="seconds since the rebuild started (< 0: warm-up)", ylabel="p99 per 1 s, ms",
           title=f"last repeat ({result['repeats'][-1]['repeat'] if result['repeats'] else '-'}): "
           "latency timeline, dotted = rebuild output markers")  # fmt: skip
    tl.legend(fontsize=8)

    groups = ("replica", "proxy", "generator", "embed_actors", "other_ray", "rebuild_driver")
    bottom = np.zeros(len(names))
    for i, g in enumerate(groups):
        v = np.array([s["cores"].get(g) or 0.0 for s in summary])
        cpu.bar(x, v, 0.5, bottom=bottom, label=g, color=f"C{i}")
        bottom += v
    mach = [s["cores"].get("machine") for s in summary]
    cpu.plot(x, [m if m is not None else np.nan for m in mach], "k_", ms=30, mew=2, label="whole machine")
    m = result["machine"]
    cpu.axhline(m["cpu_count"], color="k", ls="--", lw=0.8)
    cpu.set(xticks=x, xticklabels=names, ylabel="cores used (CPU s / window s, median)",
            title="where the CPU went during the window (this Ray cluster's processes)")  # fmt: skip
    cpu.set_ylim(0, m["cpu_count"] * 1.35)
    cpu.legend(fontsize=7, ncol=4, loc="upper left")
    for ax in (lat, wall, tl, cpu):
        ax.grid(True, axis="y", alpha=0.3)
    b = result["build"]
    fig.suptitle(
        f"serving during a rebuild on the same node: build {b['build_id']} ({b['users']:,} users, "
        f"{b['items']:,} items), {m['cpu_count']} CPUs ({m.get('cpu_model')}), ray {m['ray_version']}, "
        f"torch {m['torch_version']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- run -----------------------------------------------------------------------------------------------------


def more_machine_facts() -> dict:
    def read(path: str) -> str | None:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return None

    cpuinfo = read("/proc/cpuinfo") or ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), None
    )
    mem = next(
        (ln.split()[1] for ln in (read("/proc/meminfo") or "").splitlines() if ln.startswith("MemTotal")),
        None,
    )
    return {
        **machine_facts(),
        "cpu_model": model,
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_gib": round(int(mem) / 2**20, 1) if mem else None,
        # with autogroup, nice only orders threads within one session's group: here all of them are
        # in this process's session (Ray and the rebuild are its children)
        "sched_autogroup_enabled": read("/proc/sys/kernel/sched_autogroup_enabled"),
        "cgroup_cpu_max": read("/sys/fs/cgroup/cpu.max"),
        "generator_nice": os.getpriority(os.PRIO_PROCESS, 0),
        "RAY_worker_niceness": os.environ.get("RAY_worker_niceness"),  # noqa: SIM112 (Ray spells it so); None: default 15
    }


async def measure(cfg: Config, base: str, workload: Workload, gcs: str, scratch: Path, build_id: str) -> dict:
    lcfg = load_config(cfg)
    connector = aiohttp.TCPConnector(limit=10_000, limit_per_host=10_000)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=cfg.timeout_s)
    ) as s:
        runner = Runner(lcfg, base, workload, s)
        await wait_ready(runner, (APP,), (cfg.candidates,), lcfg.ready_timeout_s)
        bodies = workload.bodies(cfg.pool, cfg.candidates)
        bench = Bench(cfg, runner, bodies, gcs, scratch, build_id)
        try:
            return await bench.run()
        finally:
            if bench.rebuild is not None:
                bench.rebuild.kill()


def run(cfg: Config) -> dict:
    import ray
    from ray import serve

    from serve_app.app import build_app

    build_dir, build = build_facts(cfg.registry)
    print(f"live build {build['build_id']}: {build['users']:,} users, {build['items']:,} items", flush=True)
    workload = Workload(build_dir, cfg.seed)
    scratch = cfg.scratch or Path(tempfile.mkdtemp(prefix="serve_during_rebuild-"))
    scratch.mkdir(parents=True, exist_ok=True)
    port = cfg.port or free_port()
    t_start, load_start = time.time(), os.getloadavg()
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(address="local", num_cpus=cfg.ray_cpus, include_dashboard=False, log_to_driver=False)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as serve_load: run `finally`, shut down
    try:
        gcs = ray.get_runtime_context().gcs_address
        print(f"local Ray at {gcs} ({cfg.ray_cpus} logical CPUs), scratch {scratch}", flush=True)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {
            "registry": str(cfg.registry.resolve()),
            "max_candidates": max(2000, cfg.candidates),
            **dict(cfg.app_args),
        }
        serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
        print(f"deployed {APP} at http://127.0.0.1:{port}/{APP} with {args}", flush=True)
        import uvloop

        raw = uvloop.run(measure(cfg, f"http://127.0.0.1:{port}", workload, gcs, scratch, build["build_id"]))
    finally:
        serve.shutdown()
        ray.shutdown()
        for d in scratch.glob("registry-*"):
            shutil.rmtree(d, ignore_errors=True)
    summary, headline = summarize_repeats(cfg, raw["repeats"])
    return {
        "benchmark": "serve_during_rebuild",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()},
        "machine": {**more_machine_facts(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "build": build,
        "app": {"route": f"/{APP}", "args": args},
        "scratch": str(scratch),
        "wall_s": round(time.time() - t_start, 1),
        "headline": headline,
        "summary": summary,
        "warmup": raw["warmup"],
        "repeats": raw["repeats"],
    }


def print_table(result: dict) -> None:
    def f(x, spec=".1f"):
        return "-" if x is None else format(x, spec)

    print(
        f"\n{'variant':<9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'failed':>7} "
        f"{'lag p99':>7} {'window s':>8} {'rebuild s':>9} {'replica':>7} {'rebuild':>7} {'machine':>7}  (cores)"
    )
    for s in result["summary"]:
        c = s["cores"]
        rb = sum(c.get(g) or 0 for g in ("embed_actors", "other_ray", "rebuild_driver"))
        print(
            f"{s['variant']:<9} {f(s['p50_ms']):>8} {f(s['p90_ms']):>8} {f(s['p99_ms']):>8} {f(s['max_ms']):>8} "
            f"{f(None if s['fail_frac'] is None else 100 * s['fail_frac'], '.2f') + '%':>7} "
            f"{f(s['send_lag_p99_ms']):>7} {f(s['window_s']):>8} "
            f"{f(s.get('rebuild_wall_s')):>9} {f(c.get('replica'), '.2f'):>7} {f(rb, '.2f'):>7} "
            f"{f(c.get('machine'), '.2f'):>7}"
        )
    for s in result["summary"]:
        print(f"  {s['variant']:<8} nice seen: " + ", ".join(f"{g} {v}" for g, v in s["nice_seen"].items()))
        for p in s.get("phases", []):
            print(
                f"  {s['variant']:<8} {p['phase']:<34} {f(p['duration_s']):>6}s  p50 {f(p['p50_ms']):>8} "
                f"p99 {f(p['p99_ms']):>8} max {f(p['max_ms']):>8} ms"
            )
        if any(c not in (0, None) for c in s.get("rebuild_exit_codes", [])):
            print(f"WARNING {s['variant']}: rebuild exit codes {s['rebuild_exit_codes']} (see the logs)")
    for name, d in result["headline"].items():
        print(f"{name}: " + ", ".join(f"{k} {v['median_of_repeats']}x {v['repeats']}" for k, v in d.items()))


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        if action.default in (None, False, [], ""):
            return action.help
        return super()._get_help_string(action)


def parse(argv: list[str] | None = None) -> tuple[Config, Path | None]:
    d = Config
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.serve_during_rebuild", description=__doc__, formatter_class=_HelpFormatter
    )
    p.add_argument("--registry", type=Path, help="registry whose live build is served (only read; the "
                   "rebuilds publish into scratch copies of it)")  # fmt: skip
    p.add_argument(
        "--package", "--checkpoint", dest="package", type=Path, help="model package the rebuilds embed with"
    )
    p.add_argument("--catalog", type=Path, help="catalog dataset directory of the rebuilds")
    p.add_argument("--users", type=Path, default=None, help="users dataset of the rebuilds (default: the job's, "
                   "CATALOG/../users if present)")  # fmt: skip
    p.add_argument("--rate", type=float, default=d.rate, help="offered req/s, open loop")
    p.add_argument("--candidates", type=int, default=d.candidates, help="item ids per request")
    p.add_argument("--nice", type=int, nargs="+", default=list(d.nice), help="one rebuild variant per value")
    p.add_argument("--repeats", type=int, default=d.repeats, help="interleaved repeats; medians over them")
    p.add_argument("--duration-s", type=float, default=d.duration_s, help="baseline window (no rebuild)")
    p.add_argument("--warmup-s", type=float, default=d.warmup_s, help="discarded load before each window")
    p.add_argument("--settle-s", type=float, default=d.settle_s, help="idle seconds after each window")
    p.add_argument("--warmup-rebuild", action=argparse.BooleanOptionalAction, default=d.warmup_rebuild,
                   help="run one untimed rebuild (under load) first")  # fmt: skip
    p.add_argument("--max-rebuild-s", type=float, default=d.max_rebuild_s, help="the job's --timeout-s")
    p.add_argument("--timeout-s", type=float, default=d.timeout_s, help="per-request client time-out")
    p.add_argument("--slo-p99-ms", type=float, default=d.slo_p99_ms, help="flag windows with a higher p99")
    p.add_argument("--pool", type=int, default=d.pool, help="distinct request bodies, cycled")
    p.add_argument("--rebuild-args", default="", help="extra jobs.rebuild_index arguments, one shell-quoted "
                   "string given with '=': --rebuild-args='--num-workers 1 --torch-threads 2'")  # fmt: skip
    p.add_argument("--app-arg", type=_app_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="extra build_app argument, e.g. max_queued_requests=512 (repeatable)")  # fmt: skip
    p.add_argument("--ray-cpus", type=int, default=d.ray_cpus, help="logical CPUs of the local Ray")
    p.add_argument("--port", type=int, default=d.port, help="Serve HTTP port on 127.0.0.1 (0 = a free one)")
    p.add_argument("--seed", type=int, default=d.seed, help="of the request bodies")
    p.add_argument("--scratch", type=Path, default=None, help="registry copies and rebuild logs (default: "
                   "a new temp directory)")  # fmt: skip
    p.add_argument("--out", type=Path, default=d.out, help="result JSON; the PNG is written next to it")
    p.add_argument("--replot", type=Path, default=None, metavar="JSON", help="only redraw JSON's PNG")
    a = p.parse_args(argv)
    if a.replot is None and None in (a.registry, a.package, a.catalog):
        p.error("--registry, --package and --catalog are required (unless --replot)")
    if a.rate <= 0 or a.candidates < 1 or a.repeats < 1 or not all(0 <= n <= 19 for n in a.nice):
        p.error("need --rate > 0, --candidates >= 1, --repeats >= 1 and every --nice in 0..19")
    if len(set(a.nice)) != len(a.nice):
        p.error(f"--nice values must differ: {a.nice}")
    cfg = Config(
        a.registry, a.package, a.catalog, a.users, a.rate, a.candidates, tuple(a.nice), a.repeats,
        a.duration_s, a.warmup_s, a.settle_s, a.warmup_rebuild, a.max_rebuild_s, a.timeout_s, a.slo_p99_ms,
        a.pool, tuple(shlex.split(a.rebuild_args)), tuple(a.app_arg), a.ray_cpus, a.port, a.seed, a.scratch,
        a.out,
    )  # fmt: skip
    return cfg, a.replot


def main(argv: list[str] | None = None) -> int:
    cfg, replot = parse(argv)
    if replot is not None:
        result = json.loads(replot.read_text())
        plot(result, replot.with_suffix(".png"))
        print_table(result)
        print(f"wrote {replot.with_suffix('.png')}")
        return 0
    try:
        result = run(cfg)
    except KeyboardInterrupt:
        print("interrupted: the rebuild, Serve and Ray shut down, nothing written", file=sys.stderr)
        return 130
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, cfg.out.with_suffix(".png"))
    print_table(result)
    print(f"wrote {cfg.out} and {cfg.out.with_suffix('.png')} in {result['wall_s']:.0f}s; rebuild logs in "
          f"{result['scratch']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
