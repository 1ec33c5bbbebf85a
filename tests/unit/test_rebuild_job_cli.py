"""The rebuild job's adapter, without Ray: its CLI and defaults, its timeout's exit code, and the niceness
and device its Ray Data callable class applies."""

from __future__ import annotations

import dataclasses
import inspect
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray
import ray.data

from core.embed import Embedder, embeddings_to_numpy
from core.features import ITEM_FEATURE_COLUMNS, encode_item_rows
from core.rebuild import IndexOptions
from jobs import rebuild_index
from jobs.common import lower_priority, run_main
from jobs.rebuild_index import EmbedBatches, RebuildConfig, actor_device, embed_dataset, parse
from tests.conftest import REPO
from tests.unit.tiny_build import SCHEMA, make_checkpoint

BASE = ["--checkpoint", "c", "--catalog", "d/catalog"]


# ---- CLI and defaults --------------------------------------------------------------------------------


def test_defaults_are_the_config_dataclasses_defaults():
    assert parse(BASE) == RebuildConfig(checkpoint=Path("c"), catalog=Path("d/catalog"))


def test_argparse_takes_its_defaults_from_the_dataclasses(monkeypatch):
    """Change a default in the dataclass and the CLI follows: there is no second copy to forget."""
    changed = {"batch_size": 1234, "timeout_s": 60.0, "nice": 7, "read_cpus": 0.5, "registry": Path("x")}
    for name, value in changed.items():
        monkeypatch.setattr(RebuildConfig, name, value)
    monkeypatch.setattr(IndexOptions, "target_recall", 0.9)
    monkeypatch.setattr(IndexOptions, "kind", "hnsw")
    cfg = parse(BASE)
    assert {name: getattr(cfg, name) for name in changed} == changed
    assert (cfg.index.target_recall, cfg.index.kind) == (0.9, "hnsw")


def test_help_shows_defaults_nice_and_what_custom_resources_do(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "rows per embedding batch (default: 8192)" in out
    assert "--nice N" in out and "(default: 0)" in out
    assert "keeps them off serving nodes" in out
    assert "(default: None)" not in out and "(default: False)" not in out


def test_nice_resources_and_timeout_parse_and_bad_values_are_refused(capsys):
    cfg = parse([*BASE, "--nice", "5", "--resources-per-worker", "gpu_pool=1", "--resources-per-worker", "x=0.5",
                 "--timeout-s", "0.5", "--no-users"])  # fmt: skip
    assert cfg.nice == 5 and cfg.timeout_s == 0.5 and cfg.users is None
    assert cfg.resources_per_worker == (("gpu_pool", 1.0), ("x", 0.5))
    for bad in (["--nice", "-1"], ["--nice", "20"], ["--timeout-s", "0"], ["--resources-per-worker", "a=b"]):
        with pytest.raises(SystemExit) as e:
            parse([*BASE, *bad])
        assert e.value.code == 2, bad
    assert "--nice must be in 0..19 (got 20)" in capsys.readouterr().err


# ---- the timeout's exit code -------------------------------------------------------------------------


def test_timeout_exits_2_with_one_failed_line_and_no_traceback(monkeypatch, capsys):
    monkeypatch.setattr(rebuild_index, "rebuild", lambda cfg, on_phase=None: time.sleep(30))
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as e:
        run_main(rebuild_index.main, [*BASE, "--timeout-s", "0.2"])
    assert e.value.code == 2 and time.monotonic() - t0 < 10
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if line.startswith("FAILED:")]
    assert failed == ["FAILED: rebuild exceeded --timeout-s 0.2; nothing was published"], err
    assert "Traceback" not in err
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_main_leaves_no_alarm_and_restores_the_signal_handler(monkeypatch):
    monkeypatch.setattr(rebuild_index, "rebuild", lambda cfg, on_phase=None: {})
    before = signal.getsignal(signal.SIGALRM)
    assert rebuild_index.main([*BASE, "--timeout-s", "5"]) == 0
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) == before


# ---- the embedding callable: niceness first, then the device from Ray's GPUs ------------------------


def test_actor_device_comes_from_the_gpus_ray_assigned():
    assert actor_device([]) == "cpu"
    assert actor_device([3]) == "cuda:0"  # CUDA_VISIBLE_DEVICES holds only the assigned one


