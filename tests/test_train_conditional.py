"""The latent conditional family through Ray Train + DeepSpeed: train, evaluate (conditional), export, sample."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import assert_grids

from facediff.cli.main import app
from facediff.config import load_config
from facediff.train.run_log import read_metrics
from facediff.train.run import train

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_session")]


def test_tiny_conditional_model_trains_evaluates_and_samples_by_attribute(synthetic_shards, tmp_path):
    cfg = load_config("configs/experiments/tiny/tiny_lc_unet_seg.yaml", [
        f"data.path={synthetic_shards}", f"trainer.storage_path={tmp_path / 'runs'}", "trainer.run_name=lc",
        "trainer.batch_size=4", f"trainer.total_kimg={4 * 8 / 1000}", "trainer.checkpoint_every_kimg=0.032",
        "trainer.log_every_steps=1", "trainer.zero_stage=3", "trainer.precision=bf16",  # production's precision
        "eval.every_kimg=0.032", "eval.steps=2",
        "eval.batch_size=4", "eval.attribute_accuracy=false",  # covered without Ray in test_conditional.py
        "eval.log_images_every_kimg=0.016", "eval.sample_grid_steps=2",  # training-time grids at steps 2 and 4
    ])
    run = train(cfg)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss_infonce"] >= 0 and 0 < r["loss_mse"] < 10 for r in rows)  # finite: bf16 under ZeRO-3
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["loss_mse"] + 0.1 * rows[-1]["loss_infonce"], rel=1e-4)
    assert "fid" not in rows[-1] and rows[-1]["fd_mtcnn_onet"] > 0  # conditional samples of each test record
    # rank 0 drew the grid from the EMA gathered from both ranks' ZeRO-3 parts (a collective every rank joins)
    first, last = assert_grids(run, ["kimg_00000.016.png", "kimg_00000.032.png"], [2, 4], (2 + 3 * 34, 2 + 3 * 34, 3))
    assert not np.array_equal(first, last)  # the same faces, from the EMA two steps on
    export = run / "export"
    assert (export / "unet" / "config.json").is_file() and (export / "condition_encoder").is_dir()

    out = tmp_path / "smiling.png"
    result = CliRunner().invoke(app, ["sample", str(export), "--n", "3", "--steps", "2", "--out", str(out),
                                      "--attributes", "Smiling,Eyeglasses", "--set", "eval.attribute_guidance=2"])
    assert result.exit_code == 0, result.output
    assert np.asarray(Image.open(out)).shape == (2 + 2 * 34, 2 + 2 * 34, 3)  # 3 samples tile a 2x2 grid
    result = CliRunner().invoke(app, ["sample", str(run), "--n", "2", "--steps", "2", "--out", str(out),
                                      "--from-test"])
    assert result.exit_code == 0, result.output
    bad = CliRunner().invoke(app, ["sample", str(export), "--attributes", "Smilling"])
    assert bad.exit_code == 2 and "unknown attributes ['Smilling']" in bad.output
    assert json.loads((run / "checkpoint_000000004" / "trainer_state.json").read_text())["step"] == 4
