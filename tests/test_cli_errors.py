"""Bad input through the CLI, as a user meets it: one `error:` line naming the file or option, exit code 2, no
traceback; good data never lost; damaged checkpoints skipped. No Ray: run folders are written by hand in the
layout a training run leaves (`facediff/train/checkpoint.py`)."""

import json
import logging
import shutil
from dataclasses import asdict

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from facediff.cli.main import app
from facediff.config import dump_config, load_config
from facediff.data import celebamask
from facediff.data.prepare.celebamask import assign_splits
from facediff.data.shards import read_manifest, shard_paths
from facediff.runs.load import load_model
from facediff.tasks import build_task
from facediff.train.checkpoint import EMA_FILE, STATE_FILE, TrainState

from conftest import CELEBAMASK_TREE, REPO

TINY = REPO / "configs" / "experiments" / "tiny" / "tiny_unet.yaml"
runner = CliRunner()


def user_error(result, *names) -> str:
    """The single error line of a failed command, checked to name every one of `names`."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()  # progress bars (prepare) may come before it
    assert lines[-1].startswith("error: ") and sum("error" in line for line in lines) == 1, result.stderr
    for name in names:
        assert str(name) in lines[-1], lines[-1]
    return lines[-1]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def never_sample(monkeypatch):
    """Sampling must not start when the options are bad: reaching it fails the command with exit code 1."""
    def refuse(*args, **kwargs):
        raise AssertionError("sampling started")
    monkeypatch.setattr("facediff.sampling.generate", refuse)


# ------------------------------------------------------------------------------------------------ config
def test_config_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("description: caf\xe9\n".encode("latin-1"))
    user_error(invoke("config", path), path, "UTF-8")


# ---------------------------------------------------------------------------------------------- train
def test_a_config_of_one_regime_on_the_other_dataset_is_refused_before_training(synthetic_shards, tmp_path):
    from facediff.train.run import check_inputs

    cfg = load_config(TINY, [f"data.path={synthetic_shards}", "data.train_records=2700"])
    with pytest.raises(ValueError, match=r"data.train_records: the config trains on 2700 records, but .*"
                                         r"manifest.json holds 44 in split 'train'"):
        check_inputs(cfg)
    check_inputs(load_config(TINY, [f"data.path={synthetic_shards}", "data.train_records=44"]))
    result = runner.invoke(app, ["train", str(TINY), f"data.path={synthetic_shards}",
                                "data.train_records=2700", f"trainer.storage_path={tmp_path / 'runs'}"])
    assert result.exit_code == 2 and "--train-size 2700" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "runs").exists()  # nothing started, nothing written


# ------------------------------------------------------------------------------------- runs and exports
def fake_run(tmp_path, cfg, steps, weights_cfg=None):
    """A run folder as training leaves it: config.yaml and checkpoint_<step> folders, each with the EMA
    weights (distinct per step), trainer_state.json and a DeepSpeed `state/` folder."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    task = build_task(weights_cfg or cfg)
    for step in steps:
        folder = run / f"checkpoint_{step:09d}"
        (folder / "state").mkdir(parents=True)
        (folder / "latest").write_text("state")
        ema = {f"ema.{name}": p.detach().clone() + step for name, p in task.named_parameters() if p.requires_grad}
        save_file({**ema, "ema_step": torch.tensor(step)}, str(folder / EMA_FILE))
        (folder / STATE_FILE).write_text(json.dumps(asdict(TrainState(step=step))))
    return run


@pytest.fixture
def tiny(synthetic_shards):
    return load_config(TINY, [f"data.path={synthetic_shards}", "eval.steps=1", "eval.num_samples=4"])


def first_weight(task):
    return next(p for p in task.parameters() if p.requires_grad).detach()


