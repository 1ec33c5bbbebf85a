"""The rebuild job end to end against its single-process floor: rebuild_s / floor_s (goal <= 1.5x).

One run times both sides on the same catalog, users and model package, in turn (rebuild, floor, rebuild,
floor, ... for --repeats rounds; medians reported, ratios taken within this one run):

  rebuild  `python -m jobs.rebuild_index --package PKG --catalog CAT --users USERS --registry <fresh
           temp registry> --force-unchecked --address <the benchmark's Ray> [the job arguments after
           --]` as a subprocess under `/usr/bin/time -v`, connected to one local Ray that the benchmark
           starts before the rounds (a `ray job submit` user's running cluster; --fresh-ray: each
           rebuild starts its own). rebuild_s = wall clock around the subprocess: process
           start and imports, connecting to Ray, the embedding (Ray Data), the assembly workers, tables,
           index, tuning,
           publish and Ray's shutdown at exit. Per-phase seconds come from the committed build's
           manifest (`timings`) and the job's SUMMARY line (publish_s); the phases the job does not
           time are split by when its output lines arrive (0.05 s resolution): job start (interpreter,
           imports, preflight) until its "rebuild <id>" line, ray.init until "embedding on Ray Data",
           the rest of the driver until SUMMARY, and the exit (Ray's shutdown) after it,
           so the table adds up to the wall clock. Peak RSS: the driver's VmHWM, every embedding or assembly
           actor's VmHWM (/proc polled every --poll-s seconds over the benchmark's own process tree, so
           another Ray on the machine is not counted), the largest sum of VmRSS over that tree (Ray's
           daemons included), and /usr/bin/time's "Maximum resident set size" (the driver's, or a
           descendant's it waited for if larger). Each rebuild gets a fresh registry, deleted after.
  floor    the same work in this process, no Ray, no files written, on --threads threads (default:
           the job's --num-workers x --torch-threads; torch.set_num_threads and faiss via
           core.ann.index.configure): (1) embed_s: load the package (core.rebuild.embed.Embedder) and embed every
           catalog and users partition in a plain pyarrow iter_batches loop (the job's --batch-size and
           --precision), collecting ids and vectors in memory; (2) train_s: core.ann.index.build of the
           index the rebuild chose, trained on its manifest's train_sample rows for its kmeans_iters
           (seeded; skipped when 0); (3) add_s: add_with_ids of every item vector (and the centroid
           refit when the manifest says refit); (4) recall_s: up to 4000 user vectors
           (seeded) split into tuning / held-out halves, exact top-10 (faiss.knn) of both, ONE search of
           each at the rebuild's chosen search setting, recall@10 (core.ann.index.recall_at_k).
           floor_s = embed_s + train_s + add_s + recall_s. The floor does not search for a setting: it
           is given the one the rebuild found. Its peak RSS is this process's ru_maxrss (it holds every
           vector; a high-water mark, so with --repeats it is the max over the rounds so far).
The input files are read once before the first round so neither side pays a cold page cache. The
floor runs with OMP_WAIT_POLICY=PASSIVE, as the job's actors do (unless OMP_WAIT_POLICY is set).

python -m benchmarks.rebuild_floor --package packages/<A> --catalog data/synth-1m/catalog \\
    --users data/synth-1m/users -- --num-workers 2 --cpus-per-worker 1 --torch-threads 1
"""

# ruff: noqa: E402  (OMP_WAIT_POLICY must be set before torch and faiss load their OpenMP runtimes)
from __future__ import annotations

import os

# The job's actors run with OMP_WAIT_POLICY=PASSIVE (jobs.embed_data, jobs.worker_pool); the floor gets the same, or
# torch's and faiss' OpenMP threads spin against each other on few cores (a 3-4x slower floor on 2
# loaded cores). Set OMP_WAIT_POLICY yourself to override. The job itself gets the environment as it
# was before this line.
_JOB_ENV = dict(os.environ)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import json
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from core.ann import index as ann
from core.rebuild.build import MIN_USER_QUERIES, IndexOptions
from core.rebuild.embed import Embedder, embeddings_to_numpy
from core.storage.build_dir import BuildDir
from core.storage.datasets import partition_files
from jobs import rebuild_index

