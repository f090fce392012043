"""`facediff train CONFIG --dry-run`: every stage on a tiny config (bf16, in-process DeepSpeed, no Ray), its
exit codes, the per-GPU memory formula, and (slow) one production config of each family at its real size with
`--random-weights`."""

import math
import os

import pytest
import torch
from typer.testing import CliRunner

from facediff.cli.main import app
from facediff.config import load_config
from facediff.models.info import describe
from facediff.train.dry_run import STAGES, StageFailed, dry_run
from facediff.train.engine import total_steps
from facediff.train.memory import GIB, per_gpu_estimate

from conftest import REPO

EXPERIMENTS = REPO / "configs" / "experiments"
TINY = EXPERIMENTS / "tiny" / "tiny_unet.yaml"
runner = CliRunner()


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


@pytest.fixture
def quiet_cwd(tmp_path, monkeypatch):
    """An empty working directory and a temporary folder of the test's own, to see what a dry run leaves."""
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr("tempfile.tempdir", str(tmp))
    return cwd, tmp


def test_tiny_bf16_dry_run_passes_every_stage_and_leaves_nothing(synthetic_shards, quiet_cwd):
    cwd, tmp = quiet_cwd
    cfg = load_config(TINY, [f"data.path={synthetic_shards}", "trainer.precision=bf16"])
    lines = []
    report = dry_run(cfg, "tiny_unet", echo=lines.append)

    assert report.passed and list(report.stages) == list(STAGES)
    assert [line.split()[2] for line in lines] == list(STAGES)  # one progress line a stage, in order
    assert report.resumed_step == report.steps == 1
    info = describe(cfg)
    assert (report.trainable, report.frozen) == (info[0]["trainable"], info[0]["frozen"]) == (1_002_883, 0)
    assert report.total_steps == total_steps(cfg, cfg.trainer.num_workers) == math.ceil(1000 / 16)
    assert report.projected_seconds == pytest.approx(report.total_steps * report.step_seconds)
    assert report.peak_bytes > 0 and report.per_gpu_bytes > 0
    assert files_under(cwd) == [] and files_under(tmp) == []  # the temporary folder is gone too


def test_cli_dry_run_prints_the_table_and_exits_0(synthetic_shards, quiet_cwd):
    result = runner.invoke(app, ["train", str(TINY), f"data.path={synthetic_shards}", "trainer.precision=bf16",
                                 "--dry-run"])
    assert result.exit_code == 0, result.output
    header, row = result.stdout.strip().splitlines()[-2:]
    assert header.split()[:4] == ["config", "device", "trainable", "frozen"]
    assert row.split()[0] == "tiny_unet" and "1,002,883" in row and row.endswith("7/7 ok")
    assert files_under(quiet_cwd[0]) == []


