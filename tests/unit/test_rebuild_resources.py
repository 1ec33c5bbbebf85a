"""The rebuild job refuses, before any work, an actor pool the cluster cannot place (it would hang)."""

import pytest

from jobs.rebuild_index import check_resources, parse


def _cfg(*flags):
    return parse(["--checkpoint", "c", "--catalog", "d/catalog", "--registry", "r", "--no-users", *flags])


def test_a_pool_larger_than_the_cluster_is_refused_naming_the_numbers():
    with pytest.raises(RuntimeError, match=r"CPU: needs 3, cluster has 2"):
        check_resources(_cfg("--num-workers", "3"), {"CPU": 2.0})
    check_resources(_cfg("--num-workers", "2"), {"CPU": 2.0})  # the workers read their own partitions


def test_gpu_and_custom_resources_are_checked_and_the_check_can_be_skipped():
    cfg = _cfg("--num-gpus-per-worker", "1", "--resources-per-worker", "gpu_pool=1")
    with pytest.raises(RuntimeError, match=r"GPU: needs 1, cluster has 0.*gpu_pool: needs 1, cluster has 0"):
        check_resources(cfg, {"CPU": 16.0})
    check_resources(cfg, {"CPU": 16.0, "GPU": 1.0, "gpu_pool": 1.0})
    check_resources(_cfg("--num-workers", "8", "--skip-resource-check"), {"CPU": 2.0})
