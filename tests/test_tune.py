"""`facediff tune` end to end on CPU: a 4-trial grid of the tiny UNet with ASHA, the results, and a resume."""

import csv
import json
from pathlib import Path

import pytest
from conftest import REPO, two_trial_grid
from PIL import Image

from facediff.train.run_log import read_metrics
from facediff.tune import run_tune

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("tune_ray")]
BAD_LR = 1e-8  # barely moves the weights: its loss stays at the initial one while the others fall

GRID = f"""
train_config: {REPO / "configs" / "experiments" / "tiny" / "tiny_unet.yaml"}
reproduces: nothing (test)
metric: loss  # every report carries it; the {BAD_LR} trial is clearly worse from the first rung
mode: min
overrides:
  trainer.num_workers: 1
  trainer.resources_per_worker: {{CPU: 0.5}}
  trainer.batch_size: 16
  trainer.checkpoint_every_kimg: 0.064
  trainer.log_every_steps: 2
  trainer.keep_last: 1
  optimizer.warmup_steps: 1
search_space:
  optimizer.lr: {{grid: [2.0e-3, 1.5e-3, 1.0e-3, {BAD_LR}]}}
scheduler: {{kind: asha, grace_period_kimg: 0.064, reduction_factor: 2, max_kimg: 0.128}}
resources_per_trial: {{CPU: 0.25}}
max_concurrent_trials: 2
"""


