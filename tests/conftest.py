"""Shared pytest fixtures. Add new fixtures below; keep each one independent of the others."""

from pathlib import Path

import pytest

# Declare more logical CPUs than this 2-core machine has: with num_cpus=2, two Train workers at 1 CPU each
# leave Ray Data no CPU and training waits forever without an error (measured: see the shared notes on Ray here).
RAY_NUM_CPUS = 4


def pytest_configure(config):
    config.addinivalue_line("markers", "ray: starts (or shares) a local Ray cluster; slow")


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from facediff.console import init_local_ray

    init_local_ray(RAY_NUM_CPUS, include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def ray_session(ray_cluster):
    """One local Ray cluster for the whole test session (ray.init costs seconds and ~1.7 GB); started again if a
    test module stopped it to run on a fresh one of its own (test_tune.py)."""
    if not ray_cluster.is_initialized():
        from facediff.console import init_local_ray

        init_local_ray(RAY_NUM_CPUS, include_dashboard=False)
    return ray_cluster


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_config():
    """Factory: the shipped tiny UNet config with overrides (`key=value` strings)."""
    from facediff.config import load_config

    def make(overrides=()):
        return load_config(REPO / "configs" / "experiments" / "tiny_unet.yaml", list(overrides))

    return make


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """48 synthetic faces prepared into shards at 32 px (train 44, test 4), shared by the training tests."""
    from facediff.data.prepare import prepare_celebamask
    from facediff.data.synthetic import write_synthetic_celebamask

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_celebamask(root / "raw", n=48, size=64, seed=0, workers=2, progress=False)
    prepare_celebamask(root / "raw", root / "shards", image_size=32, mask_size=32, rows_per_shard=8, workers=2,
                       progress=False)
    return root / "shards"
