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

    from facediff.ray_start import init_local_ray

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
        from facediff.ray_start import init_local_ray

        init_local_ray(RAY_NUM_CPUS, include_dashboard=False)
    return ray_cluster


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_config():
    """Factory: the shipped tiny UNet config with overrides (`key=value` strings)."""
    from facediff.config import load_config

    def make(overrides=()):
        return load_config(REPO / "configs" / "experiments" / "tiny" / "tiny_unet.yaml", list(overrides))

    return make


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """48 synthetic faces prepared into shards at 32 px (train 44, test 4), shared by the training tests."""
    from facediff.data.prepare.celebamask import prepare_celebamask
    from facediff.data.synthetic.celebamask import write_synthetic_celebamask

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_celebamask(root / "raw", n=48, size=64, seed=0, workers=2, progress=False)
    prepare_celebamask(root / "raw", root / "shards", image_size=32, mask_size=32, rows_per_shard=8, workers=2,
                       progress=False)
    return root / "shards"


def two_trial_grid(total_kimg: float) -> str:
    """A Tune grid of two short tiny-UNet trials run one after the other (FIFO, lr 2e-3 and 1e-3), one step per
    16 images, each step logged and every second step checkpointed."""
    return f"""
train_config: {REPO / "configs" / "experiments" / "tiny" / "tiny_unet.yaml"}
reproduces: nothing (test)
metric: loss
mode: min
overrides:
  trainer.num_workers: 1
  trainer.resources_per_worker: {{CPU: 0.5}}
  trainer.batch_size: 16
  trainer.checkpoint_every_kimg: 0.032
  trainer.log_every_steps: 1
  trainer.keep_last: 1
  trainer.total_kimg: {total_kimg}
search_space:
  optimizer.lr: {{grid: [2.0e-3, 1.0e-3]}}
scheduler: {{kind: fifo}}
resources_per_trial: {{CPU: 0.25}}
max_concurrent_trials: 1
"""


def report_recorder(path):
    """A Ray Train callback (it runs in the controller actor) that appends each report's per-rank metrics to
    `path`, one JSON list per report."""
    import json

    from ray.train import UserCallback

    class RecordReports(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            with open(path, "a") as f:
                f.write(json.dumps(metrics) + "\n")

    return RecordReports()
