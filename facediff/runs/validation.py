"""The driver's and the task's side of `eval.async_validation` (`facediff/train/async_eval.py` has the loop's):
Ray Train's ValidationConfig for the run, the validation task that evaluates a registered checkpoint the way
`facediff evaluate` loads a run, and the results that arrive after the workers ended."""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from facediff.config.schema import ExperimentConfig
from facediff.data.shards import atomic_write_text
from facediff.data.stream.local_batches import local_test_batches
from facediff.eval.build import build_metrics
from facediff.eval.evaluate import evaluate_task
from facediff.eval.real_stats import use_real_cache
from facediff.runs.checkpoints import load_task_with_ema
from facediff.train.async_eval import ASYNC_EVAL, add_scalars, merged_steps, result_name, take_arrived
from facediff.train.run_log import METRICS_FILE, read_metrics

if TYPE_CHECKING:
    from facediff.storage import RunStorage

log = logging.getLogger("facediff.train")


def validation_config(cfg: ExperimentConfig, storage: RunStorage, forward: Callable | None = None):
    """Ray Train's ValidationConfig for a run with `eval.async`, else None. The function travels pickled with
    the run's storage (its filesystem, endpoint included), so the task writes where the run lives, and with
    `forward` (a Tune trial's: `tune.trial.MetricReportCallback.after_validation`), which the task calls with its
    result row and the checkpoint as soon as the row is written."""
    if not (cfg.eval.every_kimg is not None and cfg.eval.async_validation):
        return None
    from ray.train.v2.api.validation_config import ValidationConfig

    resources = dict(cfg.eval.async_resources)
    # "DEFAULT": not in the placement group of whatever launches the task (in a Tune trial Ray Train's controller
    # runs in the trial's, which child tasks join and which has no room for this one: it would wait forever)
    remote = {"num_cpus": resources.pop("CPU", 1.0), "num_gpus": resources.pop("GPU", 0.0),
              "scheduling_strategy": "DEFAULT"}
    if resources:
        remote["resources"] = resources
    return ValidationConfig(fn=functools.partial(validate, experiment=cfg.model_dump(mode="json"), storage=storage,
                                              forward=forward),
                            ray_remote_kwargs=remote)


def validate(checkpoint, *, experiment: dict, storage: RunStorage, step: int, kimg: float,
             forward: Callable | None = None) -> dict[str, Any]:
    """The validation task: the checkpoint's EMA model against the evaluation split, on this task's device."""
    cfg = ExperimentConfig.model_validate(experiment)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()
    with checkpoint.as_directory() as folder:
        task = load_task_with_ema(cfg, Path(folder)).to(device)
    metrics = build_metrics(cfg, device)
    use_real_cache(metrics.distance, cfg.data.path, cfg.data.eval_split, cfg.data.image_size)
    with torch.no_grad():  # the same seeds as the in-loop evaluation of this step on one rank
        results = evaluate_task(task, cfg, local_test_batches(cfg), metrics.distance, step,
                                attribute_metric=metrics.attributes, people_metric=metrics.people)
    row = {"step": step, "kimg": kimg, "time": time.time(), "eval_s": time.time() - started, ASYNC_EVAL: True,
           **{k: float(v) for k, v in results.items()}}
    _write_whole(storage, result_name(step), row)
    if forward is not None:  # now, not when Ray merges the result into the checkpoint (no callback sees that)
        forward(row, checkpoint)
    return {k: v for k, v in row.items() if k not in ("step", "kimg", "time")}


def _write_whole(storage: RunStorage, relative: str, row: dict) -> None:
    """Written beside and renamed (local storage: a reader never sees half a file), then copied in one put."""
    target = storage.local / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps(row) + "\n")
    storage.push(relative)


def append_late_results(storage: RunStorage) -> list[dict]:
    """After `fit`: the results that arrived once the workers ended (Ray waits for its validation tasks before
    the run ends), appended to the stored metrics.jsonl and TensorBoard by the driver."""
    from torch.utils.tensorboard import SummaryWriter

    storage.pull(METRICS_FILE)
    rows = take_arrived(storage, merged_steps(read_metrics(storage.local)))
    if not rows:
        return []
    with (storage.local / METRICS_FILE).open("a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    storage.pull("tensorboard")
    writer = SummaryWriter(str(storage.local / "tensorboard"))
    for row in rows:
        add_scalars(writer, row)
    writer.close()
    storage.push(METRICS_FILE)
    storage.push("tensorboard")
    log.info("evaluations that finished after training: %s", ", ".join(f"kimg {r['kimg']:g}" for r in rows))
    return rows
