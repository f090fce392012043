"""cluster.yaml against the autoscaler's own schema (ray/autoscaler/ray-schema.json) and the project's rules; the
set-up check of each node's NVIDIA driver (tools/check_cuda_driver.py)."""

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from conftest import REPO

CLUSTER = REPO / "cluster.yaml"


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


# ------------------------------------------------------------------------------- the NVIDIA driver at set-up
CHECK = CLUSTER.parent / "tools" / "check_cuda_driver.py"
GPU_INSTANCES = ("p3", "p4", "p5", "g4", "g5", "g6")


def node_setup_commands(prepared: dict, node_type: str) -> list[str]:
    """What Ray runs to set a node of this type up (after prepare_config merged setup_commands into the head's and
    workers' lists; a node type's own worker_setup_commands replaces the merged list, autoscaler.py)."""
    if node_type == prepared["head_node_type"]:
        return prepared["head_setup_commands"]
    return prepared["available_node_types"][node_type].get("worker_setup_commands", prepared["worker_setup_commands"])


def test_every_node_checks_its_driver_after_installing_torch(cluster):
    prepared = prepare_config(copy.deepcopy(cluster))
    for name, node in prepared["available_node_types"].items():
        commands = node_setup_commands(prepared, name)
        checks = [i for i, c in enumerate(commands) if "tools/check_cuda_driver.py" in c]
        sync = [i for i, c in enumerate(commands) if "uv sync --frozen" in c]
        assert checks and sync and checks[0] > sync[0], (name, commands)  # it runs the locked torch
        if node["node_config"]["InstanceType"].startswith(GPU_INSTANCES):
            assert "--expect-gpu" in commands[checks[0]], (name, commands)
    # the requirement is stated where the image is chosen
    assert "580.65.06" in CLUSTER.read_text()


def run_check(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"PATH": path} if path is not None else {})}
    return subprocess.run([sys.executable, str(CHECK), *args], capture_output=True, text=True, env=env, timeout=120)


def test_the_check_names_both_versions_when_the_driver_is_too_old():
    old = run_check("--driver", "535.183.01", "--minimum", "580.65.06")
    assert old.returncode == 1 and old.stdout == ""
    lines = old.stderr.strip().splitlines()
    assert len(lines) == 1 and "535.183.01" in lines[0] and "580.65.06" in lines[0], old.stderr
    for adequate in ("580.65.06", "580.100.1", "595.45.04"):  # compared as numbers: 580.100 is newer than 580.65
        ok = run_check("--driver", adequate, "--minimum", "580.65.06")
        assert ok.returncode == 0 and ok.stderr == "" and adequate in ok.stdout, ok
    assert run_check("--driver", "580.9", "--minimum", "580.65.06").returncode == 1
    assert run_check("--driver", "latest").returncode == 2  # not a version: a usage error


def test_the_default_minimum_follows_the_cuda_of_the_installed_torch():
    import torch

    spec = importlib.util.spec_from_file_location("check_cuda_driver", CHECK)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    minimum = check.MINIMUM_DRIVER[int(torch.version.cuda.split(".")[0])]
    below = ".".join(str(p) for p in (check.parse_version(minimum)[0] - 1, 0))
    result = run_check("--driver", below)
    assert result.returncode == 1 and minimum in result.stderr and torch.version.cuda in result.stderr


def fake_nvidia_smi(folder: Path, script: str) -> str:
    tool = folder / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\n{script}\n")
    tool.chmod(0o755)
    return str(folder)


def test_a_node_is_read_through_nvidia_smi_and_torch(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_check(path=str(empty)).returncode == 0  # no driver at all: a CPU node (the head)
    missing = run_check("--expect-gpu", path=str(empty))
    assert missing.returncode == 1 and "no NVIDIA driver on this GPU node" in missing.stderr
    old = run_check("--expect-gpu", path=fake_nvidia_smi(tmp_path, "echo 470.82.01; echo 470.82.01"))
    assert old.returncode == 1 and "470.82.01" in old.stderr and len(old.stderr.strip().splitlines()) == 1
    broken = run_check("--expect-gpu", path=fake_nvidia_smi(
        tmp_path, "echo \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"; exit 9"))
    assert broken.returncode == 1 and "couldn't communicate" in broken.stderr
    import torch

    if torch.cuda.is_available():
        return  # the last case needs a torch that sees no GPU
    # a new enough driver, but this machine's torch sees no GPU: the set-up must still fail
    blind = run_check("--expect-gpu", path=fake_nvidia_smi(tmp_path, "echo 999.1.1"))
    assert blind.returncode == 1 and "999.1.1" in blind.stderr and "torch.cuda.is_available() is false" in blind.stderr