REPO = Path(__file__).resolve().parents[1]
TIME_BIN = Path("/usr/bin/time")
# Ray titles an actor's process "ray::<class>.<method>": Ray Data's embedding actors (their map names
# PartEmbedder) and the assembly workers
WORKER_MARKERS = ("PartEmbedder", "AssemblyWorker")
# job arguments this benchmark sets itself (each rebuild gets its own registry; the floor needs users)
RESERVED_JOB_ARGS = (
    "--package",
    "--checkpoint",
    "--catalog",
    "--users",
    "--registry",
    "--address",
    "--no-users",
    "--resume",
)
K = IndexOptions.k
RUN_KEYS = ("num_workers", "cpus_per_worker", "torch_threads", "faiss_threads", "batch_size", "precision")


@dataclasses.dataclass(frozen=True)
class FloorConfig:
    package: Path
    catalog: Path
    users: Path
    job_args: tuple[str, ...] = ()
    repeats: int = 1
    threads: int | None = None  # None: the job's num_workers x torch_threads
    poll_s: float = 0.3
    goal: float = 1.5
    tmp: Path = Path(tempfile.gettempdir())
    out: Path = Path("benchmarks/results/rebuild_floor.json")
    verbose: bool = False
    # False: one local Ray started by this benchmark before the rounds, which every rebuild connects to
    # (what a `ray job submit` user has: a running cluster); True: each rebuild starts its own
    fresh_ray: bool = False
    ray_address: str = "local"  # set by run() when the benchmark holds the cluster
    no_floor: bool = False  # the rebuild alone (a catalog whose floor would not fit this machine)


# ---- the rebuild: a subprocess, its process tree polled ---------------------------------------------
def _kib(status: str, key: str) -> int | None:
    m = re.search(rf"^{key}:\s+(\d+) kB", status, re.M)
    return int(m.group(1)) if m else None


def _is_worker(cmd: str) -> bool:
    return any(m in cmd for m in WORKER_MARKERS)


class TreePoller(threading.Thread):
    """Polls /proc for the process tree under `root`: the driver's and every RebuildWorker's VmHWM
    (each pid's own high-water mark, so a sample taken late still holds its peak, except for growth in
    its last --poll-s before exit) and the largest sum of VmRSS over the tree."""

    def __init__(self, root: int, interval: float):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self._stop_event = threading.Event()
        self.driver: int | None = None
        self.driver_hwm_kib = 0
        self.workers: dict[int, int] = {}  # pid -> max VmHWM seen (KiB)
        self.tree_rss_kib = 0
        self.samples = 0
        self._cmdlines: dict[int, str] = {}

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for e in os.scandir("/proc"):
            if not e.name.isdigit():
                continue
            try:
                with open(f"/proc/{e.name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(e.name))
        out, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, ()))
        return out

    def _cmdline(self, pid: int) -> str:
        # re-read while the title may still change (a Ray worker starts as "ray::IDLE")
        cached = self._cmdlines.get(pid)
        if cached is not None and (_is_worker(cached) or pid in (self.root, self.driver)):
            return cached
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/comm") as f:
                cmd += " " + f.read().strip()
        except OSError:
            cmd = ""
        self._cmdlines[pid] = cmd
        return cmd

    def sample(self) -> None:
        tree_rss = 0
        for pid in self._tree():
            if pid == os.getpid():  # the benchmark itself (the floor's vectors) is not the job's
                continue
            try:
                with open(f"/proc/{pid}/status") as f:
                    status = f.read()
            except OSError:
                continue
            tree_rss += _kib(status, "VmRSS") or 0
            hwm = _kib(status, "VmHWM") or 0
            cmd = self._cmdline(pid)
            if self.driver is None and "jobs.rebuild_index" in cmd and "/usr/bin/time" not in cmd:
                self.driver = pid
            if pid == self.driver:
                self.driver_hwm_kib = max(self.driver_hwm_kib, hwm)
            elif _is_worker(cmd):
                self.workers[pid] = max(self.workers.get(pid, 0), hwm)
        self.tree_rss_kib = max(self.tree_rss_kib, tree_rss)
        self.samples += 1


