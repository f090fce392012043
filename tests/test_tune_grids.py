"""Tune grid files and the pieces of `facediff tune` that need no Ray cluster: loading, metric resolution,
param space, per-trial configs, report forwarding, paper rows, the results table."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from facediff.config import ConfigError, load_grid
from facediff.config.load import GRID_CONFIG_KEY
from facediff.tune import load_experiment, param_space, required_cpus
from facediff.tune.space import resolve_metric, split_overrides

from conftest import REPO

GRIDS = sorted((REPO / "configs" / "tune").glob("*.yaml"))


@pytest.fixture
def no_inception(monkeypatch):
    """As offline: no Inception weights (and no 10 s network probe per grid)."""
    monkeypatch.setattr("facediff.eval.metrics.load_inception", lambda *a, **k: None)


def _named_configs(path: Path) -> list[Path]:
    raw = yaml.safe_load(path.read_text())
    names = [raw["train_config"]]
    dim = raw["search_space"].get(GRID_CONFIG_KEY)
    names += (dim.get("grid") or dim.get("choice") or []) if dim else []
    return [path.parent / n for n in names]


def test_every_ablation_has_a_grid():
    names = {p.stem for p in GRIDS}
    assert {"demo", "lr", "warmup", "ema", "unet_architecture", "dit_architecture", "lc_architecture",
            "ddpm_steps", "autoencoder", "train_size", "infonce", "segmentation", "mask_ldm"} <= names


@pytest.mark.parametrize("path", GRIDS, ids=[p.stem for p in GRIDS])
def test_grid_file_loads(path, no_inception):
    missing = sorted({str(p.resolve().relative_to(REPO)) for p in _named_configs(path) if not p.resolve().is_file()})
    if missing:
        pytest.skip(f"{path.name} names training configs that do not exist yet: {missing}")
    exp = load_experiment(path)
    assert exp.grid.reproduces, f"{path.name} must say which table of which paper it reproduces"
    assert exp.metric == ("fd_mtcnn_onet" if exp.grid.metric == "fid" else exp.grid.metric)
    space = param_space(exp.grid)
    assert set(space) == set(exp.grid.search_space)
    # the first value of every dimension gives a valid trial config that carries it
    params = {k: (d.grid or d.choice or [None])[0] if (d.grid or d.choice) else (d.uniform or d.loguniform)[0]
              for k, d in exp.grid.search_space.items()}
    cfg = exp.trial_config(params, "trial1")
    assert cfg.trainer.storage_path == str(exp.dir / "trial1") and cfg.trainer.total_kimg == exp.total_kimg
    assert cfg.eval.every_kimg is not None  # ASHA reads the image metric at every rung
    for key, value in params.items():
        if key != GRID_CONFIG_KEY:
            node = cfg
            for part in key.split("."):
                node = getattr(node, part)
            assert node == value, key


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TRAIN = """
data: {path: /data/none, image_size: 32}
model: {family: unet, sample_size: 32, block_out_channels: [32, 64], down_block_types: [DownBlock2D, DownBlock2D],
        up_block_types: [UpBlock2D, UpBlock2D], norm_num_groups: 16}