@pytest.fixture(scope="module")
def tune_ray():
    """A Ray instance of these tests' own. The session's cluster has run every earlier Train job of the suite;
    in a full run the ASHA grid starved on it (its Ray Data tasks waited for CPUs for 10 minutes) although it
    passes on a fresh one, so these tests start clean (stopping the session's; a later test that asks for
    `ray_session` gets it back)."""
    import ray

    from conftest import RAY_NUM_CPUS
    from facediff.ray_start import init_local_ray

    if ray.is_initialized():
        ray.shutdown()
    init_local_ray(RAY_NUM_CPUS, include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _printed_summary(stdout: str) -> dict:
    """The summary `facediff tune` prints (Ray may print dicts of its own to stdout too: take the last block)."""
    lines = stdout.splitlines()
    first = max(k for k, line in enumerate(lines) if line == "{")
    last = next(k for k in range(first, len(lines)) if lines[k] == "}")
    return json.loads("\n".join(lines[first:last + 1]))


def _assert_best_is_one_report(row: dict, trial: Path, metric: str) -> None:
    """A results row's best metric, its kimg and its checkpoint are those of one report the trial made to Tune
    (its best, the latest of equals): the checkpoint is the one written at that report's step, and it is on disk
    beside at most the latest one (`keep_last: 1`)."""
    reports = [json.loads(line) for line in (trial / "result.json").read_text().splitlines() if line.strip()]
    best = min(reversed([r for r in reports if metric in r]), key=lambda r: r[metric])  # min keeps the first
    assert (float(row[f"best_{metric}"]), float(row["best_kimg"])) == (best[metric], best["kimg"]), (row, reports)
    assert row["checkpoint"] == str(trial / "train" / f"checkpoint_{best['step']:09d}"), (row, best)
    kept = sorted(str(p) for p in (trial / "train").glob("checkpoint_*") if p.is_dir())
    assert row["checkpoint"] in kept and len(kept) <= 2, kept


def _evaluations_in_tune(trial: Path, metric: str) -> list[float]:
    """The kimg of each row of the metric Tune got from a trial, checked to be a validation task's result: the
    row the task wrote to the run's `evals/`, with the path of the checkpoint it measured."""
    reports = [json.loads(line) for line in (trial / "result.json").read_text().splitlines() if line.strip()]
    rows = [r for r in reports if metric in r]
    for row in rows:
        written = json.loads((trial / "train" / "evals" / f"step_{row['step']:09d}.json").read_text())
        assert row["async_eval"] and (row["kimg"], row[metric]) == (written["kimg"], written[metric]), (row, written)
        assert row["checkpoint_path"] == str(trial / "train" / f"checkpoint_{row['step']:09d}"), row
    return [row["kimg"] for row in rows]


@pytest.mark.timeout(1200)
def test_readme_tune_command_from_the_repo_with_relative_paths(synthetic_shards, tune_ray):
    """The README's (and docs/tuning.md's) `uv run facediff tune configs/tune/demo.yaml`, run as a user runs it: from the repository,
    with relative paths into a git-ignored folder, under `uv run` (Ray then runs each trial in a packaged copy
    of the working directory, where that folder does not exist). Every trial must report the metric.
    The evaluations run in Ray Train's validation task (`eval.async_validation`, also started from that copy):
    Tune's rows of the metric are their results, each at the kimg of the checkpoint it measured.

    It runs before the ASHA test: on the test session's cluster (no dashboard, so no State API) Ray Train's
    placement-group cleaner cannot free the workers of trials ASHA stopped, and their CPUs stay reserved."""
    import os
    import shutil
    import subprocess
    import uuid

    rel = Path("outputs") / f"test-tune-{uuid.uuid4().hex[:8]}"
    # not the session dataset's cached features (other tests' evaluations wrote them): this run must extract its own
    shutil.copytree(synthetic_shards, REPO / rel / "shards", ignore=shutil.ignore_patterns("real_features"))
    uv = shutil.which("uv") or "uv"
    # share the test session's cluster (a second local instance would fight over its fixed agent ports)
    env = {**os.environ, "RAY_ADDRESS": tune_ray.get_runtime_context().gcs_address}
    try:
        done = subprocess.run(
            [uv, "run", "--frozen", "facediff", "tune", "configs/tune/demo.yaml", f"data.path={rel}/shards",
             f"storage_path={rel}/tune", "search_space={optimizer.lr: {grid: [1.0e-3, 3.0e-4]}}",
             # checkpoints off the evaluations' cadence (steps 3, 6; evaluations at 4, 8): only evaluations score
             "scheduler.max_kimg=0.128", "trainer.checkpoint_every_kimg=0.048",
             "eval.async_validation=true", "eval.async_resources={CPU: 0.5}"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=1100)
        assert done.returncode == 0, done.stderr[-3000:]
        summary = _printed_summary(done.stdout)
        assert summary["trials"] == 2 and summary["errors"] == 0 and summary["reported_metric"] == 2
        # facediff's progress line, not Tune's trial tables or the raylet's process-count notes
        progress = [line for line in done.stderr.splitlines() if line.startswith("tune demo: 2 trials")]
        assert progress and "best fd_mtcnn_onet" in progress[-1], done.stderr
        assert not any(state in progress[-1] for state in ("running", "pending", "errored")), progress[-1]
        assert "Trial status" not in done.stdout + done.stderr
        assert "worker processes have been started" not in done.stdout + done.stderr
        with open(REPO / rel / "tune" / "demo" / "results.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 2
        assert all(float(r["best_fd_mtcnn_onet"]) > 0 for r in rows), rows  # every trial reported the metric
        evaluated = {}
        for r in rows:
            trial = REPO / rel / "tune" / "demo" / r["trial"]
            _assert_best_is_one_report(r, trial, "fd_mtcnn_onet")
            evaluated[r["trial"]] = _evaluations_in_tune(trial, "fd_mtcnn_onet")
            # beside the metric: its bootstrap interval and the kernel distance with its own
            assert float(r["best_fd_mtcnn_onet_lo"]) < float(r["best_fd_mtcnn_onet_hi"]), r
            assert float(r["kd_mtcnn_onet_lo"]) < float(r["kd_mtcnn_onet_hi"]), r
        # in checkpoint order (ASHA may have stopped a trial after its first); one trial at least ran to the end
        assert all(k == [0.064, 0.128][:len(k)] and k for k in evaluated.values()), evaluated
        assert [0.064, 0.128] in evaluated.values(), evaluated
        markdown = (REPO / rel / "tune" / "demo" / "results.md").read_text()
        assert markdown.count(" [") >= 4 and "not separable" in markdown  # values shown with their intervals
        # the real features were extracted once, by the driver, before any trial: no trial wrote them again
        cached = list((REPO / rel / "shards" / "real_features").glob("*.safetensors"))
        first_logged = min(row["time"] for r in rows
                           for row in read_metrics(REPO / rel / "tune" / "demo" / r["trial"] / "train"))
        assert len(cached) == 1 and cached[0].stat().st_mtime < first_logged, cached
        best = json.loads((REPO / rel / "tune" / "demo" / "best.json").read_text())
        assert best == summary["best"] and best["checkpoint"] == min(rows, key=lambda r: float(
            r["best_fd_mtcnn_onet"]))["checkpoint"]
    finally:
        shutil.rmtree(REPO / rel, ignore_errors=True)


@pytest.mark.timeout(900)
def test_asha_grid_reports_stops_and_resumes(synthetic_shards, tmp_path):
    grid = tmp_path / "asha.yaml"
    grid.write_text(GRID)
    args = [f"data.path={synthetic_shards}", f"storage_path={tmp_path / 'tune'}"]
    summary = run_tune(grid, args)

    exp = tmp_path / "tune" / "asha"
    assert summary["experiment"] == str(exp) and summary["metric"] == "loss"
    with open(exp / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and summary["trials"] == 4 and summary["errors"] == 0
    assert sorted(float(r["optimizer.lr"]) for r in rows) == sorted([2e-3, 1.5e-3, 1e-3, BAD_LR])
    for r in rows:  # every trial reported, and every column is filled
        assert float(r["best_loss"]) > 0 and float(r["kimg"]) > 0, r
        assert r["outcome"] in ("completed", "stopped early") and r["stopped_early"] in ("True", "False")
        assert (r["stopped_early"] == "True") == (float(r["kimg"]) < 0.128)
        assert read_metrics(exp / r["trial"] / "train"), "each trial's Train run logs in its trial folder"
        _assert_best_is_one_report(r, exp / r["trial"], "loss")
        assert list((exp / r["trial"] / "train" / "tensorboard").glob("events.out.tfevents*"))
    bad = next(r for r in rows if float(r["optimizer.lr"]) == BAD_LR)
    assert bad["stopped_early"] == "True" and float(bad["kimg"]) < 0.128  # ASHA stopped the clearly worse trial
    assert summary["stopped_early"] >= 1
    assert any(r["outcome"] == "completed" and float(r["kimg"]) == pytest.approx(0.128) for r in rows)

    markdown = (exp / "results.md").read_text()
    assert markdown.count("\n| ") == 5 and "best_loss" in markdown  # header + 4 trials
    assert Image.open(summary["plot"]).size[0] > 100
    best = summary["best"]
    assert float(best["optimizer.lr"]) != BAD_LR and Path(best["checkpoint"]).is_dir()
    assert best["best_loss"] == min(float(r["best_loss"]) for r in rows)

    # the same command again restores the experiment: no trial is run again, the results are the same
    logged = {r["trial"]: (exp / r["trial"] / "train" / "metrics.jsonl").read_text() for r in rows}
    again = run_tune(grid, args)
    assert again["trials"] == 4 and again["best"]["trial"] == best["trial"]
    assert {t: (exp / t / "train" / "metrics.jsonl").read_text() for t in logged} == logged
    with open(exp / "results.csv") as f:
        assert list(csv.DictReader(f)) == rows




@pytest.mark.timeout(1200)
def test_killed_tune_command_keeps_finished_trials_when_run_again(synthetic_shards, tmp_path, tune_ray):
    """`facediff tune` SIGKILLed while its second trial trains, then the same command again: the finished trial
    is not run again (its worker started once, its rows are unchanged), the other one finishes."""
    import os
    import re
    import subprocess
    import sys
    import time

    grid = tmp_path / "kill.yaml"
    # ema_decay (every report carries it) rises with every step: under `mode: min` a trial's best report is
    # its first, whose checkpoint (step 2) Ray Train must keep beside the latest although `keep_last` is 1
    grid.write_text(two_trial_grid(0.16).replace("metric: loss", "metric: ema_decay"))  # 10 steps a trial
    exp = tmp_path / "tune" / "kill"
    command = [str(Path(sys.executable).parent / "facediff"), "tune", str(grid), f"data.path={synthetic_shards}",
               f"storage_path={tmp_path / 'tune'}"]
    env = {**os.environ, "RAY_ADDRESS": tune_ray.get_runtime_context().gcs_address,  # this module's instance
           "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # Tune saves its experiment state every second (default: >= 10 s)

    def trial_runs():
        return sorted(p.parent for p in exp.glob("*/train/config.yaml"))

    def finished(run: Path) -> bool:
        return (run / "export" / "model_index.json").is_file()

    def saved_status(run: Path) -> str | None:  # Tune's own saved record of a trial (what a restore reads)
        states = sorted(exp.glob("experiment_state-*.json"))
        try:
            trials = [json.loads(state) for state, _ in json.loads(states[-1].read_text())["trial_data"]]
        except (IndexError, ValueError, KeyError):  # not written yet, or being written
            return None
        return next((t["status"] for t in trials if t.get("trial_id") == run.parent.name), None)

    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        give_up = time.monotonic() + 600
        while time.monotonic() < give_up and first.poll() is None:
            runs = trial_runs()
            done = [r for r in runs if finished(r)]
            started = [r for r in runs if not finished(r) and read_metrics(r)]
            if done and started and saved_status(done[0]) == "TERMINATED":
                break
            time.sleep(0.2)
    finally:
        first.kill()
        first.wait()
    done = [r for r in trial_runs() if finished(r)]
    assert len(done) == 1 and len(trial_runs()) == 2, trial_runs()  # killed with one trial done, one training
    kept_rows = (done[0] / "metrics.jsonl").read_text()

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = _printed_summary(again.stdout)
    assert summary["trials"] == 2 and summary["errors"] == 0
    assert (done[0] / "metrics.jsonl").read_text() == kept_rows
    assert len(re.findall(r"rank 0 of 1:", (done[0] / "logs" / "rank0.log").read_text())) == 1  # never re-run
    for run in trial_runs():
        assert finished(run) and [r["step"] for r in read_metrics(run)] == list(range(1, 11))
    with open(exp / "results.csv") as f:
        first = next(r for r in csv.DictReader(f) if r["trial"] == done[0].parent.name)
    _assert_best_is_one_report(first, done[0].parent, "ema_decay")
    assert first["checkpoint"] == str(done[0] / "checkpoint_000000002") and float(first["best_kimg"]) == 0.032
    assert (done[0] / "checkpoint_000000010").is_dir()  # the latest, kept too
