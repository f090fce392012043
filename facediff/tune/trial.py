"""One Tune trial: a driver function that builds and fits a TorchTrainer and forwards its reports to Tune.

This is the Ray Train V2 form (`Tuner(TorchTrainer(...))` fails in this Ray version): the trial function calls
`facediff.train.run.train` with a Ray Train callback that forwards each report to the trial's Tune session.
The trial's Train run lives in its Tune trial folder (`EXPERIMENT/<trial_id>/train`), so re-running an
interrupted trial resumes its Train run from its last checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from facediff.train.run_log import CHECKPOINT_ONLY

log = logging.getLogger("facediff.tune")


class MetricReportCallback(TuneReportCallback):
    """Forward to Tune only the trainer's reports that carry `metric` (ASHA reads it at every result). A
    checkpoint between evaluations carries a placeholder for Ray Train's checkpoint scoring (`loop._scored`), marked
    `CHECKPOINT_ONLY`: not forwarded either. Each forwarded report carries its checkpoint's path
    (`checkpoint_path`): in a trial every evaluation writes one, so the results name the checkpoint of the
    very report that scored best. With `eval.async_validation` the evaluations come from Ray Train's validation
    tasks instead (`after_validation`); the loop's reports then hold no evaluation (an image metric there is the
    placeholder), so for an image metric Tune's rows are the evaluations, each at the kimg of its checkpoint.

    A report that carries an image distance under another name means the trial reports something other than
    what the experiment resolved (e.g. Inception weights on a worker node but not on the driver): it fails
    the trial with both names rather than let ASHA compare different metrics.
    """

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        row = metrics[0]
        if self.metric in row:
            if not row.get(CHECKPOINT_ONLY):
                super().after_report(run_context, metrics, checkpoint)
            return
        other = [k for k in row if k == "fid" or k.startswith("fd_")]
        if other:
            raise RuntimeError(f"the trainer reported {other} but this experiment's metric is {self.metric!r}")

    def after_validation(self, row: dict[str, Any], checkpoint) -> None:
        """`eval.async_validation`: called in the trial's validation task (this callback travels pickled in the
        run's ValidationConfig) with an evaluation's result row, which carries the step and kimg of the checkpoint
        it measured. Forwarded as a report is, with that checkpoint's path, into the queue the trial's Tune
        session drains: ASHA sees the evaluation as soon as it is done. The put waits while the queue (one item)
        is full; Ray Train waits for its validation tasks before `fit` returns, so the last row is in the queue
        before the trial function ends, and the session takes what is left there once the function has ended."""
        self.after_report(None, [row], checkpoint)


def run_trial(params: dict[str, Any], experiment, tracking_parent: dict | None = None) -> None:
    """The Tune function trainable (`experiment`, and the experiment's tracker run `tracking_parent`, come
    through `tune.with_parameters`)."""
    import ray.tune

    # lazily: the trainer (Ray Train, DeepSpeed) loaded in the trial's process only
    from facediff.train.run import train

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = experiment.trial_config(params, trial_id)
    log.info("trial %s: %s", trial_id, {k: v for k, v in params.items()})
    forward = MetricReportCallback(experiment.metric)
    train(cfg, callbacks=[forward], progress=False, storage=experiment.trial_run(trial_id),
          score=(experiment.metric, experiment.grid.mode),
          tracking_parent=tracking_parent and {**tracking_parent, "trial": trial_id},
          forward_evaluation=forward.after_validation)


def trial_dirname(trial) -> str:
    """Trial folders named by trial id: stable across restores and short (values like file paths stay out)."""
    return trial.trial_id
