"""`facediff demo --stages`: an unknown stage is refused before anything is written."""

from typer.testing import CliRunner

from facediff.cli.main import app


def test_unknown_demo_stage_is_one_line_exit_2_and_writes_nothing(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--stages", "pixel,lora"])
    assert result.exit_code == 2
    assert "--stages: unknown or no stages ['lora']; choose from pixel, conditional, sd_lora, controlnet" in result.output
    assert not out.exists()


def test_demo_configs_change_only_what_the_demo_measured():
    """The demo's models are the tiny presets plus the changes its measurements chose (configs/experiments/tiny/demo_*):
    x0 prediction for both, for the pixel UNet the fast 4-level shape, for the latent one batches of 16 a worker;
    nothing else may drift from the presets."""
    from facediff.config import load_config
    from facediff.demo import CONDITIONAL_CONFIG, CONFIG

    def flat(cfg):
        dump = cfg.model_dump()
        return {f"{section}.{key}": value for section in ("model", "diffusion", "trainer", "optimizer", "data", "eval")
                for key, value in dump[section].items()}

    pixel, tiny = flat(load_config(CONFIG)), flat(load_config(CONFIG.parent / "tiny_unet.yaml"))
    assert {k for k in pixel if pixel[k] != tiny[k]} == {
        "model.block_out_channels", "model.layers_per_block", "model.down_block_types", "model.up_block_types",
        "model.norm_num_groups", "diffusion.prediction_type"}
    assert pixel["diffusion.prediction_type"] == "sample" and pixel["model.block_out_channels"] == [16, 32, 64, 64]
    latent, tiny_latent = flat(load_config(CONDITIONAL_CONFIG)), flat(load_config(CONFIG.parent / "tiny_lc_unet.yaml"))
    assert {k: v for k, v in latent.items() if tiny_latent[k] != v} == {"diffusion.prediction_type": "sample",
                                                                         "trainer.batch_size": 16}


def test_demo_summary_names_each_runs_training_time_grids(tmp_path):
    from facediff.demo import _run_overrides, _training_grids

    assert "eval.log_images_every_kimg=4.0" in _run_overrides(tmp_path, tmp_path, 16.0)  # 4 grids a run, + the end
    run = tmp_path / "runs" / "demo_unet"
    (run / "samples").mkdir(parents=True)
    for name in ("kimg_00004.000.png", "kimg_00008.000.png"):
        (run / "samples" / name).write_bytes(b"")
    result = {"paths": {"run": run}}
    assert _training_grids(result) == [f"  training-time sample grids     {run / 'samples'}  (2, also in "
                                       f"TensorBoard: tensorboard --logdir {run}/tensorboard)"]
    assert result["paths"]["training_grids"] == run / "samples"  # in summary.json
    assert _training_grids({"paths": {"preview": tmp_path}}) == []  # a stage without a run lists none


def test_demo_summary_carries_the_memorisation_audit_of_a_stages_run(tiny_export, tmp_path):
    """Each face stage ends with `facediff evaluate RUN --memorisation` in process: the summary gets the fraction,
    the labelled weights (the random-init fallback here) and the pairs PNG, the run folder its evaluation.json."""
    import json
    import shutil
    from pathlib import Path

    from facediff.runs.memorisation import audit_run, summary_line

    model = shutil.copytree(tiny_export, tmp_path / "model")  # the audit writes into the evaluated folder
    audit = audit_run(model, ["eval.num_samples=4", "eval.memorisation_train_cap=8"], device="cpu")
    assert 0.0 <= audit["fraction"] <= 1.0 and audit["threshold"] > 0
    assert audit["features"] == "random_init"  # no VGGFace2 weights on this machine
    assert (audit["samples"], audit["train_faces"], audit["heldout_faces"]) == (4, 8, 4)
    assert audit["pairs_png"] == str(model / "memorisation_pairs.png") and Path(audit["pairs_png"]).is_file()
    saved = json.loads((model / "evaluation.json").read_text())
    assert audit["evaluation"] == str(model / "evaluation.json")
    assert saved["results"]["memorisation_fraction"] == audit["fraction"]
    line = summary_line(audit)
    assert line.startswith(f"  memorisation audit             {audit['fraction']:.3g} of 4 samples closer to one of 8 "
                           "training faces than 1% of 4 held-out faces (fallback features: random-init")
    assert line.endswith(f"closest pairs {model / 'memorisation_pairs.png'}")
