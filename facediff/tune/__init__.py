"""`facediff tune GRID.yaml [key=value ...]`: an ablation grid on Ray Tune with ASHA on the image metric.

Each trial runs `trial.run_trial`, which fits a TorchTrainer (Ray Train V2) and forwards its evaluation reports
(or, with `eval.async_validation`, its validation tasks' results) to Tune; ASHA (time attribute `kimg`) stops
weak trials early. Everything lands in the experiment folder
`storage_path/NAME/`: Tune's state, one folder per trial (`<trial_id>/train/` is its Train run with
checkpoints, `metrics.jsonl`, TensorBoard events and, when it finished, `export/`), and at the end
`results.csv`, `results.md`, `metric_vs_kimg.png` and `best.json` (the best report's metric, kimg and
checkpoint: `results`). Re-running the same command restores the
experiment: finished and stopped trials are kept, interrupted or errored ones resume from their checkpoints.
"""

from __future__ import annotations

import logging
import posixpath
from pathlib import Path

from facediff.tune.space import Experiment, is_image_metric, load_experiment, param_space

log = logging.getLogger("facediff.tune")
__all__ = ["Experiment", "load_experiment", "param_space", "run_tune", "required_cpus"]


def required_cpus(exp: Experiment) -> float:
    """Logical CPUs for the concurrent trials (driver + Train workers + evaluation task of `eval.async_validation`
    each) plus one for Ray Data."""
    base = exp.base
    per_trial = exp.grid.resources_per_trial.get("CPU", 0.0) + (
        base.trainer.num_workers * base.trainer.resources_per_worker.get("CPU", 1.0))
    if base.eval.async_validation and base.eval.every_kimg is not None:
        per_trial += base.eval.async_resources.get("CPU", 1.0)  # as `runs.validation.validation_config` asks
    concurrent = exp.grid.max_concurrent_trials or 1
    return concurrent * per_trial + 1


def _scheduler(exp: Experiment):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = exp.grid.scheduler
    if s.kind == "fifo":
        return FIFOScheduler()
    # stop_last_trials=False: a trial that reaches the end finishes by itself (and exports its model) instead
    # of being stopped by the scheduler at its last report
    return ASHAScheduler(time_attr="kimg", max_t=exp.total_kimg, grace_period=s.grace_period_kimg,
                         reduction_factor=s.reduction_factor, stop_last_trials=False)


def run_tune(grid_path: str | Path, overrides: list[str] | None = None) -> dict:
    """Run (or resume) the experiment of a grid file; returns the best trial's summary and the output files."""
    from ray import tune

    # lazily: every trial process imports this package first; Ray Tune's driver side stays out of it
    from facediff.console import verbose
    from facediff.ray_start import start_ray
    from facediff.train import tracking
    from facediff.tune.progress_line import TuneProgressLine
    from facediff.tune.results import BEST, best_trial, plot_metric, trial_rows, write_table
    from facediff.tune.trial import run_trial, trial_dirname

    exp = load_experiment(grid_path, overrides)
    exp.check_data()
    if is_image_metric(exp.metric):  # once here, not once per trial starting in parallel (docs/evaluation.md)
        from facediff.config import ExperimentConfig
        from facediff.eval.build import prepare_real_features

        try:
            for config in exp.configs.values():  # each training config the grid names, paths resolved
                prepare_real_features(ExperimentConfig.model_validate(config))
        except (FileNotFoundError, ValueError) as err:  # the trials' own evaluations will say it, per trial
            log.warning("real features not prepared: %s", err)
    log.info("experiment %s: %s; metric %s (%s), %s scheduler, trials of %s kimg",
             exp.name, exp.storage.uri, exp.metric, exp.grid.mode, exp.grid.scheduler.kind, exp.total_kimg)
    start_ray(required_cpus(exp))
    # the experiment's MLflow/W&B run, the trials' runs nested under it (`tracking:` of the training config)
    parent = tracking.start_parent(exp.base, exp.storage, exp.name, exp.grid.model_dump(mode="json"))
    trainable = tune.with_resources(tune.with_parameters(run_trial, experiment=exp, tracking_parent=parent),
                                    dict(exp.grid.resources_per_trial))
    storage = exp.storage
    # remote: Tune gets the filesystem itself (with its endpoint and options) and the path without the scheme
    where = {"storage_filesystem": storage.fs if storage.remote else None}
    if tune.Tuner.can_restore(storage.root, **where):
        log.info("resuming experiment %s: finished trials are kept, unfinished and errored ones resume",
                 storage.uri)
        tuner = tune.Tuner.restore(storage.root, trainable=trainable, resume_errored=True, **where)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(exp.grid),
            tune_config=tune.TuneConfig(
                metric=exp.metric, mode=exp.grid.mode, scheduler=_scheduler(exp), num_samples=exp.grid.num_samples,
                max_concurrent_trials=exp.grid.max_concurrent_trials, trial_dirname_creator=trial_dirname,
            ),
            # Tune's trial tables (every 30 s) only with --verbose; facediff's line otherwise (a resumed
            # experiment gets both settings back from its saved run config)
            run_config=tune.RunConfig(
                name=exp.name, storage_path=posixpath.dirname(storage.root), **where,
                verbose=None if verbose() else 0,
                callbacks=[TuneProgressLine(exp.name, exp.metric, exp.grid.mode, exp.total_kimg)]),
        )
    results = tuner.fit()
    exp.dir.mkdir(parents=True, exist_ok=True)  # the results are written here, then copied to remote storage
    rows = trial_rows(results, exp)
    csv_path, md_path = write_table(rows, exp)
    best = best_trial(rows, exp)
    plot = plot_metric(rows, exp)
    for written in (csv_path, md_path, plot, exp.dir / BEST):
        storage.push(written.name)
    tracking.finish_run(exp.base, parent, [csv_path, md_path, plot, exp.dir / BEST])
    errors = [r for r in results if r.error is not None]
    summary = {
        "experiment": storage.uri, "metric": exp.metric, "trials": len(rows),
        "stopped_early": sum(r["stopped_early"] for r in rows),
        "errors": len(errors),
        "first_error": str(errors[0].error).strip().splitlines()[-1][:300] if errors else None,
        "reported_metric": sum(r[f"best_{exp.metric}"] is not None for r in rows),
        **{key: f"{storage.uri}/{path.name}" for key, path in (("table", csv_path), ("markdown", md_path),
                                                                  ("plot", plot))},
        "best": best,
    }
    log.info("experiment %s done: %d trials, %d stopped early; best %s = %s at %s kimg (%s)", exp.name, len(rows),
             summary["stopped_early"], exp.metric, best and best[f"best_{exp.metric}"], best and best["best_kimg"],
             best and best["checkpoint"])
    return summary
