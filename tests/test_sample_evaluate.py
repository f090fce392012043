"""`facediff sample` and `facediff evaluate` on an exported tiny model (no training needed to test the plumbing)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from facediff.cli import app
from facediff.sampling import batch_generator, generate, load_model
from facediff.tasks import build_task


@pytest.fixture(scope="module")
def exported(tmp_path_factory, synthetic_shards):
    from facediff.config import load_config
    from conftest import REPO

    cfg = load_config(REPO / "configs/experiments/tiny_unet.yaml", [f"data.path={synthetic_shards}", "eval.steps=2"])
    out = tmp_path_factory.mktemp("export")
    task = build_task(cfg)
    with torch.no_grad():  # weights no fresh build has, so the round trip cannot pass by chance
        for p in task.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    task.export(out)
    torch.save(task.state_dict(), out.parent / "expected.pt")
    return out


def test_exported_model_round_trips(exported):
    cfg, task = load_model(exported)
    expected = torch.load(exported.parent / "expected.pt", weights_only=True)
    assert cfg.model.family == "unet" and (exported / "model_index.json").is_file()
    loaded = task.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_sample_cli_writes_grid_and_images(exported, tmp_path):
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(app, ["sample", str(exported), "--n", "5", "--out", str(out), "--steps", "2",
                                      "--sampler", "dpm++", "--batch-size", "2", "--individual", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 + 2 * 34, 2 + 3 * 34, 3)  # 5 images of 32 px in a 3x2 grid with 2 px gutters
    assert len(list((tmp_path / "x").glob("*.png"))) == 5


def test_batches_get_distinct_seeds(exported):
    _, task = load_model(exported)
    images = generate(task, 4, "ddim", 2, seed=3, batch_size=2)
    assert not np.array_equal(images[:2], images[2:])  # the second batch is not a copy of the first
    assert np.array_equal(images, generate(task, 4, "ddim", 2, seed=3, batch_size=2))
    assert batch_generator(3, 0).initial_seed() != batch_generator(3, 1).initial_seed()


def test_evaluate_cli_reports_labelled_fallback(exported):
    result = CliRunner().invoke(app, ["evaluate", str(exported), "--set", "eval.num_samples=6"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])
    assert list(metrics) == ["fd_mtcnn_onet"] and metrics["fd_mtcnn_onet"] > 0


def test_sample_names_what_is_missing(tmp_path):
    result = CliRunner().invoke(app, ["sample", str(tmp_path)])
    assert result.exit_code == 2 and "neither a run folder" in result.output