class LogTail(threading.Thread):
    """Timestamps the job's output lines (seconds since its start) as they reach the log file, to
    split the phases the job does not time: its start, ray.init and its exit."""

    def __init__(self, path: Path, t0: float, interval: float = 0.05):
        super().__init__(daemon=True)
        self.path, self.t0, self.interval = path, t0, interval
        self._stop_event = threading.Event()
        self.lines: list[tuple[float, str]] = []

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        buf = b""
        with open(self.path, "rb") as f:
            while True:
                chunk = f.read()
                now = time.perf_counter() - self.t0
                if chunk:
                    *lines, buf = (buf + chunk).split(b"\n")
                    self.lines += [(now, ln.decode(errors="replace")) for ln in lines]
                elif self._stop_event.is_set():
                    break
                else:
                    self._stop_event.wait(self.interval)
        if buf:
            self.lines.append((time.perf_counter() - self.t0, buf.decode(errors="replace")))

    def first(self, pattern: str) -> float | None:
        rx = re.compile(pattern)
        return next((t for t, ln in self.lines if rx.match(ln)), None)


def parse_time_v(text: str) -> dict:
    """The lines of GNU time -v this benchmark reports."""
    keys = {
        "Maximum resident set size (kbytes)": "max_rss_kib",
        "User time (seconds)": "user_s",
        "System time (seconds)": "system_s",
        "Exit status": "exit_status",
    }
    out = {}
    for line in text.splitlines():
        name, _, value = line.strip().rpartition(": ")
        if name in keys:
            out[keys[name]] = float(value) if "." in value else int(value)
    return out


def job_argv(cfg: FloorConfig, registry: Path) -> list[str]:
    return [
        "--package", str(cfg.package.resolve()), "--catalog", str(cfg.catalog.resolve()),
        "--users", str(cfg.users.resolve()), "--registry", str(registry), "--force-unchecked",
        "--address", cfg.ray_address, *cfg.job_args,
    ]  # fmt: skip


