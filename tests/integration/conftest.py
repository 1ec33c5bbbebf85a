"""Integration tier: real files, real `ray start --head`, real `ray job submit`, real Serve HTTP.

Session fixtures prepare MovieLens, train two small versions of the example model (different seeds ->
different versions) exported as model packages, and start ONE local Ray head with token
authentication, as Ray 2.60 users run it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from serve_app.ingress import MODES, haproxy_pattern, ingress_env
from tests.conftest import REPO
from tests.s3server import S3Server

# SKEWLESS_INGRESS=fast runs the cluster on Serve's throughput-optimized path (serve_app/ingress.py);
# scripts/test.sh runs the HTTP tests in both modes.
INGRESS = os.environ.get("SKEWLESS_INGRESS", "default")
if INGRESS not in MODES:
    raise ValueError(f"SKEWLESS_INGRESS must be one of {MODES}, got {INGRESS!r}")


def pytest_collection_modifyitems(items):
    for item in items:
        if "/tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_module(
    module: str, *args: str, env: dict | None = None, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """`python -m module args` from the repo root; output captured and echoed on failure."""
    p = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        env=env or os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"{module} {args} exited {p.returncode}\nSTDOUT:\n{p.stdout[-4000:]}\nSTDERR:\n{p.stderr[-4000:]}"
        )
    return p


# scripts/test.sh runs pytest twice (once per ingress mode); both sessions read the data,
# model packages and skew check the first one made from $SKEWLESS_TEST_ARTIFACTS (the same seeds would
# make the same files again). Tests only read them: every test writes into its own registry.
ARTIFACTS = os.environ.get("SKEWLESS_TEST_ARTIFACTS")


def made_once(tmp_path_factory, name: str, make) -> list[Path]:
    """make(root) -> paths, run once per test command when $SKEWLESS_TEST_ARTIFACTS is set. pytest
    sessions that run at the same time (scripts/test.sh runs two) take turns: the first makes, the
    others wait on the lock and then read what it made."""
    if not ARTIFACTS:
        return make(tmp_path_factory.mktemp(name))
    root = Path(ARTIFACTS) / name
    done = root / "done.json"  # written last: a session killed mid-way leaves nothing to reuse
    with open(Path(ARTIFACTS) / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when this process dies
        if done.exists():
            return [Path(x) for x in json.loads(done.read_text())]
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        paths = make(root)
        done.write_text(json.dumps([str(x) for x in paths]))
        return paths


@pytest.fixture(scope="session")
def ml_data(tmp_path_factory, movielens_dir) -> Path:
    def make(root: Path) -> list[Path]:
        out = root / "movielens"
        run_module(
            "examples.movielens.prepare", "movielens", "--movielens", movielens_dir, "--out", out,
            "--partitions", "8",
        )  # fmt: skip
        return [out]

    return made_once(tmp_path_factory, "data", make)[0]


def _train(ml_data: Path, root: Path, *args: str) -> Path:
    """Train the example model; its training checkpoint goes to root/checkpoints, the exported model
    package (returned) to root/packages."""
    p = run_module(
        "examples.movielens.train", "--data", ml_data, "--out", root / "packages",
        "--checkpoints", root / "checkpoints", *args,
    )  # fmt: skip
    return Path(p.stdout.strip().splitlines()[-1].split("package: ")[1])


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, ml_data) -> tuple[Path, Path]:
    """Two model packages of one family as it evolves: A from scratch, B warm-started from A (so the
    pair passes the skew check)."""

    def make(root: Path) -> list[Path]:
        a = _train(ml_data, root, "--epochs", "3", "--seed", "0")
        b = _train(ml_data, root, "--epochs", "1", "--seed", "1", "--lr", "5e-4", "--init-from", str(a))
        return [a, b]

    a, b = made_once(tmp_path_factory, "checkpoints", make)
    assert a != b
    return a, b


@pytest.fixture(scope="session")
def scratch_checkpoint(tmp_path_factory, ml_data) -> Path:
    """A model package of the same family, trained from scratch with another seed: an unrelated
    embedding space."""
    return made_once(
        tmp_path_factory, "scratch", lambda root: [_train(ml_data, root, "--epochs", "1", "--seed", "7")]
    )[0]


@pytest.fixture(scope="session")
def skew_results(tmp_path_factory, ml_data, checkpoints) -> Path:
    """A passed skew check of (A, B), stored the way jobs.skew_check stores it."""

    def make(registry: Path) -> list[Path]:
        run_module("jobs.skew_check", "--packages", *checkpoints, "--data", ml_data, "--registry", registry)
        return [registry / "skew"]

    return made_once(tmp_path_factory, "skew-registry", make)[0]


@pytest.fixture(scope="session")
def new_registry(tmp_path_factory, skew_results):
    """Factory: a fresh registry that already holds the family's passed skew check."""

    def make(name: str) -> Path:
        registry = tmp_path_factory.mktemp(name)
        shutil.copytree(skew_results, registry / "skew")
        return registry

    return make


