"""The console: a driver-side progress line per run, Ray's internals off the terminal unless --verbose."""

import io
import json
import os

import pytest

from facediff import console, ray_start


class Tty(io.StringIO):
    def isatty(self):
        return True


def write_rows(path, rows):
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def rows(n, total_kimg=4.0):
    return [{"step": i, "kimg": total_kimg * i / n, "loss": 1.0 / i, "images_per_s": 30.0} for i in range(1, n + 1)]


def test_progress_prints_a_line_per_tenth_when_not_a_terminal(tmp_path):
    metrics, out = tmp_path / "metrics.jsonl", io.StringIO()
    with console.RunProgressLine("train tiny", metrics, 4.0, stream=out, interval_s=0.01) as progress:
        write_rows(metrics, rows(40)[:-1] + [{**rows(40)[-1], "fd_mtcnn_onet": 0.42}])
        progress._poll()
    lines = out.getvalue().splitlines()
    assert lines[0] == "train tiny: starting Ray workers ..."
    assert len(lines) == 1 + 11  # the first row, then one per tenth of the run; the last not repeated at exit
    assert lines[-1].startswith("train tiny [####################] 4.00/4.00 kimg  30 img/s  loss 0.0250")
    assert "fd_mtcnn_onet 0.420" in lines[-1] and "took" in lines[-1]
    assert "\r" not in out.getvalue()


def test_progress_redraws_one_line_on_a_terminal_and_survives_a_rewritten_log(tmp_path):
    metrics, out = tmp_path / "metrics.jsonl", Tty()
    write_rows(metrics, rows(4))  # a previous attempt's rows: not this run's progress
    with console.RunProgressLine("train tiny", metrics, 4.0, stream=out, interval_s=0.01) as progress:
        metrics.write_text("")  # the resumed run drops rows past its checkpoint
        write_rows(metrics, rows(8)[:3])
        progress._poll()
        assert progress._last["step"] == 3
    text = out.getvalue()
    assert text.count("\n") == 1  # only the final line ends: "starting" and every update redraw in place
    assert text.rstrip("\n").split("\r\x1b[2K")[-1].startswith("train tiny [#######-------------] 1.50/4.00 kimg")


def test_progress_ends_at_the_kimg_trained_and_epochs_are_images_over_the_split(tmp_path, tiny_config):
    """The user's run: 0.1 kimg at 2 workers x 8 images is 6.25 steps; the run trains 7 whole steps (112 images)
    and the line ended at `0.11/0.1 kimg`. Now it counts towards 0.112, said once before the line."""
    from facediff.train.run_log import epochs_seen, planned_kimg, rounding_note

    cfg = tiny_config(["trainer.total_kimg=0.1"])  # 2 workers x batch 8
    assert planned_kimg(cfg, 2) == pytest.approx(0.112)
    note = rounding_note(cfg, 2)
    assert note == "trainer.total_kimg 0.1 is 6.25 steps of 16 images: training 7 whole steps, 0.112 kimg"
    assert rounding_note(tiny_config(["trainer.total_kimg=0.112"]), 2) is None  # whole steps: nothing to say
    metrics, out = tmp_path / "metrics.jsonl", io.StringIO()
    with console.RunProgressLine("train exp", metrics, planned_kimg(cfg, 2), stream=out, interval_s=0.01,
                             note=note) as progress:
        write_rows(metrics, [{"step": s, "kimg": s * 16 / 1000, "loss": 0.5} for s in range(1, 8)])
        progress._poll()
    lines = out.getvalue().splitlines()
    assert lines[0] == f"train exp: {note}"
    assert lines[-1].startswith("train exp [####################] 0.112/0.112 kimg  loss 0.5000  took")
    # `epoch` in metrics.jsonl: the 58-face set logged epoch 5 (the newest row tag) at step 6, after 96 images
    assert epochs_seen(6 * 16, 58) == pytest.approx(1.655)
    assert epochs_seen(58, 58) == 1.0


@pytest.mark.parametrize("loud", [False, True])
@pytest.mark.parametrize("start", ["start_ray", "join_cluster"])
def test_start_ray_and_a_jobs_driver_keep_workers_output_off_the_terminal_unless_verbose(monkeypatch, loud, start):
    """`join_cluster` is `ray_jobs/*.py`'s: a job's output is its driver's, kept as quiet as the CLI's terminal."""
    import ray
    import ray.data

    from ray._private import worker

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(worker, "print_to_stdstream", worker.print_to_stdstream)  # restored after the test
    monkeypatch.setattr(ray.data.DataContext.get_current(), "enable_progress_bars", True)
    console.set_verbose(loud)
    try:
        ray_start.start_ray(3.5) if start == "start_ray" else ray_start.join_cluster()
    finally:
        console.set_verbose(False)
    assert calls[0]["log_to_driver"] is loud and calls[0]["logging_level"] == (20 if loud else 40)
    assert calls[0]["num_cpus"] >= 4 if start == "start_ray" else calls[0]["address"] == "auto"
    assert ray.data.DataContext.get_current().enable_progress_bars is loud


def test_a_jobs_verbose_flag_or_environment_becomes_the_clis_flag(monkeypatch):
    from conftest import REPO

    monkeypatch.syspath_prepend(str(REPO / "ray_jobs"))
    from _connect import cli_args

    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    assert cli_args("train", ["c.yaml", "a=1"]) == ["train", "c.yaml", "a=1"] and not console.verbose()
    assert cli_args("train", ["c.yaml", "--verbose", "a=1"]) == ["--verbose", "train", "c.yaml", "a=1"]
    assert console.verbose()  # join_cluster, before the CLI, reads it
    console.set_verbose(False)
    assert cli_args("tune", ["-v", "g.yaml"]) == ["--verbose", "tune", "g.yaml"]
    monkeypatch.setenv(console.VERBOSE_ENV, "1")  # `ray job submit --runtime-env-json` env_vars
    assert cli_args("tune", ["g.yaml"]) == ["--verbose", "tune", "g.yaml"]


