"""Evaluation off the training path (`eval.async_validation: true`): each evaluation is Ray Train's checkpoint validation
task, on its own resources (`eval.async_resources`), while the workers go on training.

    trainer = TorchTrainer(..., validation_config=validation_config(cfg, storage))   # driver
    ray.train.report(metrics, checkpoint=..., validation=due(step, kimg))             # the loop, at an evaluation

The task loads the checkpoint's EMA weights the way `facediff evaluate` loads a run (`runs.checkpoints`),
evaluates them on the evaluation split in its own process, and writes its result into the run's `evals/` folder
(`evals/step_<step>.json`, one whole file: a row is read only once written). Ray merges the returned metrics
into the checkpoint's (its scoring and `Result` see them); rank 0's run log appends each arrived result to
`metrics.jsonl` and TensorBoard as a row tagged with the step and kimg of the checkpoint it measures
(`take_arrived`), and the driver appends the ones that arrive after the workers ended (the last checkpoint's).

Ray validates only registered checkpoints, i.e. whole ones (all ranks' files uploaded), and one at a time
(`MAX_IN_FLIGHT_VALIDATIONS`): evaluations that come faster than they finish queue up, none is dropped.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from facediff.config.schema import ExperimentConfig
    from facediff.storage import RunStorage

log = logging.getLogger("facediff.train")

EVALS_DIR = "evals"
# marks a metrics.jsonl row written from an evaluation task's result (not by the training loop at its step)
ASYNC_EVAL = "async_eval"


def result_name(step: int) -> str:
    return f"{EVALS_DIR}/step_{step:09d}.json"


def validation_config(cfg: ExperimentConfig, storage: RunStorage):
    """Ray Train's ValidationConfig for a run with `eval.async`, else None. The function travels pickled with
    the run's storage (its filesystem, endpoint included), so the task writes where the run lives."""
    if not (cfg.eval.every_kimg is not None and cfg.eval.async_validation):
        return None
    from ray.train.v2.api.validation_config import ValidationConfig

    resources = dict(cfg.eval.async_resources)
    remote = {"num_cpus": resources.pop("CPU", 1.0), "num_gpus": resources.pop("GPU", 0.0)}
    if resources:
        remote["resources"] = resources
    return ValidationConfig(fn=functools.partial(validate, experiment=cfg.model_dump(mode="json"), storage=storage),
                            ray_remote_kwargs=remote)


def due(step: int, kimg: float):
    """The `validation=` of a report whose checkpoint is to be evaluated (JSON: Ray stores pending ones)."""
    from ray.train.v2.api.validation_config import ValidationTaskConfig

    return ValidationTaskConfig(fn_kwargs={"step": step, "kimg": kimg})


def validate(checkpoint, *, experiment: dict, storage: RunStorage, step: int, kimg: float) -> dict[str, Any]:
    """The validation task: the checkpoint's EMA model against the evaluation split, on this task's device."""
    import torch

    from facediff.config.schema import ExperimentConfig
    from facediff.data.stream.local_batches import local_test_batches
    from facediff.eval.build import build_metrics
    from facediff.eval.evaluate import evaluate_task
    from facediff.eval.real_stats import use_real_cache
    from facediff.runs.checkpoints import load_task_with_ema

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
    return {k: v for k, v in row.items() if k not in ("step", "kimg", "time")}


def _write_whole(storage: RunStorage, relative: str, row: dict) -> None:
    """Written beside and renamed (local storage: a reader never sees half a file), then copied in one put."""
    target = storage.local / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_text(json.dumps(row) + "\n")
    os.replace(partial, target)
    storage.push(relative)


def take_arrived(storage: RunStorage, merged: set[int]) -> list[dict]:
    """The evaluation results in the run's `evals/` whose step is not in `merged` (which is updated), by step."""
    names = sorted(n for n, folder in storage.listing(EVALS_DIR).items() if not folder and n.endswith(".json"))
    rows = []
    for name in names:
        step = int(name.removeprefix("step_").removesuffix(".json"))
        if step not in merged:
            rows.append(json.loads(storage.read_bytes(f"{EVALS_DIR}/{name}")))
            merged.add(step)
    return rows


def merged_steps(rows: list[dict]) -> set[int]:
    """Steps whose evaluation result metrics.jsonl already holds."""
    return {row["step"] for row in rows if row.get(ASYNC_EVAL)}


def append_late_results(storage: RunStorage) -> list[dict]:
    """After `fit`: the results that arrived once the workers ended (Ray waits for its validation tasks before
    the run ends), appended to the stored metrics.jsonl and TensorBoard by the driver."""
    from torch.utils.tensorboard import SummaryWriter

    from facediff.train.run_log import METRICS_FILE, read_metrics

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


def add_scalars(writer, row: dict) -> None:
    for key, value in row.items():
        if key not in ("step", ASYNC_EVAL) and isinstance(value, (int, float)):
            writer.add_scalar(key, value, row["step"])
