"""Shared pytest fixtures: the local Ray cluster, the tiny config, and every dataset or export more than one test
file reads (built once per session here, never again in a test file)."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]  # the checkout; tests import it from here (`from conftest import REPO`)

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



@pytest.fixture
def tiny_config():
    """Factory: the shipped tiny UNet config with overrides (`key=value` strings)."""
    from facediff.config import load_config

    def make(overrides=()):
        return load_config(REPO / "configs" / "experiments" / "tiny" / "tiny_unet.yaml", list(overrides))

    return make


# ------------------------------------------------------------------------------------------ shared data
# Built once per session and read-only by convention: a test that changes one copies it to its tmp_path first.
CELEBAMASK_TREE = {"n": 48, "size": 64, "seed": 0}  # the default synthetic CelebAMask-HQ tree (train 44, test 4)
COCO_TREE = {"n": 16, "size": 320, "seed": 1, "val_fraction": 0.25}  # the default synthetic COCO tree


def _tree_factory(tmp_path_factory, name, write, defaults):
    """A session factory: `build(**kw)` writes a tree with `write` (`defaults` updated by `kw`) the first time those
    arguments are asked for and returns the same folder every later time."""
    made = {}

    def build(**kw):
        kw = defaults | kw
        key = tuple(sorted(kw.items()))
        if key not in made:
            made[key] = tmp_path_factory.mktemp(name) / "raw"
            write(made[key], workers=2, progress=False, **kw)
        return made[key]

    return build


@pytest.fixture(scope="session")
def synthetic_celebamask(tmp_path_factory):
    """Factory: a synthetic tree in CelebAMask-HQ's release layout, `CELEBAMASK_TREE` unless told otherwise."""
    from facediff.data.synthetic.celebamask import write_synthetic_celebamask

    return _tree_factory(tmp_path_factory, "celebamask", write_synthetic_celebamask, CELEBAMASK_TREE)


@pytest.fixture(scope="session")
def synthetic_shards(synthetic_celebamask, tmp_path_factory):
    """The default synthetic faces prepared into shards at 32 px (train 44, test 4), shared by the training tests."""
    from facediff.data.prepare.celebamask import prepare_celebamask

    out = tmp_path_factory.mktemp("synthetic") / "shards"
    prepare_celebamask(synthetic_celebamask(), out, image_size=32, mask_size=32, rows_per_shard=8, workers=2,
                       progress=False)
    return out


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory):
    """Factory: a synthetic tree of people scenes in COCO's layout, `COCO_TREE` unless told otherwise."""
    from facediff.data.synthetic.coco import write_synthetic_coco

    return _tree_factory(tmp_path_factory, "coco", write_synthetic_coco, COCO_TREE)


@pytest.fixture(scope="session")
def coco_shards(synthetic_coco, tmp_path_factory):
    """The default people scenes prepared at 64 px, the tiny ControlNet's size."""
    from facediff.data.prepare.coco import prepare_coco

    out = tmp_path_factory.mktemp("coco") / "shards"
    prepare_coco(synthetic_coco(), out, image_size=64, rows_per_shard=6, workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_export(synthetic_shards, tmp_path_factory):
    """The tiny UNet with weights no fresh build has (so a round trip cannot pass by chance), exported as training
    exports it, reading `synthetic_shards`; `expected.pt` beside the folder holds its state dict."""
    import torch

    from facediff.config import load_config
    from facediff.tasks import build_task

    cfg = load_config(REPO / "configs/experiments/tiny/tiny_unet.yaml", [f"data.path={synthetic_shards}", "eval.steps=2"])
    out = tmp_path_factory.mktemp("export") / "model"
    task = build_task(cfg)
    with torch.no_grad():
        for p in task.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    task.export(out)
    torch.save(task.state_dict(), out.parent / "expected.pt")
    return out


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


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (SQLite backend store, local artifact root); its URI."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=(root / "server.log").open("w"), stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):  # up to ~5 min on a loaded 2-core machine; a dead server fails at once
            assert server.poll() is None, (root / "server.log").read_text()[-2000:]
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=60)
def assert_grids(run, names, steps, shape):
    """A run's training-time sample grids (`train/sample_grid.py`): these PNGs of this shape in `RUN/samples`, and
    TensorBoard's `samples` image at these steps. Returns the grids' pixels."""
    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    paths = sorted((run / "samples").glob("*.png"))
    assert [p.name for p in paths] == names
    grids = [np.asarray(Image.open(p)) for p in paths]
    assert all(grid.shape == shape for grid in grids)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [image.step for image in events.Images("samples")] == steps
    return grids