@pytest.fixture(scope="session")
def live_a(tmp_path_factory, ray_head, ml_data, checkpoints, skew_results) -> tuple[Path, str]:
    """(registry, build id): a registry whose live build is package A's over the MovieLens catalog and
    users, made by ONE rebuild job per test command. Many tests start from exactly that; they copy it
    (`registry_with_a`) instead of running the same rebuild again."""

    def make(root: Path) -> list[Path]:
        registry = root / "registry"
        shutil.copytree(skew_results, registry / "skew")
        build = summary(rebuild(ray_head, checkpoints[0], ml_data / "catalog", registry, "--index", "auto"))[
            "build_id"
        ]
        (root / "build_id").write_text(build)
        return [registry, root / "build_id"]

    registry, build_file = made_once(tmp_path_factory, "live-a", make)
    return registry, build_file.read_text()


@pytest.fixture(scope="session")
def registry_with_a(tmp_path_factory, live_a):
    """Factory: name -> (a private copy of live_a's registry, its live build id)."""

    def make(name: str) -> tuple[Path, str]:
        registry = tmp_path_factory.mktemp(name)
        shutil.copytree(live_a[0], registry, dirs_exist_ok=True)
        return registry, live_a[1]

    return make


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3-compatible server on loopback (SeaweedFS, tests/s3server.py) with a `skewless` bucket.
    Its endpoint and credentials are in this process's environment and in every Ray process's (as a
    cluster node has its instance role): nothing passes them on a command line or in a config."""
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        server.make_bucket("skewless")
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())
        try:
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="session")
def ray_env(s3) -> dict:
    """Environment for Ray processes and clients: token auth on, with the token in the environment
    (so nothing depends on ~/.ray/auth_token); the S3 server's endpoint and credentials."""
    env = os.environ.copy()
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    # the Ray processes' cache of object-store artifacts (packages, verified build copies), apart from
    # what a test's own jobs use: a replica fetches a build from the bucket, not from the job's copy
    env["SKEWLESS_CACHE_DIR"] = tempfile.mkdtemp(prefix="skewless-node-cache-")
    env.pop("RAY_ADDRESS", None)
    if INGRESS == "fast":
        env.update(ingress_env(INGRESS, Path(tempfile.mkdtemp(prefix="shp-", dir="/tmp"))))
    return env


def stop_haproxy(env: dict) -> None:
    pattern = haproxy_pattern(env)
    if pattern:
        subprocess.run(["pkill", "-f", pattern], check=False)