def stop_job(proc: subprocess.Popen) -> None:
    """SIGTERM to the job's process group, SIGKILL if it is still there after 30 s."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def run_rebuild(cfg: FloorConfig) -> dict:
    registry = Path(tempfile.mkdtemp(prefix="rebuild-floor-reg-", dir=cfg.tmp))
    log_path, time_path = registry.with_suffix(".log"), registry.with_suffix(".time")
    cmd = [sys.executable, "-m", "jobs.rebuild_index", *job_argv(cfg, registry)]
    use_time = TIME_BIN.is_file() and os.access(TIME_BIN, os.X_OK)
    if use_time:
        cmd = [str(TIME_BIN), "-v", "-o", str(time_path), *cmd]
    try:
        with open(log_path, "w") as log:
            t0 = time.perf_counter()
            # its own session: an interrupted benchmark stops the whole job (its Ray included), not just
            # /usr/bin/time
            # Ray 2.60's client reads the cluster's token (~/.ray/auth_token) only in token mode
            env = _JOB_ENV if cfg.fresh_ray else {**_JOB_ENV, "RAY_AUTH_MODE": "token"}
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            # a shared cluster's workers are children of its raylet, under this process
            root = proc.pid if cfg.fresh_ray else os.getpid()
            poller, tail = TreePoller(root, cfg.poll_s), LogTail(log_path, t0)
            poller.start()
            tail.start()
            try:
                rc = proc.wait()
            except BaseException:
                stop_job(proc)
                raise
            wall = time.perf_counter() - t0
            for th in (poller, tail):
                th.stop()
                th.join()
        output = log_path.read_text(errors="replace")
        if cfg.verbose:
            print(output, end="")
        last = "\n".join(output.splitlines()[-30:])
        if rc != 0:
            raise RuntimeError(f"the rebuild exited {rc}; the last lines of its output:\n{last}")
        summary = next(
            (json.loads(ln[len("SUMMARY ") :]) for ln in output.splitlines() if ln.startswith("SUMMARY ")),
            None,
        )
        if summary is None:
            raise RuntimeError(f"the rebuild printed no SUMMARY line; the last lines of its output:\n{last}")
        for ln in output.splitlines():
            if ln.startswith("published "):
                print(f"  rebuild: {ln}", flush=True)
        m = BuildDir(registry / "builds" / summary["build_id"]).read_manifest()
        if use_time:
            tv = parse_time_v(time_path.read_text())
        else:  # the max over every child this process has waited for, this run's included
            tv = {"max_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}
        workers = poller.workers
        return {
            "rebuild_s": round(wall, 3),
            "job_total_s": summary["seconds"],  # the job's own clock: from its preflight to SUMMARY
            "build_id": summary["build_id"],
            "timings": dict(m.timings),  # the committed manifest's
            "summary_timings": summary["timings"],  # the same plus publish_s (added after the commit)
            "phases": rebuild_phases(wall, summary, marks(tail)),
            "index": {
                "type": m.index.type,
                "factory": m.index.factory,
                "train_sample": m.index.train_sample,
                "kmeans_iters": m.index.kmeans_iters,
                "refit": m.index.refit,
                "search_params": m.index.search_params,
                "layout": m.index.layout,
                "shards": len(m.index.shards),
                "selection": m.quality.get("selection"),
                "candidates": [c["factory"] for c in m.quality.get("candidates", [])],
            },
            "holdout_recall_at_10": m.quality["recall_at_k"],
            "holdout_qps": m.quality.get("holdout_qps"),
            "queries": m.quality.get("queries"),
            "run": {k: m.run.get(k) for k in RUN_KEYS},
            "peak_rss_mib": {
                "driver": round(poller.driver_hwm_kib / 1024, 1) if poller.driver else None,
                "largest_worker": round(max(workers.values()) / 1024, 1) if workers else None,
                "workers": {str(p): round(v / 1024, 1) for p, v in sorted(workers.items())},
                "tree_sum_rss": round(poller.tree_rss_kib / 1024, 1),
                "time_v_max_rss": round(tv["max_rss_kib"] / 1024, 1),
                "time_v_source": "/usr/bin/time -v" if use_time else "getrusage(RUSAGE_CHILDREN)",
            },
            "cpu_s": {k: tv[k] for k in ("user_s", "system_s") if k in tv},
            "poll_samples": poller.samples,
        }
    finally:
        shutil.rmtree(registry, ignore_errors=True)
        log_path.unlink(missing_ok=True)
        time_path.unlink(missing_ok=True)


# rebuild timing keys -> (row label, the floor phase that does the same work)
PHASE_ROWS = {
    "embed_s": ("embed items + users (Ray Data: actors start, load the package, embed)", "embed_s"),
    "pool_start_s": ("assembly workers start", None),
    "users_table_s": ("users table (id-sorted, written by the workers)", None),
    "items_table_s": ("items table (id-sorted, written by the workers)", None),
    "index_train_s": ("index train", "train_s"),
    "index_add_s": ("index add", "add_s"),
    "recall_s": ("search setting + recall gate", "recall_s"),
    "index_write_s": ("index write", None),
    "publish_s": ("publish (manifest, comparison, commit, pointer swap)", None),
}
# timed inside publish_s: shown, not added again
NESTED = {
    "compare_s": "of which: comparison with the live build",
    "commit_s": "of which: commit (rename, or upload)",
}
START_ROW, RAY_INIT_ROW, REST_ROW, EXIT_ROW = "job_start_s", "ray_init_s", "driver_rest_s", "job_exit_s"
FIXED_ROWS = {
    START_ROW: "job start (interpreter, imports, preflight, staging)",
    RAY_INIT_ROW: "ray.init (a new local Ray with --fresh-ray, else connecting to the running one)",
    REST_ROW: "rest of the driver (planning, query sets, sidecar fold, untimed index work)",
    EXIT_ROW: "job exit (Ray shutdown, interpreter exit)",
}


def marks(tail: LogTail) -> dict:
    """When the job printed the lines that bound its untimed phases (seconds since its start)."""
    return {
        "started": tail.first(r"rebuild \S+.*: (?:checkpoint|package) "),  # after preflight, before ray.init
        "embedding": tail.first(r"embedding on Ray Data"),  # after ray.init, before the embedding
        "summary": tail.first(r"SUMMARY "),
    }


def rebuild_phases(wall: float, summary: dict, mark: dict) -> dict:
    """Seconds per row of the table; they add up to the wall clock. Without the marks (the job's output
    changed) the untimed phases are two rows: before/after the job's own clock, and the rest."""
    t = {k: float(v) for k, v in summary["timings"].items()}
    if all(v is not None for v in mark.values()):
        fixed = {
            START_ROW: mark["started"],
            RAY_INIT_ROW: mark["embedding"] - mark["started"],
            REST_ROW: mark["summary"] - mark["embedding"] - sum(v for k, v in t.items() if k not in NESTED),
            EXIT_ROW: wall - mark["summary"],
        }
    else:
        fixed = {START_ROW: wall - summary["seconds"],
                 REST_ROW: summary["seconds"] - sum(v for k, v in t.items() if k not in NESTED)}  # fmt: skip
    return {k: round(v, 3) for k, v in {**fixed, **t}.items()}


