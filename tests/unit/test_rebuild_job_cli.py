"""The rebuild job's adapter, without Ray: its CLI and defaults, its timeout's exit code, and the niceness,
device and resources of its workers (the Ray actor class, run in-process)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray

from core.rebuild import parts
from core.rebuild.build import IndexOptions, embed_settings
from core.rebuild.embed import Embedder, embeddings_to_numpy
from core.storage.datasets import split_table, write_dataset
from examples.movielens.features import encode_item_rows
from jobs import embed_data, rebuild_index
from jobs.common import lower_priority, run_main
from jobs.embed_data import PartEmbedder, actor_device
from jobs.rebuild_index import RebuildConfig, parse
from jobs.worker_pool import AssemblyWorker, actor_args, actor_options
from tests.unit.tiny_build import SCHEMA, make_checkpoint

BASE = ["--checkpoint", "c", "--catalog", "d/catalog"]


# ---- CLI and defaults --------------------------------------------------------------------------------


def test_defaults_are_the_config_dataclasses_defaults():
    assert parse(BASE) == RebuildConfig(checkpoint=Path("c"), catalog=Path("d/catalog"))


def test_argparse_takes_its_defaults_from_the_dataclasses(monkeypatch):
    """Change a default in the dataclass and the CLI follows: there is no second copy to forget."""
    changed = {"batch_size": 1234, "timeout_s": 60.0, "nice": 7, "num_workers": 3, "registry": Path("x")}
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


def test_the_embedding_actor_lowers_its_priority_before_loading_the_model(monkeypatch, tmp_path):
    events = []

    class FakeEmbedder:
        version = "v"

        def __init__(self, checkpoint, device, threads, precision):
            events.append(("embedder", device))

    monkeypatch.setattr(embed_data, "Embedder", FakeEmbedder)
    renice = lambda n: events.append(("nice", n))  # noqa: E731
    settings = {"checkpoint_version": "v", "weights_sha256": "w", "precision": "fp32", "batch_size": 2}
    fake = {"renice": renice, "node_id": lambda: "n1", "actor_id": lambda: "a1"}
    PartEmbedder("ck", str(tmp_path), settings, 1, nice=7, assigned_gpus=lambda: [], **fake)
    PartEmbedder("ck", str(tmp_path), settings, 1, nice=0, assigned_gpus=lambda: [0], **fake)
    assert events[:4] == [("nice", 7), ("embedder", "cpu"), ("nice", 0), ("embedder", "cuda:0")]
    params = inspect.signature(PartEmbedder).parameters
    assert params["renice"].default is lower_priority and params["assigned_gpus"].default is ray.get_gpu_ids
    with pytest.raises(ValueError, match="loaded package v from ck, the rebuild embeds other"):
        PartEmbedder(
            "ck", str(tmp_path), {**settings, "checkpoint_version": "other"}, 1, assigned_gpus=list, **fake
        )


def test_pool_flags_nice_and_resources_reach_the_embedding_actors(tmp_path):
    ck = make_checkpoint(tmp_path / "ck")
    cfg = dataclasses.replace(
        parse(["--checkpoint", str(ck), "--catalog", "d/catalog", "--nice", "6", "--num-workers", "2",
               "--max-workers", "5", "--cpus-per-worker", "0.5", "--resources-per-worker", "gpu_pool=1"]),
        torch_threads=0,  # leave this test process's torch threads as they are
    )  # fmt: skip
    table = encode_item_rows(
        [
            {"item_id": 10 + i, "title": f"t {i}", "genres": "Drama", "year": 2000, "tags": ""}
            for i in range(5)
        ],
        SCHEMA,
    )
    write_dataset(tmp_path / "cat", split_table(table, 1), kind="catalog", source={})
    [task] = parts.plan("items", sorted((tmp_path / "cat").glob("*.parquet")))
    settings = embed_settings(Embedder(ck).model, "fp32", 2)
    kw = embed_data.map_kwargs(ck, tmp_path / "parts", settings, rebuild_index.pool_options(cfg))
    assert kw["resources"] == {"gpu_pool": 1.0} and kw["num_cpus"] == 0.5 and kw["num_gpus"] is None
    assert (kw["compute"].min_size, kw["compute"].max_size, kw["batch_size"]) == (2, 5, 1)
    assert kw["runtime_env"]["env_vars"]["OMP_WAIT_POLICY"] == "PASSIVE"
    gpu = rebuild_index.pool_options(
        parse([*BASE, "--num-gpus-per-worker", "1", "--resources-per-worker", "gpu_pool=1"])
    )
    kw_gpu = embed_data.map_kwargs(ck, tmp_path / "parts", settings, gpu)  # what a GPU pool's actors reserve
    assert kw_gpu["num_gpus"] == 1.0 and kw_gpu["resources"] == {"gpu_pool": 1.0}
    assert kw_gpu["compute"].min_size == kw_gpu["compute"].max_size == 1
    # what an actor does with those arguments, in-process: Ray's GPU list, node and the OS's nice faked
    niced = []
    actor = PartEmbedder(**kw["fn_constructor_kwargs"], assigned_gpus=lambda: [], renice=niced.append,
                         node_id=lambda: "n7", actor_id=lambda: "a7")  # fmt: skip
    assert niced == [6] and actor.embedder.device.type == "cpu"
    out = actor(pa.Table.from_pylist([dataclasses.asdict(task)]))
    rec = json.loads(out["record"][0].as_py())
    assert (
        out["rows"].to_pylist() == [5]
        and rec["node"] == "n7"
        and rec["checkpoint_version"] == settings.checkpoint_version
    )
    ids, x = parts.open_part(tmp_path / "parts" / task.key)
    assert ids.tolist() == list(range(10, 15))
    np.testing.assert_allclose(x, embeddings_to_numpy(Embedder(ck).items(table)), atol=1e-6)
    actor(pa.Table.from_pylist([dataclasses.asdict(task)]))  # a retried task: the same part, committed again
    assert len(list((tmp_path / "parts" / embed_data.ATTEMPTS).iterdir())) == 2
    assert parts.open_part(tmp_path / "parts" / task.key)[0].tolist() == list(range(10, 15))
    assert [p.name.split(".")[0] for p in (tmp_path / "parts" / embed_data.STARTS).iterdir()] == ["a7"]


def test_the_assembly_workers_lower_their_priority_and_reserve_their_cpus():
    niced = []
    w = AssemblyWorker(*actor_args(parse([*BASE, "--nice", "4"])), renice=niced.append, node_id=lambda: "n2")
    assert niced == [4] and w.ready() == "n2"
    opts = actor_options(parse([*BASE, "--cpus-per-worker", "0.5", "--resources-per-worker", "gpu_pool=1",
                                "--num-gpus-per-worker", "1"]))  # fmt: skip
    assert opts["num_cpus"] == 0.5 and opts["scheduling_strategy"] == "SPREAD" and "num_gpus" not in opts
    assert opts["resources"] == {"gpu_pool": 1.0}


def test_layout_budget_shards_nlist_and_resume_parse_and_bad_values_are_refused(capsys):
    cfg = parse([*BASE, "--layout", "sharded", "--memory-budget", "1.5G", "--shards", "8", "--nlist", "4096",
                 "--resume", "20261202T000000-abcd1234-ef01"])  # fmt: skip
    assert (cfg.index.layout, cfg.index.memory_budget, cfg.index.shards, cfg.index.nlist) == (
        "sharded", int(1.5 * 2**30), 8, 4096,
    )  # fmt: skip
    assert cfg.resume == "20261202T000000-abcd1234-ef01"
    assert parse([*BASE, "--memory-budget", "512M"]).index.memory_budget == 512 * 2**20
    for bad in (["--layout", "spread"], ["--memory-budget", "lots"], ["--shards", "-1"], ["--nlist", "-4"]):
        with pytest.raises(SystemExit) as e:
            parse([*BASE, *bad])
        assert e.value.code == 2, bad
    assert "expected a size such as 4G" in capsys.readouterr().err