def test_a_failing_stage_exits_1_naming_it(synthetic_shards, quiet_cwd, monkeypatch):
    from facediff.tasks.pixel import PixelDiffusion

    def nan_samples(self, n, generator, sampler, steps, batch=None):
        return torch.full((n, *self.image_shape), float("nan"))

    monkeypatch.setattr(PixelDiffusion, "sample", nan_samples)
    result = runner.invoke(app, ["train", str(TINY), f"data.path={synthetic_shards}", "--dry-run"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stage 'eval'" in errors[0] and "finite" in errors[0], result.stderr
    assert "Traceback" not in result.output
    assert result.stdout.strip().splitlines()[-1].endswith("3/7 ok")  # data, build, step passed
    assert files_under(quiet_cwd[0]) == [] and files_under(quiet_cwd[1]) == []


def test_a_resume_that_restores_other_weights_fails_its_stage(synthetic_shards, quiet_cwd, monkeypatch):
    from facediff.train import checkpoint

    real_load = checkpoint.load

    def load_then_nudge(directory, engine, ema, generator, rank):
        state = real_load(directory, engine, ema, generator, rank)
        with torch.no_grad():
            next(p for p in engine.module.parameters() if p.requires_grad).add_(1.0)
        return state

    monkeypatch.setattr(checkpoint, "load", load_then_nudge)
    cfg = load_config(TINY, [f"data.path={synthetic_shards}"])
    with pytest.raises(StageFailed) as failed:
        dry_run(cfg, "tiny_unet", echo=lambda line: None)
    assert failed.value.stage == "resume" and "differ" in str(failed.value.error)
    assert failed.value.report.stages["checkpoint"] == "ok" and not failed.value.report.passed


@pytest.mark.parametrize("args, named", [
    (["data.path=/nonexistent/shards", "--dry-run"], "/nonexistent/shards"),
    (["--random-weights"], "--random-weights"),
])
def test_bad_input_exits_2_with_one_line(args, named, quiet_cwd):
    result = runner.invoke(app, ["train", str(TINY), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], result.stderr


def test_per_gpu_estimate_partitions_by_zero_stage():
    cfg = load_config(TINY, ["trainer.num_workers=4", "trainer.precision=bf16"])
    p = 1_000_000  # trainable parameters in bf16, 3 M frozen bf16 in the engine, 1 M fp32 held outside it
    sizes = {"trainable": p, "frozen": 4 * p, "trainable_bytes": 2 * p, "frozen_bytes": 6 * p, "held_bytes": 4 * p}
    stage = lambda z: per_gpu_estimate(cfg.model_copy(update={"trainer": cfg.trainer.model_copy(  # noqa: E731
        update={"zero_stage": z})}), sizes, eval_copy_bytes=0, activation_bytes=0)
    # weights 2+6+4, fp32 masters 4, Adam 8, gradients 2 (bytes per trainable parameter, x 1 M)
    assert stage(0) == (12 + 12 + 2) * p
    assert stage(1) == (12 + 12 / 4 + 2) * p
    assert stage(2) == (12 + 12 / 4 + 2 / 4) * p
    assert stage(3) == (8 / 4 + 4 + 12 / 4 + 2 / 4) * p
    fp32 = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"precision": "fp32"})})
    assert per_gpu_estimate(fp32, sizes, eval_copy_bytes=GIB, activation_bytes=5) == (12 + 8 + 4) * p + GIB + 5


# ----------------------------------------------------------------------------- production configs (slow)
# The cheapest production config of each family, its networks at their real size (docs/dry-run.md has every
# config's row, run unchanged). To fit CI's budget the batches here are of one record, and the 512 px families
# read 256 px images (the networks are the same; only activations shrink).
ECONOMY = ["trainer.batch_size=1", "eval.batch_size=1"]
PRODUCTION = {
    "unet_r5": ("celebamask", 128, []),
    "dit_small_2k7": ("celebamask", 128, []),
    "lc_unet_3": ("celebamask", 256, []),
    "sd2_lora": ("celebamask", 256, ["data.image_size=256"]),
    "controlnet_baseline": ("coco", 256, ["data.image_size=256"]),
}


@pytest.fixture(scope="module")
def production_data(synthetic_celebamask, synthetic_coco, tmp_path_factory):
    """Small prepared datasets at each family's image size, made with the project's own `prepare` tools."""
    from facediff.data.prepare.coco import prepare_coco
    from facediff.data.prepare.celebamask import prepare_celebamask

    root = tmp_path_factory.mktemp("production-data")
    made = {}

    def get(kind: str, size: int):
        out = root / f"{kind}{size}"
        if out not in made:
            if kind == "celebamask":  # 24 faces: 22 train, 2 test
                prepare_celebamask(synthetic_celebamask(n=24, size=size), out, image_size=size, mask_size=size,
                                   workers=2, progress=False)
            else:  # people scenes with captions; the ones without a person large enough are left out
                prepare_coco(synthetic_coco(n=12, size=size, seed=0, val_fraction=0.5), out, image_size=size,
                             workers=2, progress=False)
            made[out] = out
        return out

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PRODUCTION))
def test_production_config_dry_run_with_random_weights(name, production_data, quiet_cwd):
    kind, size, overrides = PRODUCTION[name]
    args = [f"data.path={production_data(kind, size)}", *ECONOMY, *overrides]
    path = next(EXPERIMENTS.glob(f"*/{name}.yaml"))  # celebamask/ or mask_aware/
    result = runner.invoke(app, ["train", str(path), *args, "--dry-run", "--random-weights"])
    assert result.exit_code == 0, result.output
    row = result.stdout.strip().splitlines()[-1]
    assert row.split()[0] == name and row.endswith("7/7 ok"), result.output
    total = describe(load_config(path, args))[-1]  # the whole task's counts
    assert f"{total['trainable']:,}" in row and f"{total['frozen']:,}" in row
    assert files_under(quiet_cwd[0]) == [] and files_under(quiet_cwd[1]) == []