# ---- the floor: the same work in this process -------------------------------------------------------
def embed_files(files: list[Path], fn, columns: list[str], id_name: str, batch_size: int):
    ids, vecs = [], []
    for f in files:
        for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=list(columns)):
            out = fn(pa.Table.from_batches([rb]))
            ids.append(out.column(id_name).to_numpy())
            vecs.append(embeddings_to_numpy(out))
    return np.concatenate(ids).astype(np.int64, copy=False), np.concatenate(vecs)


def run_floor(cfg: FloorConfig, index: dict, threads: int, batch_size: int, precision: str) -> dict:
    torch.set_num_threads(threads)
    ann.configure(threads)
    seed = IndexOptions.seed
    t0 = time.perf_counter()
    emb = Embedder(cfg.package, threads=threads, precision=precision)
    t_load = time.perf_counter()
    m = emb.model.manifest
    item_ids, xb = embed_files(
        partition_files(cfg.catalog), emb.items, emb.columns("items"), m.item_id, batch_size
    )
    user_ids, xu = embed_files(
        partition_files(cfg.users), emb.users, emb.columns("users"), m.user_id, batch_size
    )
    t1 = time.perf_counter()

    n, d = xb.shape
    spec = ann.IndexSpec(
        index["type"], index["factory"], index["train_sample"], index["kmeans_iters"], index["refit"]
    )
    idx, t = ann.build(spec, xb, item_ids, seed=seed)  # the same training, add (and refit) as the job's
    t2 = t1 + t["index_train_s"]
    t3 = time.perf_counter()

    if len(xu) < MIN_USER_QUERIES:
        raise ValueError(
            f"the floor needs >= {MIN_USER_QUERIES} users as queries, the users dataset has {len(xu)}"
        )
    rng = np.random.default_rng(seed)
    pool = xu[rng.choice(len(xu), size=min(IndexOptions.max_queries, len(xu)), replace=False)]
    half = len(pool) // 2
    recall = {}
    for name, xq in (("tuning", pool[:half]), ("holdout", pool[half:])):
        exact = ann.exact_topk(xb, xq, K)  # faiss.knn, inner product
        found = ann.search(idx, spec, index["search_params"], xq, K)[1]
        recall[name] = round(ann.recall_at_k(xb, item_ids, xq, found, K, exact), 4)
    t4 = time.perf_counter()

    phases = {"embed_s": t1 - t0, "train_s": t2 - t1, "add_s": t3 - t2, "recall_s": t4 - t3}
    return {
        "floor_s": round(sum(phases.values()), 3),
        "phases": {k: round(v, 3) for k, v in phases.items()},
        "package_load_s": round(t_load - t0, 3),  # inside embed_s
        "items": int(n),
        "users": len(user_ids),
        "queries": {"tuning": half, "holdout": len(pool) - half},
        "tuning_recall_at_10": recall["tuning"],
        "holdout_recall_at_10": recall["holdout"],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": {"torch": torch.get_num_threads(), "faiss": faiss.omp_get_max_threads()},
    }


