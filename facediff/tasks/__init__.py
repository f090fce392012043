"""Model families as tasks: `build_task(cfg)` picks the task class from `cfg.model.family`."""

from __future__ import annotations

import importlib

from facediff.config.schema import ExperimentConfig
from facediff.rng import seeded_build
from facediff.tasks.base import DiffusionTask

# family -> "module:class", imported when a run builds that family: the others' imports (diffusers' ControlNet,
# peft, lpips, facenet-pytorch) cost every Ray worker seconds of start-up it does not need
TASKS: dict[str, str] = {
    "unet": "facediff.tasks.pixel:PixelDiffusion",
    "dit": "facediff.tasks.pixel:PixelDiffusion",
    "lc_unet": "facediff.tasks.latent:LatentConditionalDiffusion",
    "sd_lora": "facediff.tasks.sd_lora:StableDiffusionLoRA",
    "controlnet": "facediff.tasks.controlnet:ControlNetPeople",
}


def task_class(family: str) -> type[DiffusionTask]:
    if family not in TASKS:
        raise ValueError(f"model family {family!r} has no training task yet; trainable families: {sorted(TASKS)}")
    module, name = TASKS[family].split(":")
    return getattr(importlib.import_module(module), name)


def build_task(cfg: ExperimentConfig, load_pretrained: bool = True) -> DiffusionTask:
    """The task of `cfg.model.family`, initialised from `trainer.seed` whatever the global RNG holds.

    Seeding here makes every build of a config identical: all ranks start from the same weights, and frozen
    networks with random weights (tiny presets) are the same in training, sampling and evaluation.
    `load_pretrained=False` builds pretrained networks from their shipped architecture only (no weights read).
    `trainer.gradient_checkpointing` is applied here, so every build of a training config has it.
    """
    cls = task_class(cfg.model.family)
    with seeded_build(cfg.trainer.seed):
        task = cls(cfg, load_pretrained=load_pretrained)
    if cfg.trainer.gradient_checkpointing:
        task.enable_gradient_checkpointing()
    return task


__all__ = ["DiffusionTask", "TASKS", "build_task", "task_class"]