trainer: {total_kimg: 2.0}
"""


def test_overrides_split_between_grid_and_every_trial(tmp_path, no_inception):
    write(tmp_path / "a.yaml", TRAIN)
    grid = write(tmp_path / "g.yaml", "train_config: a.yaml\nmetric: loss\n"
                 "search_space:\n  optimizer.lr: {loguniform: [1.0e-5, 1.0e-3]}\n")
    assert split_overrides(["num_samples=3", "data.path=/x"]) == (["num_samples=3"], ["overrides.data.path=/x"])
    exp = load_experiment(grid, ["num_samples=3", "data.path=/x", f"storage_path={tmp_path}/out",
                                 "scheduler.max_kimg=0.5", "scheduler.grace_period_kimg=0.1"])
    assert exp.grid.num_samples == 3 and exp.dir == tmp_path / "out" / "g" and exp.total_kimg == 0.5
    cfg = exp.trial_config({"optimizer.lr": 3e-4}, "t")
    assert cfg.data.path == "/x" and cfg.optimizer.lr == 3e-4 and cfg.trainer.total_kimg == 0.5
    assert cfg.trainer.run_name == "train"
    with pytest.raises(ConfigError, match="data.pth"):
        load_experiment(grid, ["data.pth=/x"])  # a misspelt training key is named


def test_image_metric_needs_evaluation_and_grace_fits(tmp_path, no_inception):
    write(tmp_path / "a.yaml", TRAIN)
    grid = write(tmp_path / "g.yaml", "train_config: a.yaml\nsearch_space:\n  optimizer.lr: {grid: [1.0e-4]}\n")
    with pytest.raises(ConfigError, match="eval.every_kimg"):
        load_experiment(grid)  # metric fid -> fd_mtcnn_onet, which only evaluation rows carry
    assert load_experiment(grid, ["eval.every_kimg=0.5"]).metric == "fd_mtcnn_onet"
    with pytest.raises(ConfigError, match="grace_period_kimg"):
        load_experiment(grid, ["eval.every_kimg=0.5", "scheduler.grace_period_kimg=5"])
    # evaluations in Ray Train's validation task reach ASHA too; a local Ray gets CPUs for that task of each trial
    sync = load_experiment(grid, ["eval.every_kimg=0.5", "max_concurrent_trials=2"])
    off_path = load_experiment(grid, ["eval.every_kimg=0.5", "max_concurrent_trials=2", "eval.async_validation=true",
                                      "eval.async_resources={CPU: 0.5}"])
    assert off_path.metric == "fd_mtcnn_onet" and required_cpus(off_path) == required_cpus(sync) + 2 * 0.5


def test_config_file_dimension_is_validated(tmp_path, no_inception):
    write(tmp_path / "a.yaml", TRAIN)
    write(tmp_path / "b.yaml", TRAIN.replace("[32, 64]", "[16, 32]").replace("16}", "8}"))
    grid = write(tmp_path / "g.yaml", "train_config: a.yaml\nmetric: loss\nsearch_space:\n"
                 "  train_config: {grid: [a.yaml, b.yaml]}\n  optimizer.lr: {grid: [1.0e-4]}\n")
    exp = load_experiment(grid)
    assert [p.name for p in exp.config_files()] == ["a.yaml", "b.yaml"]
    cfg = exp.trial_config({"train_config": "b.yaml", "optimizer.lr": 1e-4}, "t")
    assert cfg.model.block_out_channels == [16, 32] and cfg.name == "b"
    bad = write(tmp_path / "bad.yaml", "train_config: a.yaml\nmetric: loss\nsearch_space:\n"
                "  train_config: {grid: [a.yaml, missing.yaml]}\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_experiment(bad)
    ranged = write(tmp_path / "r.yaml", "train_config: a.yaml\nmetric: loss\nsearch_space:\n"
                   "  train_config: {uniform: [0, 1]}\n")
    with pytest.raises(ConfigError, match="grid or choice"):
        load_experiment(ranged)


def test_fid_resolves_to_what_the_trainer_reports(monkeypatch):
    from facediff.config.schema import EvalConfig

    monkeypatch.setattr("facediff.eval.metrics.load_inception", lambda *a, **k: None)
    assert resolve_metric("fid", EvalConfig()) == "fd_mtcnn_onet"
    assert resolve_metric("loss", EvalConfig()) == "loss"
    monkeypatch.setattr("facediff.eval.metrics.load_inception", lambda *a, **k: object())
    assert resolve_metric("fid", EvalConfig()) == "fid"


def test_only_rows_with_the_metric_reach_tune(monkeypatch):
    from ray.tune.integration.ray_train import TuneReportCallback

    from facediff.tune.trial import MetricReportCallback

    forwarded = []
    monkeypatch.setattr(TuneReportCallback, "__init__", lambda self: None)  # no Tune session here
    monkeypatch.setattr(TuneReportCallback, "after_report", lambda self, ctx, m, c: forwarded.append(m[0]))
    callback = MetricReportCallback("fd_mtcnn_onet")
    callback.after_report(None, [{"kimg": 0.1, "loss": 1.0}], None)
    callback.after_report(None, [{"kimg": 0.2, "loss": 0.9, "fd_mtcnn_onet": 3.0}], None)
    # a checkpoint between evaluations carries a placeholder only Ray Train's checkpoint scoring reads
    callback.after_report(None, [{"kimg": 0.25, "loss": 0.8, "fd_mtcnn_onet": 1e308, "checkpoint_only": True}], None)
    assert forwarded == [{"kimg": 0.2, "loss": 0.9, "fd_mtcnn_onet": 3.0}]
    with pytest.raises(RuntimeError, match="'fid'.*fd_mtcnn_onet"):
        callback.after_report(None, [{"kimg": 0.3, "fid": 10.0}], None)


def test_an_evaluation_task_result_reaches_tune_with_its_checkpoint(monkeypatch):
    """`eval.async_validation`: the validation task's row goes into the trial's Tune queue as a report would,
    tagged with the kimg and the path of the checkpoint it measured (what ASHA and the results table read)."""
    from ray import cloudpickle
    from ray.tune.integration.ray_train import TuneReportCallback

    from facediff.tune.trial import MetricReportCallback

    class Queue(list):  # stands for the Tune session's ray.util.queue.Queue
        put = list.append

    monkeypatch.setattr(TuneReportCallback, "__init__", lambda self: setattr(
        self, "_training_actor_item_queue", Queue()))
    forward = cloudpickle.loads(cloudpickle.dumps(MetricReportCallback("fd_mtcnn_onet").after_validation))  # as Ray
    row = {"step": 4, "kimg": 0.064, "async_eval": True, "eval_s": 3.0, "fd_mtcnn_onet": 2.5}
    forward(row, SimpleNamespace(path="/exp/t1/train/checkpoint_000000004"))
    forward({"step": 8, "kimg": 0.128, "async_eval": True, "loss": 1.0}, None)  # no metric: not for ASHA
    assert forward.__self__._training_actor_item_queue == [
        {**row, "checkpoint_path": "/exp/t1/train/checkpoint_000000004"}]


def test_tune_command_names_a_bad_key():
    from typer.testing import CliRunner

    from facediff.cli.main import app

    result = CliRunner().invoke(app, ["tune", str(REPO / "configs" / "tune" / "demo.yaml"), "optimizer.lrr=1"])
    assert result.exit_code == 2 and "optimizer.lrr" in result.output


def test_every_grid_point_is_checked_before_ray_starts(tmp_path, monkeypatch, no_inception):
    """A value no trial could train with (a 3-level `block_out_channels` on a 2-level UNet, the 2nd of 4
    points) stops `facediff tune` before Ray starts: exit 2, one line naming the grid file and the point, no
    experiment folder. A misspelt search key or grid override is the grid file's, not the command line's."""
    from typer.testing import CliRunner

    import facediff.ray_start
    from facediff.cli.main import app

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started for a grid with a bad point")

    monkeypatch.setattr(facediff.ray_start, "start_ray", no_ray)
    write(tmp_path / "a.yaml", TRAIN)
    head = f"train_config: a.yaml\nmetric: loss\nstorage_path: {tmp_path}/out\n"
    grid = write(tmp_path / "x.yaml", head + "search_space:\n  optimizer.lr: {grid: [1.0e-4, 2.0e-4]}\n"
                 "  model.block_out_channels: {grid: [[32, 64], [32, 64, 128]]}\n")
    result = CliRunner().invoke(app, ["tune", str(grid)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {grid}: grid point 2 of 4 "
                                                   "{optimizer.lr: 0.0001, model.block_out_channels: [32, 64, 128]}: ")
    # the grid point's key is blamed on the search space, the other on the training config that set it
    assert f"model.block_out_channels (search_space) has 3 entries but model.down_block_types ({tmp_path / 'a.yaml'}) has 2" in lines[0]
    assert not (tmp_path / "out").exists()  # no experiment folder, no trial folder

    misspelt = write(tmp_path / "m.yaml", head + "search_space:\n  optimizer.lr: {grid: [1.0e-4]}\n"
                     "  optimizer.lrr: {loguniform: [1.0e-5, 1.0e-3]}\n")
    with pytest.raises(ConfigError) as err:
        load_experiment(misspelt)
    assert str(err.value) == (f"{misspelt}: grid point 1 of 2 {{optimizer.lr: 0.0001, optimizer.lrr: 1.0e-05}}: "
                              "invalid config: search_space: optimizer.lrr: unknown key")
    overridden = write(tmp_path / "o.yaml", head + "overrides: {trainer.batch_sise: 4}\n"
                       "search_space:\n  optimizer.lr: {grid: [1.0e-4]}\n")
    with pytest.raises(ConfigError, match=rf"^{overridden}: invalid config: {overridden}: trainer.batch_sise: unknown"):
        load_experiment(overridden)
    nested = write(tmp_path / "c.yaml", head + "overrides: {trainer: {batch_size: 4}}\n"
                   "search_space:\n  optimizer.lr: {grid: [1.0e-4]}\n")
    with pytest.raises(ConfigError, match=r"invalid config: command line: trainer.batch_sise: unknown"):
        load_experiment(nested, ["trainer.batch_sise=4"])  # beside the grid file's trainer.batch_size


def test_tune_command_fails_when_trials_errored(monkeypatch):
    """All trials erroring (the README's command once did, with exit 0) is a failed command: exit 1, one line."""
    from typer.testing import CliRunner

    import facediff.tune
    from facediff.cli.main import app

    summary = {"experiment": "x", "metric": "fd_mtcnn_onet", "trials": 4, "stopped_early": 0, "errors": 4,
               "first_error": "FileNotFoundError: outputs/demo/shards/manifest.json: no manifest",
               "reported_metric": 0, "table": "t.csv", "markdown": "t.md", "plot": "p.png", "best": None}
    monkeypatch.setattr(facediff.tune, "run_tune", lambda grid, overrides: summary)
    result = CliRunner().invoke(app, ["tune", "grid.yaml"])
    assert result.exit_code == 1
    assert "4 of 4 trials failed, 0 reported fd_mtcnn_onet; first error: FileNotFoundError" in result.output
    monkeypatch.setattr(facediff.tune, "run_tune", lambda grid, overrides: {**summary, "errors": 0,
                                                                           "reported_metric": 4, "first_error": None})
    assert CliRunner().invoke(app, ["tune", "grid.yaml"]).exit_code == 0


def test_paper_row_must_be_a_grid_point(tmp_path):
    (tmp_path / "g.yaml").write_text(
        f"train_config: {REPO / 'configs' / 'experiments' / 'tiny_unet.yaml'}\nmetric: loss\n"
        "search_space:\n  optimizer.lr: {grid: [1.0e-4, 2.0e-4]}\n"
        "paper_rows:\n  - {row: r, point: {optimizer.lr: 3.0e-4}, fid: 70.0}\n")
    with pytest.raises(ConfigError, match=r"paper_rows: 'r': optimizer.lr=0.0003 is not in its grid"):
        load_grid(tmp_path / "g.yaml")


def test_results_table_prints_the_papers_fid_beside_ours(tmp_path):
    import pandas as pd

    from facediff.storage import RunStorage
    from facediff.tune.results import trial_rows, write_table

    grid, _ = load_grid(REPO / "configs" / "tune" / "infonce.yaml")
    exp = SimpleNamespace(grid=grid, metric="fd_mtcnn_onet", total_kimg=1.0, dir=tmp_path, name="infonce",
                          grid_path=REPO / "configs" / "tune" / "infonce.yaml",
                          trial_run=lambda trial: RunStorage(str(tmp_path / trial), "train"))
    results = []
    for i, (name, values) in enumerate([("lc_unet_3", [0.9, 0.7]), ("lc_unet_3_no_infonce", [0.8])]):
        (tmp_path / f"trial_{i}").mkdir()
        history = pd.DataFrame({"kimg": [0.5, 1.0][:len(values)], "fd_mtcnn_onet": values})
        results.append(SimpleNamespace(path=str(tmp_path / f"trial_{i}"), metrics_dataframe=history, error=None,
                                       config={"train_config": f"../experiments/celebamask/{name}.yaml"}))
    rows = trial_rows(results, exp)
    assert [(r["paper_row"], r["best_fd_mtcnn_onet"], r["paper_fid"]) for r in rows] == [
        ("LC_UNet_3, InfoNCE", 0.7, 70.9824), ("LC_UNet_3, no InfoNCE", 0.8, 74.0719)]
    _, md = write_table(rows, exp)
    text = md.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| trial"))
    assert header.index("best_fd_mtcnn_onet") < header.index("paper_fid")
    assert "| LC_UNet_3, InfoNCE | 0.7 | 70.98 |" in text and "not comparable" in text


def test_best_is_one_report_with_its_checkpoint(tmp_path, no_inception):
    """Each trial's best metric, its kimg and its checkpoint come from one report (ties: the latest, as Ray
    Train keeps them); a best report whose checkpoint is gone gets no checkpoint rather than another one."""
    import json
    from types import SimpleNamespace

    import pandas as pd

    from facediff.train.checkpoint import STATE_FILE
    from facediff.tune.results import BEST, best_trial, trial_rows

    write(tmp_path / "a.yaml", TRAIN)
    grid = write(tmp_path / "g.yaml", f"train_config: a.yaml\nmetric: fd_x\nstorage_path: {tmp_path}/out\n"
                 "overrides: {eval.every_kimg: 0.5}\nsearch_space:\n  optimizer.lr: {grid: [1.0e-4, 2.0e-4]}\n")
    exp = load_experiment(grid)

    def trial(trial_id, lr, reports, kept):
        run = exp.dir / trial_id / "train"
        for name in kept:
            (run / name).mkdir(parents=True)
            (run / name / STATE_FILE).write_text("{}")
        history = pd.DataFrame([{"kimg": k, "fd_x": m, "checkpoint_path": f"/elsewhere/{c}" if c else float("nan")}
                                for k, m, c in reports])
        return SimpleNamespace(path=str(exp.dir / trial_id), metrics_dataframe=history, error=None,
                               config={"optimizer.lr": lr})

    results = [
        # best 2.0 at 0.5 kimg and again at 1.5: the later one (Ray keeps it); 1.0 kimg's checkpoint is deleted
        trial("t1", 1e-4, [(0.5, 2.0, "checkpoint_a"), (1.0, 3.0, "checkpoint_b"), (1.5, 2.0, "checkpoint_c"),
                           (2.0, 2.5, "checkpoint_d")], ["checkpoint_c", "checkpoint_d"]),
        trial("t2", 2e-4, [(0.5, 1.5, "checkpoint_a"), (1.0, 1.0, None), (2.0, 1.2, "checkpoint_d")],
              ["checkpoint_a", "checkpoint_d"]),
    ]
    rows = {r["trial"]: r for r in trial_rows(results, exp)}
    assert (rows["t1"]["best_fd_x"], rows["t1"]["best_kimg"], rows["t1"]["checkpoint"]) == (
        2.0, 1.5, str(exp.dir / "t1" / "train" / "checkpoint_c"))
    assert rows["t1"]["kimg"] == 2.0
    # t2's best report carries no checkpoint: none is named (not the latest, not another report's)
    assert (rows["t2"]["best_fd_x"], rows["t2"]["best_kimg"], rows["t2"]["checkpoint"]) == (1.0, 1.0, "")
    exp.dir.mkdir(parents=True, exist_ok=True)
    best = best_trial(list(rows.values()), exp)
    assert best["trial"] == "t2" and json.loads((exp.dir / BEST).read_text())["best_kimg"] == 1.0


def test_results_table_shows_the_bootstrap_intervals(tmp_path, no_inception):
    """The best report's interval and its kernel distance with interval are columns of results.csv, and each value
    stands beside its interval in results.md, so overlapping rows are visibly not separable."""
    import csv
    from types import SimpleNamespace

    import pandas as pd

    from facediff.tune.results import trial_rows, write_table

    write(tmp_path / "a.yaml", TRAIN)
    grid = write(tmp_path / "g.yaml", f"train_config: a.yaml\nmetric: fd_x\nstorage_path: {tmp_path}/out\n"
                 "overrides: {eval.every_kimg: 0.5}\nsearch_space:\n  optimizer.lr: {grid: [1.0e-4, 2.0e-4]}\n")
    exp = load_experiment(grid)
    history = pd.DataFrame([
        {"kimg": 0.5, "fd_x": 3.0, "fd_x_lo": 2.5, "fd_x_hi": 3.5, "kd_x": 0.3, "kd_x_lo": 0.2, "kd_x_hi": 0.4},
        {"kimg": 1.0, "fd_x": 2.0, "fd_x_lo": 1.5, "fd_x_hi": 2.75, "kd_x": 0.1, "kd_x_lo": 0.05, "kd_x_hi": 0.2},
    ])
    result = SimpleNamespace(path=str(exp.dir / "t1"), metrics_dataframe=history, error=None,
                             config={"optimizer.lr": 1e-4})
    rows = trial_rows([result], exp)
    exp.dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = write_table(rows, exp)
    with open(csv_path) as f:
        row = next(csv.DictReader(f))
    assert {k: float(row[k]) for k in ("best_fd_x", "best_fd_x_lo", "best_fd_x_hi", "kd_x", "kd_x_lo", "kd_x_hi")} \
        == {"best_fd_x": 2.0, "best_fd_x_lo": 1.5, "best_fd_x_hi": 2.75, "kd_x": 0.1, "kd_x_lo": 0.05, "kd_x_hi": 0.2}
    markdown = md_path.read_text()
    assert "| 2 [1.5, 2.75] |" in markdown and "| 0.1 [0.05, 0.2] |" in markdown and "not separable" in markdown
    assert "best_fd_x_lo" not in markdown  # inside the value's cell, not a column of its own