# ---- the run, its summary and its table -------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rows_of(path: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in partition_files(path))


def warm_page_cache(*paths: Path) -> None:
    for p in paths:
        for f in partition_files(p):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def med(values) -> float:
    return round(statistics.median(values), 3)


def table(result: dict) -> str:
    """phase | rebuild s | floor s, medians; the rebuild's rows add up to its wall clock."""
    mr, mf = result["median"]["rebuild_phases"], result["median"]["floor_phases"]
    rows = [(FIXED_ROWS[k], mr[k], None) for k in (START_ROW, RAY_INIT_ROW) if k in mr]
    done = set()
    for key, (label, floor_key) in PHASE_ROWS.items():
        if key in mr:
            rows.append((label, mr[key], mf.get(floor_key) if floor_key else None))
            done.add(floor_key)
    rows += [
        (NESTED.get(k, k), v, None) for k, v in mr.items() if k not in PHASE_ROWS and k not in FIXED_ROWS
    ]
    rows += [(FIXED_ROWS[k], mr[k], None) for k in (REST_ROW, EXIT_ROW) if k in mr]
    labels = {"embed_s": "embed items + users", "train_s": "index train", "add_s": "index add",
              "recall_s": "search setting + recall gate"}  # fmt: skip
    rows += [(f"{labels[k]} (not timed by the job)", None, v) for k, v in mf.items() if k not in done]

    def cell(x):
        return "-" if x is None else f"{x:,.2f}"

    lines = ["| phase | rebuild s | floor s |", "|---|---|---|"]
    lines += [f"| {label} | {cell(r)} | {cell(f)} |" for label, r, f in rows]
    lines.append(
        f"| **total** | **{result['median']['rebuild_s']:,.2f}** | **{cell(result['median']['floor_s'])}** |"
    )
    return "\n".join(lines)


def run(cfg: FloorConfig) -> dict:
    if not cfg.fresh_ray:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        cfg = dataclasses.replace(cfg, ray_address=ray.get_runtime_context().gcs_address)
        try:
            return _run(cfg)
        finally:
            ray.shutdown()
    return _run(cfg)