def test_damaged_newest_checkpoint_is_skipped_for_the_one_before(tmp_path, tiny, caplog, monkeypatch):
    import facediff.threads

    monkeypatch.setattr(facediff.threads, "idle_cores", lambda: 0.0)  # a busy machine: the CLI's CPU work takes 1 thread
    run = fake_run(tmp_path, tiny, [1, 2])
    ema = run / "checkpoint_000000002" / EMA_FILE
    ema.write_bytes(ema.read_bytes()[: ema.stat().st_size // 2])  # an upload cut short
    with caplog.at_level(logging.WARNING):
        _, task = load_model(run)
    fresh = first_weight(build_task(tiny))
    assert torch.allclose(first_weight(task), fresh + 1)  # checkpoint 1's weights (fresh + step)
    skips = [r.getMessage() for r in caplog.records if "skipping damaged checkpoint" in r.getMessage()]
    assert len(skips) == 1 and "checkpoint_000000002" in skips[0] and str(ema) in skips[0]

    out = tmp_path / "grid.png"
    busy = [f"facediff: driver: 1 of {facediff.threads.DEFAULT_THREADS} threads, cores busy"]
    try:
        result = invoke("sample", run, "--n", 2, "--steps", 1, "--out", out)
        assert result.exit_code == 0, result.output
        assert out.is_file()
        assert result.stderr.splitlines()[:1] == (busy if facediff.threads.DEFAULT_THREADS > 1 else [])
        assert torch.get_num_threads() == 1
        result = invoke("evaluate", run)
    finally:
        torch.set_num_threads(facediff.threads.DEFAULT_THREADS)
    assert result.exit_code == 0, result.output
    # the labelled fallback (not fid) and its kernel distance, each with a bootstrap interval
    assert set(json.loads(result.stdout.strip().splitlines()[-1])) == {
        f"{k}{end}" for k in ("fd_mtcnn_onet", "kd_mtcnn_onet") for end in ("", "_lo", "_hi")}
    # the protocol names the checkpoint that was scored (the damaged newer one skipped), printed and saved
    assert f"model: EMA weights of {run}/checkpoint_000000001 (step 1)" in result.stdout.splitlines()
    assert json.loads((run / "evaluation.json").read_text())["protocol"]["model"] == {
        "kind": "run checkpoint", "path": str(run), "checkpoint": "checkpoint_000000001", "step": 1, "weights": "ema"}


@pytest.mark.parametrize("damage", ["header too small", "truncated", "state missing"])
def test_only_damaged_checkpoints_is_one_line_naming_the_folder(tmp_path, tiny, damage, never_sample, caplog):
    run = fake_run(tmp_path, tiny, [1, 2])
    for folder in run.glob("checkpoint_*"):
        if damage == "header too small":
            (folder / EMA_FILE).write_bytes(b"\x01\x02\x03")
        elif damage == "truncated":
            (folder / EMA_FILE).write_bytes((folder / EMA_FILE).read_bytes()[:-10])
        else:
            (folder / STATE_FILE).unlink()
    line = user_error(invoke("sample", run, "--out", tmp_path / "x.png"), run / "checkpoint_000000002")
    assert "damaged" in line and "facediff train" in line
    user_error(invoke("evaluate", run), run / "checkpoint_000000002")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # the error line says it all


@pytest.mark.parametrize("weights", [
    ["model.block_out_channels=[16,32]", "model.norm_num_groups=8"],  # same names, other shapes
    ["model.layers_per_block=1"],  # other names
])
def test_ema_weights_of_another_architecture(tmp_path, tiny, weights):
    run = fake_run(tmp_path, tiny, [1], weights_cfg=load_config(TINY, weights))
    user_error(invoke("evaluate", run), run / "checkpoint_000000001" / EMA_FILE, "do not fit", "config.yaml")


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_export_with_damaged_weights(tmp_path, tiny_export, damage, never_sample):
    model = tmp_path / "model"
    shutil.copytree(tiny_export, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
        user_error(invoke("sample", model, "--out", tmp_path / "x.png"), weights, "truncated")
    else:
        weights.unlink()
        user_error(invoke("sample", model, "--out", tmp_path / "x.png"), model / "unet", "no weights file")


# ---------------------------------------------------------------------------------------------- sample
@pytest.mark.parametrize("args, option", [
    (["--steps", 0], "--steps 0"),
    (["--n", 0], "--n 0"),
    (["--batch-size", 0], "--batch-size 0"),
    (["--sampler", "euler"], "--sampler"),
    (["--attributes", ""], "--attributes ''"),
    (["--attributes", " , "], "--attributes"),
])
def test_sample_options_checked_before_sampling(tmp_path, tiny_export, args, option, never_sample):
    user_error(invoke("sample", tiny_export, "--out", tmp_path / "x.png", *args), option)
    assert not (tmp_path / "x.png").exists()


def test_sample_output_path_checked_before_sampling(tmp_path, tiny_export, never_sample):
    user_error(invoke("sample", tiny_export, "--out", tmp_path / "x.txt"), "--out", "x.txt", ".png")
    (tmp_path / "file").write_text("")
    user_error(invoke("sample", tiny_export, "--out", tmp_path / "file" / "x.png"), "--out", tmp_path / "file")
    user_error(invoke("sample", tiny_export, "--individual", tmp_path / "file" / "each"), "--individual")
    assert not (tmp_path / "x.txt").exists()


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_device_option_errors_are_one_line(command, tmp_path):
    result = runner.invoke(app, [command, str(tmp_path), "--device", "cuda" if not torch.cuda.is_available()
                                 else "gpu0"])
    assert result.exit_code == 2 and "--device" in result.output and "Traceback" not in result.output


# -------------------------------------------------------------------------------------------- evaluate
@pytest.mark.parametrize("records", [0, 1])
def test_evaluate_needs_two_test_records(tmp_path, tiny_export, synthetic_shards, records):
    data = tmp_path / "data"
    shutil.copytree(synthetic_shards, data)
    manifest = read_manifest(data)
    path = data / manifest["shards"]["test"][0]["path"]
    pq.write_table(pq.read_table(path).slice(0, 1), path)
    manifest["shards"]["test"] = manifest["shards"]["test"][:1] if records else []
    (data / "manifest.json").write_text(json.dumps(manifest))
    line = user_error(invoke("evaluate", tiny_export, "--set", f"data.path={data}"), data / "manifest.json", "'test'")
    assert f"holds {records} record" in line and "at least 2" in line


# --------------------------------------------------------------------------------------------- prepare
N = CELEBAMASK_TREE["n"]


@pytest.fixture
def tree(synthetic_celebamask):
    return synthetic_celebamask()


def prepare(tree, out, *args):
    return invoke("prepare", "celebamask", tree, out, "--image-size", 16, "--mask-size", 16, "--workers", 1, *args)


def test_failed_overwrite_keeps_the_old_dataset(tree, tmp_path):
    out = tmp_path / "out"
    assert prepare(tree, out).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    user_error(prepare(tree, out, "--overwrite", "--image-size", 0), "--image-size 0")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sum(pq.read_table(p).num_rows for s in ("train", "test") for p in shard_paths(out, s)) == N
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind

    result = prepare(tree, out, "--overwrite", "--train-size", 5)  # a good overwrite replaces it
    assert result.exit_code == 0, result.output
    assert read_manifest(out)["counts"] == {"train": 5, "test": 4}
    assert sum(1 for _ in (out / "train").glob("part-*.parquet")) == 1 and [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("args, option", [
    (["--test-size", 0], "--test-size 0"),
    (["--mask-size", 0], "--mask-size 0"),
    (["--rows-per-shard", 0], "--rows-per-shard 0"),
    (["--train-size", 0], "--train-size 0"),
    (["--image-format", "gif"], "--image-format"),
])
def test_prepare_options_checked_before_output(tree, tmp_path, args, option):
    user_error(prepare(tree, tmp_path / "out", *args), option)
    assert list(tmp_path.iterdir()) == []


def test_prepare_into_a_file(tree, tmp_path):
    (tmp_path / "out").write_text("mine")
    user_error(prepare(tree, tmp_path / "out"), tmp_path / "out", "not a folder")
    assert (tmp_path / "out").read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("lost", ["every image", "the test image"])
def test_dataset_without_records_is_an_error(tree, tmp_path, lost):
    root = tmp_path / "raw"
    shutil.copytree(tree, root)
    test_ids = assign_splits(list(range(N)), None, 300, None, seed=0)["test"]
    for image_id in range(N) if lost == "every image" else test_ids:
        celebamask.image_path(root, image_id).unlink()
    line = user_error(prepare(root, tmp_path / "out"), root, "no record", "image file missing")
    assert ("train/test" if lost == "every image" else "split test ") in line
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]  # nothing written, no staging folder left


def test_prepare_coco_split_left_empty_is_an_error(synthetic_coco, tmp_path):
    raw = synthetic_coco()
    line = user_error(invoke("prepare", "coco", raw, tmp_path / "out", "--no-faces", "--image-size", 32,
                             "--min-person-area", 0.99, "--workers", 1), raw, "--min-person-area", "no record")
    assert "0.1" in line  # the threshold table a user picks a working threshold from
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, option", [
    (["synthetic", "{out}", "--n", 0], "--n 0"),
    (["synthetic", "{out}", "--size", 15], "--size 15"),
    (["synthetic-coco", "{out}", "--val-fraction", 1], "--val-fraction 1"),
    (["coco", "{out}", "{out}2", "--image-size", 0], "--image-size 0"),
    (["coco", "{out}", "{out}2", "--face-threshold", 2], "--face-threshold 2"),
])
def test_other_prepare_options(tmp_path, args, option):
    out = tmp_path / "out"
    user_error(invoke("prepare", *[str(a).format(out=out) for a in args]), option)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, option", [(["--image-size", 0], "--image-size 0"), (["--actors", 0], "--actors 0"),
                                          (["--rows-per-shard", 0], "--rows-per-shard 0")])
def test_prepare_latents_options_checked_before_output_and_ray(synthetic_shards, tmp_path, monkeypatch, args, option):
    def no_ray(*a, **kw):
        raise AssertionError("Ray started")
    monkeypatch.setattr("facediff.data.prepare.latents._ensure_ray", no_ray)
    out = tmp_path / "out"
    shutil.copytree(synthetic_shards, out)  # an earlier dataset in OUT
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    user_error(invoke("prepare", "latents", synthetic_shards, out, "--preset", "tiny_vq", "--overwrite", *args), option)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
