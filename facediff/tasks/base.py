"""A task is one model family: it owns the family's networks, turns a batch into a training loss, draws
samples and exports the trained model. The trainer is generic over tasks; DeepSpeed wraps the task module
itself, so everything the task trains lives in one optimizer, one EMA and one checkpoint.

Whole networks a task uses but never trains (an SD pipeline's VAE and text encoder, the latent codec, LPIPS, the
face network) are *held frozen* (`hold_frozen`): attributes of the task that are not its submodules. DeepSpeed
therefore neither casts them to the training precision behind our back nor, under ZeRO-3, partitions them and
gathers them again at every forward, and they are not in the task's state dict (checkpoints, EMA). They follow
the task's device (`.to(...)`), and their precision is chosen by the task: `dtype=None` follows the precision of
the task's trainable weights (bf16 under a bf16 engine, fp32 in a plain evaluation copy), a fixed dtype (fp32
for the perceptual networks) stays.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from operator import attrgetter
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
        self._frozen: dict[str, torch.dtype | None] = {}  # held-frozen attribute -> its fixed dtype (None: follow)

    # ------------------------------------------------------------------------------------- frozen networks
    def hold_frozen(self, name: str, dtype: torch.dtype | None = None) -> None:
        """Unregister the network at `name` (an attribute path: "codec", "backbone.vae") from its parent module
        and keep it there as a plain attribute (see the module docstring): no gradients, eval mode, on the task's
        device, in `dtype` (None: the trainable weights' precision)."""
        owner_path, _, attr = name.rpartition(".")
        owner = attrgetter(owner_path)(self) if owner_path else self
        module = getattr(owner, attr)
        module.requires_grad_(False).eval()
        owner._modules.pop(attr, None)
        object.__setattr__(owner, attr, module)  # a plain attribute: nn.Module.__setattr__ would register it
        self._frozen[name] = dtype
        self._place_frozen(name)

    def frozen_networks(self) -> dict[str, nn.Module]:
        return {name: attrgetter(name)(self) for name in self._frozen}

    def frozen_networks_within(self, module: nn.Module) -> list[nn.Module]:
        """The held-frozen networks that are part of `module` (held on it or on one of its submodules): not among
        its parameters, yet part of the network (a frozen SegFormer backbone of the mask encoder)."""
        inside = []
        for name, held in self.frozen_networks().items():
            path = name.split(".")
            owners = (attrgetter(".".join(path[:i]))(self) for i in range(1, len(path)))
            if any(owner is module for owner in owners):
                inside.append(held)
        return inside

    def _place_frozen(self, name: str, device: torch.device | None = None) -> None:
        module = attrgetter(name)(self)
        first = next(module.parameters(), None)
        trained = next(self.parameters(), None)
        if first is None:
            return
        device = device if device is not None else (trained.device if trained is not None else None)
        dtype = self._frozen[name] or (trained.dtype if trained is not None else None)
        if (device is not None and first.device != device) or (dtype is not None and first.dtype != dtype):
            module.to(device=device, dtype=dtype)

    def place_frozen(self) -> None:
        """Bring the held-frozen networks to the trainable weights' device and precision (cheap when they are
        there: one comparison each). Called at the start of `forward` and `sample`, because DeepSpeed casts the
        trainable parameters in place, without a `.to()` the task could follow."""
        for name in self._frozen:
            self._place_frozen(name)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self._frozen:  # follow the task's device moves (`.to(device)`, `.cuda()`): the probe says where to
            device = fn(torch.zeros(())).device
            for name in self._frozen:
                self._place_frozen(name, device)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen_networks().values():  # frozen networks never leave eval mode
            module.eval()
        return self

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
    def checkpointed_networks(self) -> list[nn.Module]:
        """The networks `trainer.gradient_checkpointing` applies to: those the loss backpropagates through (trained,
        or frozen on the gradient's path), whose activations are most of a step's memory."""

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the checkpointed networks' block activations in the backward instead of keeping them
        (diffusers' and transformers' own checkpointing, torch.utils.checkpoint with use_reentrant=False). Only
        where gradients are on: sampling and evaluation copies are unaffected."""
        for net in self.checkpointed_networks():
            if hasattr(net, "enable_gradient_checkpointing"):  # diffusers ModelMixin
                net.enable_gradient_checkpointing()
            else:  # transformers PreTrainedModel
                net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @abstractmethod
    def networks(self) -> dict[str, nn.Module]:
        """Every network the task builds, by role (for `facediff info`)."""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