def _run(cfg: FloorConfig) -> dict:
    # the job's own parser: the arguments are checked before anything runs, and the floor takes the
    # job's batch size, precision and thread count from it
    job = rebuild_index.parse(job_argv(cfg, cfg.tmp / "registry"))
    threads = cfg.threads or job.num_workers * job.torch_threads
    items, users = rows_of(cfg.catalog), rows_of(cfg.users)
    warm_page_cache(cfg.catalog, cfg.users)
    print(f"rebuild_floor: {items:,} items, {users:,} users; job args {list(cfg.job_args)}; floor threads {threads}",
          flush=True)  # fmt: skip
    runs = []
    for r in range(cfg.repeats):
        rb = run_rebuild(cfg)
        print(f"round {r + 1} rebuild: {rb['rebuild_s']:.2f}s ({rb['index']['factory']} "
              f"{rb['index']['search_params']}, held-out recall {rb['holdout_recall_at_10']})", flush=True)  # fmt: skip
        if cfg.no_floor:
            runs.append({"rebuild": rb, "floor": None, "ratio": None})
            continue
        fl = run_floor(cfg, rb["index"], threads, job.batch_size, job.precision)
        print(f"round {r + 1} floor:   {fl['floor_s']:.2f}s {fl['phases']}, held-out recall "
              f"{fl['holdout_recall_at_10']}", flush=True)  # fmt: skip
        runs.append({"rebuild": rb, "floor": fl, "ratio": round(rb["rebuild_s"] / fl["floor_s"], 3)})
    rebuilds, floors = [x["rebuild"] for x in runs], [x["floor"] for x in runs if x["floor"]]
    keys = list(dict.fromkeys(k for rb in rebuilds for k in rb["phases"]))
    median = {
        "rebuild_s": med(rb["rebuild_s"] for rb in rebuilds),
        "floor_s": med(fl["floor_s"] for fl in floors) if floors else None,
        "rebuild_phases": {k: med(rb["phases"].get(k, 0.0) for rb in rebuilds) for k in keys},
        "floor_phases": {k: med(fl["phases"][k] for fl in floors) for k in floors[0]["phases"]}
        if floors
        else {},
    }
    ratio = round(median["rebuild_s"] / median["floor_s"], 3) if floors else None
    last = rebuilds[-1]
    result = {
        "benchmark": "rebuild_floor",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()},
        "job_command": ["python", "-m", "jobs.rebuild_index", *job_argv(cfg, Path("<fresh registry>"))],
        "cpu_model": cpu_model(),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "floor_omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "faiss": faiss.__version__,
            "ray": ray.__version__,
            "numpy": np.__version__,
            "pyarrow": pa.__version__,
        },
        "items": items,
        "users": users,
        "floor_threads": threads,
        "ratio": ratio,  # median rebuild_s / median floor_s
        "goal": cfg.goal,
        "goal_met": None if ratio is None else ratio <= cfg.goal,
        "ratios_per_round": [x["ratio"] for x in runs],
        "median": median,
        "rebuild_timings": last["timings"],  # the last round's manifest.timings
        "index": last["index"],
        "recall_at_10": {
            "rebuild_holdout": [rb["holdout_recall_at_10"] for rb in rebuilds],
            "floor_holdout": [fl["holdout_recall_at_10"] for fl in floors],
            "floor_tuning": [fl["tuning_recall_at_10"] for fl in floors],
        },
        "peak_rss_mib": {
            "rebuild_driver": max((rb["peak_rss_mib"]["driver"] or 0) for rb in rebuilds),
            "rebuild_largest_worker": max((rb["peak_rss_mib"]["largest_worker"] or 0) for rb in rebuilds),
            "rebuild_tree_sum": max(rb["peak_rss_mib"]["tree_sum_rss"] for rb in rebuilds),
            "rebuild_time_v_max_rss": max(rb["peak_rss_mib"]["time_v_max_rss"] for rb in rebuilds),
            "floor": max((fl["peak_rss_mib"] for fl in floors), default=None),
        },
        "runs": runs,
    }
    result["table_markdown"] = table(result)
    return result


