"""Model families as tasks: `build_task(cfg)` picks the task class from `cfg.model.family`."""

from __future__ import annotations

from facediff.config.schema import ExperimentConfig
from facediff.tasks.base import DiffusionTask
from facediff.tasks.pixel import PixelDiffusion

TASKS: dict[str, type[DiffusionTask]] = {"unet": PixelDiffusion, "dit": PixelDiffusion}


def build_task(cfg: ExperimentConfig) -> DiffusionTask:
    family = cfg.model.family
    if family not in TASKS:
        raise ValueError(f"model family {family!r} has no training task yet; trainable families: {sorted(TASKS)}")
    return TASKS[family](cfg)


__all__ = ["DiffusionTask", "TASKS", "build_task"]
