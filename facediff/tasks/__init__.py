"""Model families as tasks: `build_task(cfg)` picks the task class from `cfg.model.family`."""

from __future__ import annotations

import torch

from facediff.config.schema import ExperimentConfig
from facediff.tasks.base import DiffusionTask
from facediff.tasks.controlnet import ControlNetPeople
from facediff.tasks.latent import LatentConditionalDiffusion
from facediff.tasks.pixel import PixelDiffusion
from facediff.tasks.sd_lora import StableDiffusionLoRA

TASKS: dict[str, type[DiffusionTask]] = {
    "unet": PixelDiffusion,
    "dit": PixelDiffusion,
    "lc_unet": LatentConditionalDiffusion,
    "sd_lora": StableDiffusionLoRA,
    "controlnet": ControlNetPeople,
}


def build_task(cfg: ExperimentConfig, load_pretrained: bool = True) -> DiffusionTask:
    """The task of `cfg.model.family`, initialised from `trainer.seed` whatever the global RNG holds.

    Seeding here makes every build of a config identical: all ranks start from the same weights, and frozen
    networks with random weights (tiny presets) are the same in training, sampling and evaluation.
    `load_pretrained=False` builds pretrained networks from their shipped architecture only (no weights read).
    """
    family = cfg.model.family
    if family not in TASKS:
        raise ValueError(f"model family {family!r} has no training task yet; trainable families: {sorted(TASKS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.trainer.seed)
        return TASKS[family](cfg, load_pretrained=load_pretrained)


__all__ = ["DiffusionTask", "TASKS", "build_task"]
