"""A run has one config (`facediff/train/identity.py`): a re-run whose config differs from the run folder's recorded
one in keys that define the run is refused before anything is written, with both values and the ways out; keys
that may change resume and are recorded. No Ray: run folders are written here in the layout training leaves."""

import json
import logging
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import REPO

from facediff.cli.main import app
from facediff.config import load_config, resolve_paths
from facediff.console import hold_log
from facediff.storage import RunStorage
from facediff.tasks import build_task
from facediff.train import identity
from facediff.train.checkpoint import EMA_FILE, STATE_FILE, TrainState
from facediff.train.engine import apply_optimizer_settings, build_optimizer, lr_factor, total_steps
from facediff.train.identity import RunConfigChanged, check_resume, commit, read_history

TINY = REPO / "configs" / "experiments" / "tiny" / "tiny_unet.yaml"


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a folder with its bytes: equal snapshots, an untouched folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def experiment(folder: Path, description: str, lr: float, total_kimg: float) -> Path:
    """`<folder>/exp.yaml` adapting the tiny UNet config, as a new user writes one."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "exp.yaml").write_text(f"base: {TINY}\ndescription: {description}\noptimizer: {{lr: {lr}}}\n"
                                     f"trainer: {{total_kimg: {total_kimg}}}\n")
    return folder / "exp.yaml"


@pytest.fixture
def trained(tmp_path, synthetic_shards):
    """`my/exp.yaml` trained to step 2: the run folder `runs/exp` with its recorded config and a checkpoint whose
    EMA weights fit the config (enough for `facediff sample`), and the overrides every command here adds."""
    common = [f"data.path={synthetic_shards}", f"trainer.storage_path={tmp_path / 'runs'}"]
    cfg = resolve_paths(load_config(experiment(tmp_path / "my", "mine", 5e-4, 0.2), common))
    storage = RunStorage(cfg.trainer.storage_path, "exp")
    assert commit(storage, check_resume(cfg, storage), step=0)  # a new run: config.yaml, no history
    ckpt = storage.local / "checkpoint_000000002"
    (ckpt / "state").mkdir(parents=True)
    ema = {f"ema.{n}": p.detach().clone() for n, p in build_task(cfg).named_parameters() if p.requires_grad}
    save_file({**ema, "ema_step": torch.tensor(2)}, str(ckpt / EMA_FILE))
    (ckpt / STATE_FILE).write_text(json.dumps(asdict(TrainState(step=2))))
    return cfg, storage, common


def train_cli(monkeypatch, *args):
    def no_ray(*_, **__):
        raise AssertionError("Ray was started")
    monkeypatch.setattr("facediff.train.run.init_ray", no_ray)
    return CliRunner().invoke(app, ["train", *map(str, args)])


def refused(result, *names) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def test_new_learning_rate_on_rerun_is_refused_and_leaves_the_run_as_it_was(trained, tmp_path, monkeypatch):
    """Issue 39, case 1: the re-run trained at the old rate and recorded the new one; now it stops, naming both."""
    _, storage, common = trained
    before = snapshot(storage.local)
    line = refused(train_cli(monkeypatch, tmp_path / "my" / "exp.yaml", "optimizer.lr=1e-4", *common),
                   "optimizer.lr 0.0005 -> 0.0001", "trainer.run_name=", "--resume-with-changes", "docs/resuming.md")
    assert "total_kimg" not in line and "description" not in line  # only what differs
    assert snapshot(storage.local) == before


def test_another_config_of_the_same_file_name_is_refused(trained, tmp_path, monkeypatch):
    """Case 2: `my2/exp.yaml` (another description, lr, and a total below the run's) landed in `runs/exp`, trained
    nothing and rewrote its config; now it is refused, saying where the folder's name came from."""
    _, storage, common = trained
    before = snapshot(storage.local)
    other = experiment(tmp_path / "my2", "another one", 2e-4, 0.1)
    refused(train_cli(monkeypatch, other, *common), "optimizer.lr 0.0005 -> 0.0002",
            "trainer.total_kimg 0.2 -> 0.1 (a resumed run may grow, not shrink)", "config file's name ('exp')")
    assert snapshot(storage.local) == before


def test_other_model_shape_is_refused_and_the_run_still_samples(trained, tmp_path, monkeypatch):
    """Case 3: the refused resume used to leave a config.yaml the checkpoints do not fit, breaking `sample`."""
    _, storage, common = trained
    before = snapshot(storage.local)
    refused(train_cli(monkeypatch, tmp_path / "my" / "exp.yaml", "model.block_out_channels=[16,32]",
                      "model.norm_num_groups=8", *common),
            "model.block_out_channels [32, 64] -> [16, 32]", "model.norm_num_groups 16 -> 8")
    assert snapshot(storage.local) == before
    done = CliRunner().invoke(app, ["sample", str(storage.local), "--n", "1", "--steps", "1",
                                    "--out", str(tmp_path / "grid.png"), "--device", "cpu"])
    assert done.exit_code == 0, done.output


def test_keys_that_may_change_resume_and_are_recorded_with_both_values(trained):
    cfg, storage, _ = trained
    assert check_resume(cfg, storage).changes == {}  # the same config again: a plain resume
    longer = cfg.model_copy(deep=True)
    longer.trainer.total_kimg, longer.trainer.checkpoint_every_kimg, longer.trainer.max_failures = 0.4, 0.1, 2
    longer.trainer.resources_per_worker = {"CPU": 1.0}
    longer.eval.every_kimg, longer.description = 0.2, "longer"
    resumption = check_resume(longer, storage)
    assert resumption.how == "may change on resume" and resumption.changes == {
        "description": ["mine", "longer"], "trainer.resources_per_worker.CPU": [0.5, 1.0],
        "trainer.total_kimg": [0.2, 0.4], "trainer.checkpoint_every_kimg": [0.5, 0.1],
        "trainer.max_failures": [0, 2], "eval.every_kimg": [None, 0.2]}

    faster = cfg.model_copy(deep=True)
    faster.optimizer.lr = 1e-4
    with pytest.raises(RunConfigChanged, match=r"optimizer\.lr 0\.0005 -> 0\.0001"):
        check_resume(faster, storage)
    assert check_resume(faster, storage, resume_with_changes=True).how == "--resume-with-changes"
    before = (storage.local / "config.yaml").read_text()
    assert commit(storage, check_resume(faster, storage, resume_with_changes=True), step=2)
    assert not commit(storage, check_resume(faster, storage), step=2)  # a worker restart: nothing new
    [entry] = read_history(storage)
    assert entry["resumed_at_step"] == 2 and entry["allowed_by"] == "--resume-with-changes"
    assert entry["changes"] == {"optimizer.lr": {"old": 5e-4, "new": 1e-4}} and entry["time"].endswith("+00:00")
    assert yaml.safe_load(before)["optimizer"]["lr"] == 5e-4
    assert load_config(storage.local / "config.yaml").optimizer.lr == 1e-4
    assert not list(storage.local.glob(".config.yaml.*"))  # the temporary sibling was renamed


def test_checkpoints_without_a_recorded_config_are_not_taken_over(tmp_path, tiny_config):
    cfg = resolve_paths(tiny_config([f"trainer.storage_path={tmp_path}"]))
    storage = RunStorage(str(tmp_path), "tiny_unet")
    (storage.local / "checkpoint_000000004").mkdir(parents=True)
    with pytest.raises(RunConfigChanged, match="no config.yaml"):
        check_resume(cfg, storage)
    assert check_resume(cfg, storage, resume_with_changes=True).changes == {}


def test_resumed_optimizer_takes_the_configs_settings_not_the_checkpoints(tiny_config):
    """Loading a checkpoint restores the lr, betas and weight decay it was saved with: case 1 trained on at 5e-4."""
    old, new = (tiny_config([f"optimizer.lr={lr}", f"optimizer.weight_decay={wd}", "optimizer.schedule=cosine",
                             "optimizer.warmup_steps=2"]) for lr, wd in ((5e-4, 0.0), (1e-4, 0.1)))
    module = torch.nn.Linear(2, 2)
    optimizer, schedule = build_optimizer(module, old, 1)
    for _ in range(5):
        optimizer.step()
        schedule.step()
    resumed, resumed_schedule = build_optimizer(module, new, 1)
    resumed.load_state_dict(optimizer.state_dict())
    resumed_schedule.load_state_dict(schedule.state_dict())
    assert resumed.param_groups[0]["lr"] == schedule.get_last_lr()[0]  # the checkpoint's, before
    apply_optimizer_settings(resumed_schedule, new)
    total = total_steps(new, 1)
    expected = 1e-4 * lr_factor(5, 2, total, "cosine", 0.0)
    assert resumed.param_groups[0]["lr"] == pytest.approx(expected) and resumed.param_groups[0]["weight_decay"] == 0.1
    resumed.step()
    resumed_schedule.step()
    assert resumed.param_groups[0]["lr"] == pytest.approx(1e-4 * lr_factor(6, 2, total, "cosine", 0.0))


def test_worker_log_is_written_only_once_opened(tmp_path):
    path = tmp_path / "logs" / "rank0.log"
    open_log = hold_log(path)
    logging.getLogger("facediff.train").info("rank 0 of 2: before the resume")
    assert not path.exists()  # a worker that fails here leaves no file
    open_log()
    logging.getLogger("facediff.train").info("after")
    lines = path.read_text().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["rank 0 of 2: before the resume", "after"]
    for handler in [h for h in logging.getLogger("facediff").handlers if getattr(h, "baseFilename", "") == str(path)]:
        logging.getLogger("facediff").removeHandler(handler)
        logging.getLogger("DeepSpeed").removeHandler(handler)
        handler.close()


def test_may_change_list_is_documented():
    page = (REPO / "docs" / "resuming.md").read_text()
    assert all(f"`{key}`" in page for key in identity.MAY_CHANGE_ON_RESUME)