def test_the_callable_lowers_its_priority_before_loading_the_model(monkeypatch):
    events = []

    class FakeEmbedder:
        def __init__(self, checkpoint, device, threads, precision):
            events.append(("embedder", device))
            self.items = self.users = None

    monkeypatch.setattr(rebuild_index, "Embedder", FakeEmbedder)
    renice = lambda n: events.append(("nice", n))  # noqa: E731
    EmbedBatches("ck", "items", 1, nice=7, assigned_gpus=lambda: [], renice=renice)
    EmbedBatches("ck", "users", 1, nice=0, assigned_gpus=lambda: [0], renice=renice)
    assert events == [("nice", 7), ("embedder", "cpu"), ("nice", 0), ("embedder", "cuda:0")]
    params = inspect.signature(EmbedBatches).parameters
    assert params["renice"].default is lower_priority and params["assigned_gpus"].default is ray.get_gpu_ids


class _FakeDataset:
    """Records what embed_dataset asks of Ray Data."""

    def __init__(self, calls):
        self.calls = calls

    def select_columns(self, cols):
        self.calls["columns"] = cols
        return self

    def map_batches(self, udf, **kwargs):
        self.calls["udf"], self.calls["map_batches"] = udf, kwargs
        return self

    def write_parquet(self, path, **kwargs):
        self.calls["write"] = path


def test_nice_and_resources_reach_the_actors_through_embed_dataset(monkeypatch, tmp_path):
    calls = {}
    monkeypatch.setattr(ray.data, "read_parquet", lambda paths, **kw: _FakeDataset(calls))
    ck = make_checkpoint(tmp_path / "ck")
    cfg = dataclasses.replace(
        parse(["--checkpoint", str(ck), "--catalog", "d/catalog", "--nice", "6",
               "--resources-per-worker", "gpu_pool=1"]),
        torch_threads=0,  # leave this test process's torch threads as they are
    )  # fmt: skip
    embed_dataset(cfg, [tmp_path / "part.parquet"], ITEM_FEATURE_COLUMNS, "items", tmp_path / "out")
    mb = calls["map_batches"]
    assert calls["udf"] is EmbedBatches and mb["resources"] == {"gpu_pool": 1.0}
    assert mb["fn_constructor_kwargs"]["nice"] == 6
    # what a Ray Data actor does with those kwargs, in-process: Ray's GPU list and the OS's nice faked
    niced = []
    udf = EmbedBatches(**mb["fn_constructor_kwargs"], assigned_gpus=lambda: [], renice=niced.append)
    assert niced == [6] and udf.embedder.device.type == "cpu"
    batch = encode_item_rows(
        [
            {"item_id": 10 + i, "title": f"t {i}", "genres": "Drama", "year": 2000, "tags": ""}
            for i in range(5)
        ],
        SCHEMA,
    ).select(list(ITEM_FEATURE_COLUMNS))
    out = udf(batch)
    assert isinstance(out, pa.Table) and out["item_id"].to_pylist() == list(range(10, 15))
    want = embeddings_to_numpy(Embedder(ck).items(batch))
    np.testing.assert_allclose(embeddings_to_numpy(out), want, atol=1e-6)


def test_lower_priority_moves_every_thread_of_the_process():
    """Linux keeps a nice value per thread: a thread that existed before must be moved too, and one
    started after inherits it. Run in a child process: a process can never lower its nice value again."""
    script = """
import os, threading
from jobs.common import lower_priority
prio = lambda tid: os.getpriority(os.PRIO_PROCESS, tid)
base = prio(0)
stop = threading.Event()
ids = []
def wait():
    ids.append(threading.get_native_id())
    stop.wait()
early = threading.Thread(target=wait); early.start()
while not ids: pass
assert lower_priority(0) == base
value = lower_priority(3)
late = threading.Thread(target=wait); late.start()
while len(ids) < 2: pass
print(base, value, prio(0), prio(ids[0]), prio(ids[1]))
stop.set()
"""
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    base, value, *threads = map(int, p.stdout.split())
    assert value == min(base + 3, 19) and threads == [value] * 3