def parse(argv: list[str] | None = None) -> FloorConfig:
    argv = list(sys.argv[1:] if argv is None else argv)
    job_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, job_args = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.rebuild_floor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s --package PKG --catalog CAT --users USERS [options] [-- JOB ARGS]",
        epilog="Arguments after -- go to jobs.rebuild_index unchanged (e.g. --num-workers 2 --cpus-per-worker 1 "
        "--torch-threads 1, --layout sharded, --index ivf); the benchmark sets "
        + ", ".join(RESERVED_JOB_ARGS),
    )
    p.add_argument(
        "--package", "--checkpoint", dest="package", type=Path, required=True, help="model package directory"
    )
    p.add_argument(
        "--catalog",
        type=Path,
        required=True,
        help="catalog dataset directory (e.g. examples.movielens.prepare)",
    )
    p.add_argument("--users", type=Path, required=True, help="users dataset directory (the floor's queries)")
    p.add_argument("--repeats", type=int, default=1, help="rounds of (rebuild, floor); medians reported")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="floor threads (default: job's --num-workers x --torch-threads)",
    )
    p.add_argument(
        "--poll-s", type=float, default=0.3, help="seconds between /proc samples of the job's processes"
    )
    p.add_argument("--goal", type=float, default=1.5, help="rebuild_s / floor_s to meet")
    p.add_argument(
        "--tmp", type=Path, default=Path(tempfile.gettempdir()), help="where the temp registries go"
    )
    p.add_argument("--out", type=Path, default=FloorConfig.out, help="result JSON")
    p.add_argument("--verbose", action="store_true", help="print the job's whole output after each rebuild")
    p.add_argument(
        "--no-floor",
        action="store_true",
        help="time the rebuild alone (a catalog whose single-process floor would not fit in memory)",
    )
    p.add_argument(
        "--fresh-ray",
        action="store_true",
        help="each rebuild starts its own local Ray (default: one Ray started here, which every rebuild "
        "connects to, as `ray job submit` does to a running cluster)",
    )
    a = p.parse_args(argv)
    if a.repeats < 1 or (a.threads is not None and a.threads < 1) or a.poll_s <= 0:
        p.error("--repeats and --threads must be >= 1, --poll-s > 0")
    clash = [x for x in job_args if x.split("=", 1)[0] in RESERVED_JOB_ARGS]
    if clash:
        p.error(f"the benchmark sets {', '.join(RESERVED_JOB_ARGS)} itself; remove {clash} after --")
    return FloorConfig(
        a.package, a.catalog, a.users, tuple(job_args), a.repeats, a.threads, a.poll_s, a.goal, a.tmp, a.out,
        a.verbose, a.fresh_ray, no_floor=a.no_floor,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    # SIGTERM unwinds like Ctrl-C: a running job is stopped and its temp registry removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    result = run(cfg)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(result, indent=2) + "\n")
    idx = result["index"]
    print()
    print(f"{result['items']:,} items + {result['users']:,} users, {result['cpu_model']}, {result['nproc']} CPUs; "
          f"index {idx['factory']} {idx['search_params']} ({idx['layout']}, {idx['selection']}); "
          f"medians of {cfg.repeats}")  # fmt: skip
    print()
    print(result["table_markdown"])
    if idx["selection"] == "measured":
        print(f"\n(rebuild train/add: the {len(idx['candidates'])} candidates `auto` built and measured, "
              f"{', '.join(idx['candidates'])}; the floor builds only the winner. The job does not time the "
              "candidates' tuning, QPS timing and index write: they are in 'rest of the driver'.)")  # fmt: skip
    else:
        print("\n(rebuild index add: each shard's worker also writes its rows of the items table and answers "
              "the exact top-10 of all queries, which the floor times in its recall row.)")  # fmt: skip
    rss = result["peak_rss_mib"]
    print(f"\npeak RSS MiB: rebuild driver {rss['rebuild_driver']:,.0f}, largest worker "
          f"{rss['rebuild_largest_worker']:,.0f}, whole job tree (sum) {rss['rebuild_tree_sum']:,.0f}, "
          f"{result['runs'][-1]['rebuild']['peak_rss_mib']['time_v_source']} max "
          f"{rss['rebuild_time_v_max_rss']:,.0f}; floor {rss['floor'] or 0:,.0f}")  # fmt: skip
    rec = result["recall_at_10"]
    print(f"held-out recall@10: rebuild {rec['rebuild_holdout']}, floor {rec['floor_holdout']}")
    if result["ratio"] is None:
        print(f"(--no-floor: the rebuild alone); wrote {cfg.out}")
        return 0
    verdict = "met" if result["goal_met"] else "missed"
    print(f"rebuild / floor: {result['ratio']:.2f}x (goal <= {cfg.goal}x: {verdict}); per round "
          f"{result['ratios_per_round']}; wrote {cfg.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