def test_raylet_startup_notes_stay_off_the_terminal_but_its_errors_do_not(monkeypatch):
    from ray._private import worker

    printed = []
    monkeypatch.setattr(worker, "print_to_stdstream", lambda data, ignore_prefix: printed.append(data["lines"]))
    ray_start.keep_raylet_notes_off_the_terminal()
    ray_start.keep_raylet_notes_off_the_terminal()  # once is enough: not wrapped twice
    note = ("WARNING: 8 PYTHON worker processes have been started on node: abc with address: 192.0.2.2, which "
            "is 4x the maximum expected startup concurrency (2).")
    died = "A worker died or was killed while executing a task by an unexpected system error."
    worker.print_to_stdstream({"lines": [note], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    worker.print_to_stdstream({"lines": [died], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    worker.print_to_stdstream({"lines": [note], "pid": 1234, "is_err": False}, ignore_prefix=False)  # a worker's
    assert printed == [[died], [note]]


def test_tune_progress_counts_outcomes_keeps_the_best_and_prints_only_when_counts_change():
    import pickle
    import sys
    from types import SimpleNamespace

    from facediff.tune.progress_line import TuneProgressLine

    def trial(trial_id, status, kimg=None, best=None):
        return SimpleNamespace(trial_id=trial_id, status=status,
                               last_result={} if kimg is None else {"kimg": kimg},
                               metric_analysis={} if best is None else {"fd_mtcnn_onet": {"min": best, "max": 9.0}})

    out = io.StringIO()
    progress = TuneProgressLine("lr", "fd_mtcnn_onet", "min", 0.5, stream=out)
    trials = [trial("a", "RUNNING"), trial("b", "PENDING")]
    progress.on_trial_start(0, trials, trials[0])
    progress.on_trial_result(1, trials, trials[0], {})  # counts unchanged: no new line off a terminal
    trials = [trial("a", "TERMINATED", 0.5, 1.2), trial("b", "RUNNING", 0.1, 0.9)]
    progress.on_trial_complete(2, trials, trials[0])
    trials = [trial("a", "TERMINATED", 0.5, 1.2), trial("b", "TERMINATED", 0.25, 0.9), trial("c", "ERROR")]
    progress.on_trial_complete(3, trials, trials[1])
    progress.on_experiment_end(trials)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in out.getvalue()
    assert lines[0].startswith("tune lr: 2 trials  1 running  1 pending  ")
    assert lines[1].startswith("tune lr: 2 trials  1 running  1 completed  best fd_mtcnn_onet 0.900 (trial b)")
    assert lines[2].startswith("tune lr: 3 trials  1 completed  1 stopped early  1 errored  best fd_mtcnn_onet 0.900")
    assert lines[3].split("  ")[:-1] == lines[2].split("  ")[:-1]  # the final line, its time aside
    restored = pickle.loads(pickle.dumps(progress))  # Tune saves its callbacks with the experiment
    assert restored.stream is sys.stderr and restored.metric == "fd_mtcnn_onet"


def test_deepspeed_warnings_in_the_driver_only_with_verbose():
    import logging

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger, handler = logging.getLogger("DeepSpeed"), Keep(level=logging.DEBUG)
    logger.addHandler(handler)  # as DeepSpeed's own stdout handler is, whenever deepspeed is first imported
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        console.setup_logging(False)
        console.setup_logging(False)  # one filter, not two
        logger.warning("Setting accelerator to CPU.")
        logger.error("an error")
        console.setup_logging(True)
        logger.warning("verbose: shown")
    finally:
        console.setup_logging(False)
        console.set_verbose(False)
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert seen == ["an error", "verbose: shown"]
    assert len(logger.filters) == 1


def test_verbose_flag_reaches_ray_processes_through_the_environment(monkeypatch):
    from typer.testing import CliRunner

    from facediff.cli.main import app

    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    CliRunner().invoke(app, ["--verbose", "info", "configs/experiments/tiny/tiny_unet.yaml"])
    assert console.verbose()
    CliRunner().invoke(app, ["info", "configs/experiments/tiny/tiny_unet.yaml"])
    assert not console.verbose()


def test_a_failed_job_is_one_line_with_its_cause_and_exit_1(monkeypatch):
    import typer
    from typer.testing import CliRunner

    from facediff.cli.errors import job_failures

    app = typer.Typer()

    @app.command()
    def run():
        with job_failures("training"):
            raise RuntimeError("Training failed.\n  File worker.py, line 3\nNonFiniteLoss: step 2: the loss is not finite")

    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    result = CliRunner().invoke(app, [])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: training failed: NonFiniteLoss: step 2: the loss is not finite (run again with --verbose for the traceback)"]
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert isinstance(CliRunner().invoke(app, []).exception, RuntimeError)  # --verbose: the real error


@pytest.mark.ray
def test_local_ray_workers_run_at_the_drivers_priority(ray_session):
    """Ray's default worker niceness (15) let two busy processes starve the demo's training workers to ~1 img/s."""

    @ray_session.remote
    def niceness():
        return os.nice(0)

    assert ray_session.get(niceness.remote()) == os.nice(0)
