"""cluster.yaml against the autoscaler's own schema (ray/autoscaler/ray-schema.json) and the project's rules."""

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_passes_ray_validation(cluster):
    # Ray's own path (`ray up` does the same): fill the provider defaults, then validate against the schema
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert set(prepared["available_node_types"]) == {"head", "gpu_worker"}
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_worker"]["max_worker"] = 4  # a misspelt key must be refused
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(broken))


def test_cluster_yaml_follows_the_projects_rules(cluster):
    nodes = cluster["available_node_types"]
    gpu = nodes["gpu_worker"]
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= cluster["max_workers"]
    assert gpu["node_config"]["InstanceType"].startswith(("p4d", "p5"))  # 8x A100 / 8x H100
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start  # SSH tunnel only
    for commands in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token" in c and "ray start" in c for c in commands)  # token auth on
    assert any("auth_token" in dst for dst in cluster["file_mounts"])  # the same token on every node
    assert any("uv sync --frozen" in c for c in cluster["setup_commands"])  # installed from the lockfile
    assert any("/mnt/facediff" in c and "nfs" in c for c in cluster["initialization_commands"])  # shared storage
