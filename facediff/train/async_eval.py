"""Evaluation off the training path (`eval.async_validation: true`): each evaluation is Ray Train's checkpoint validation
task, on its own resources (`eval.async_resources`), while the workers go on training.

    trainer = TorchTrainer(..., validation_config=validation_config(cfg, storage))   # driver (runs/validation.py)
    ray.train.report(metrics, checkpoint=..., validation=due(step, kimg))             # the loop, at an evaluation

This module is the training side (what the loop and the run log need); the task itself and the driver's part are
in `facediff/runs/validation.py`, beside the run loading the task uses.

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

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from facediff.storage import RunStorage

EVALS_DIR = "evals"
# marks a metrics.jsonl row written from an evaluation task's result (not by the training loop at its step)
ASYNC_EVAL = "async_eval"


def result_name(step: int) -> str:
    return f"{EVALS_DIR}/step_{step:09d}.json"


def due(step: int, kimg: float):
    """The `validation=` of a report whose checkpoint is to be evaluated (JSON: Ray stores pending ones)."""
    from ray.train.v2.api.validation_config import ValidationTaskConfig

    return ValidationTaskConfig(fn_kwargs={"step": step, "kimg": kimg})


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


def add_scalars(writer, row: dict) -> None:
    for key, value in row.items():
        if key not in ("step", ASYNC_EVAL) and isinstance(value, (int, float)):
            writer.add_scalar(key, value, row["step"])
