"""cluster.yaml is valid for Ray's cluster launcher (its own JSON schema and checks)."""

from pathlib import Path

import yaml

from tests.conftest import REPO


def test_cluster_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(Path(REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # raises jsonschema.ValidationError / ValueError if invalid
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0  # the driver never takes a GPU
    assert types["gpu_worker"]["resources"]["GPU"] == 1 and types["gpu_worker"]["resources"]["gpu_pool"] == 1
    assert any("pip install" in c and "skewless" in c for c in config["setup_commands"])
    # every node starts with token authentication on, and the dashboard is not exposed beyond loopback
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "--dashboard-host=0.0.0.0" not in " ".join(starts)
    assert "/home/ubuntu/.ray/auth_token" in config["file_mounts"]