@pytest.fixture(scope="session")
def ray_head(ray_env, tmp_path_factory) -> dict:
    """`ray start --head --block` as a child process: stopping it stops only THIS cluster (a plain
    `ray stop` would kill every Ray on the machine). 4 logical CPUs: a rebuild needs one per embedding
    actor plus one for Ray Data's file-listing task, beside the Serve replicas."""
    # every port its own: a second Ray head on the machine (scripts/test.sh runs two) must not meet this
    # one's, and a head's dashboard agent defaults to port 52365 (the loser's job API says "No available
    # agent to submit job")
    port, dash, metrics, agent = free_port(), free_port(), free_port(), free_port()
    # this cluster's own temp dir: its session (logs, sockets) apart from any other Ray on the machine,
    # such as the other pytest session scripts/test.sh runs beside this one (short: socket paths)
    temp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    log = open(tmp_path_factory.mktemp("ray") / "ray-head.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
         "--include-dashboard=true", "--num-cpus=4", "--disable-usage-stats", f"--metrics-export-port={metrics}",
         f"--temp-dir={temp}", f"--dashboard-agent-listen-port={agent}"],
        env=ray_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    info = {
        "gcs": f"127.0.0.1:{port}",
        "dashboard": f"http://127.0.0.1:{dash}",
        "metrics": f"http://127.0.0.1:{metrics}/metrics",
        "env": ray_env,
    }

    def up():
        assert proc.poll() is None, f"ray start exited with {proc.returncode}; see {log.name}"
        try:
            return (
                ray_cli(
                    "job", "list", "--address", info["dashboard"], env=ray_env, check=False, timeout=30
                ).returncode
                == 0
            )
        except subprocess.TimeoutExpired:
            return False

    try:
        wait_for(up, 180, "the Ray head to accept job API calls", interval_s=1)
        # this cluster's logs (tests grep them)
        info["session_dir"] = (Path(temp) / "session_latest").resolve()
        yield info
    finally:
        # --block turns SIGTERM into a clean stop, which takes ~35 s (Serve, dashboard modules, each
        # with its own grace period); nothing of this throwaway cluster needs it, so what is left
        # after a few seconds is killed: every process of the session `ray start` led (workers get
        # process groups of their own, not sessions).
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        kill_session(proc.pid)
        stop_haproxy(ray_env)
        log.close()


def kill_session(sid: int) -> None:
    """SIGKILL every process whose session id is `sid`."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            # the fields after the command (which may hold spaces): state ppid pgrp session ...
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:
                os.kill(int(d.name), 9)
        except (OSError, ValueError, IndexError):
            pass


@pytest.fixture(scope="session")
def serve_port() -> int:
    """Serve's HTTP port: fixed for the session because http_options cannot change once Serve runs."""
    return free_port()


def serve_deploy(ray_head: dict, port: int, apps: list[dict], path: Path) -> str:
    """`serve deploy` a config with these applications (declarative: it replaces the previous set)."""
    path.write_text(
        json.dumps(
            {
                "proxy_location": "HeadOnly",
                "http_options": {"host": "127.0.0.1", "port": port},
                "applications": apps,
            }
        )
    )
    ray_cli("serve", "deploy", str(path), "--address", ray_head["dashboard"], env=ray_head["env"])
    return f"http://127.0.0.1:{port}"


def ray_cli(*args: str, env: dict, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    deadline = time.monotonic() + 90
    while True:
        p = subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        # a head that has just started may not have its job agent yet: Ray says to try again later
        if p.returncode == 0 or "No available agent" not in p.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    if check and p.returncode != 0:
        raise AssertionError(f"ray {args} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def rebuild(
    ray_head: dict, package: Path, catalog: Path, registry: Path, *extra: str, check: bool = True
) -> subprocess.CompletedProcess:
    """The rebuild job's driver with a model package, connected to the session's Ray head. Its index is
    Flat unless `extra` names another: `auto` measures several index families (~5 s of CPU per build),
    which the tests about the index choice do (live_a, the submitted job), not every test that rebuilds."""
    index = () if "--index" in map(str, extra) else ("--index", "flat")
    return run_module(
        "jobs.rebuild_index", "--package", package, "--catalog", catalog, "--registry", registry,
        "--address", ray_head["gcs"], *index, *extra, env=ray_head["env"], check=check,
    )  # fmt: skip


def summary(p: subprocess.CompletedProcess) -> dict:
    line = next(x for x in p.stdout.splitlines() if x.startswith("SUMMARY "))
    return json.loads(line[len("SUMMARY ") :])


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
