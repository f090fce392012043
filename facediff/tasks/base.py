"""A task is one model family: it owns the family's networks, turns a batch into a training loss, draws
samples and exports the trained model. The trainer is generic over tasks; DeepSpeed wraps the task module
itself, so everything the task trains lives in one optimizer, one EMA and one checkpoint.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

from facediff.config import dump_config
from facediff.config.schema import ExperimentConfig


class DiffusionTask(nn.Module, ABC):
    EXPORT_CONFIG = "facediff.yaml"

    def __init__(self, cfg: ExperimentConfig, load_pretrained: bool = True):
        super().__init__()
        self.cfg = cfg
        self.load_pretrained = load_pretrained
        # the fraction of the run's steps done, set by the trainer before each step (phased timestep sampling)
        self.training_progress = 0.0

    @abstractmethod
    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """The scalar training loss of a batch (called through the DeepSpeed engine)."""

    @abstractmethod
    def sample(
        self, n: int, generator: torch.Generator, sampler: str, steps: int, batch: dict | None = None
    ) -> torch.Tensor:
        """`n` images in [-1, 1], shape (n, 3, H, W); `batch` carries conditions for conditional families."""

    def export(self, out: Path) -> None:
        """Save the networks (and scheduler) in diffusers format, plus the config that rebuilds the task."""
        out = Path(out)
        self.save_networks(out)
        (out / self.EXPORT_CONFIG).write_text(dump_config(self.cfg))

    @abstractmethod
    def save_networks(self, out: Path) -> None:
        """The diffusers-format part of `export`, loadable by plain diffusers without facediff."""

    @abstractmethod
    def load_exported(self, out: Path) -> None:
        """Load weights written by `save_networks`."""

    @abstractmethod
    def networks(self) -> dict[str, nn.Module]:
        """Every network the task builds, by role (for `facediff info`)."""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
