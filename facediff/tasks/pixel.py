"""Unconditional pixel-space diffusion: a UNet2DModel or DiT denoising 3-channel faces."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMPipeline

from facediff import diffusion
from facediff.config.schema import ExperimentConfig
from facediff.models import build_network, model_output
from facediff.models.dit import disable_label_dropout
from facediff.tasks.base import DiffusionTask


class PixelDiffusion(DiffusionTask):
    def __init__(self, cfg: ExperimentConfig, load_pretrained: bool = True):
        super().__init__(cfg, load_pretrained)
        self.family = cfg.model.family
        self.net = build_network(cfg.model)
        self.scheduler = diffusion.build_noise_scheduler(cfg.diffusion)
        self.loss_fn = diffusion.build_loss(self.scheduler, cfg.diffusion)
        self.image_shape = (cfg.model.in_channels, cfg.model.sample_size, cfg.model.sample_size)
        # Batches and samples are images in [-1, 1] everywhere else; only the network's space changes.
        self.normalize = cfg.data.normalize

    def _denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model_output(self.net, x, t)

    def forward(self, batch, generator=None):
        x0 = batch["image"].to(device=self.device, dtype=torch.float32)  # noised in fp32, see DenoisingLoss
        if not self.normalize:
            x0 = (x0 + 1) / 2  # Table VI's no_norm: the network denoises pixels in [0, 1]
        per_sample, _ = self.loss_fn(self._denoise, x0, generator, input_dtype=self.dtype,
                                     progress=self.training_progress)
        return per_sample.mean()

    def sample(self, n, generator, sampler, steps, batch=None):
        scheduler = diffusion.build_sampler(sampler, self.scheduler)
        images = diffusion.sample(
            self._denoise, scheduler, (n, *self.image_shape), steps, generator, self.device, self.dtype
        )
        return images if self.normalize else (images * 2 - 1).clamp(-1, 1)

    def save_networks(self, out: Path) -> None:
        if self.family == "unet":
            DDPMPipeline(unet=self.net, scheduler=self.scheduler).save_pretrained(out)
        else:  # pixel-space DiT: diffusers' DiTPipeline expects a VAE, so export its two parts
            self.net.save_pretrained(out / self.subfolder)
            self.scheduler.save_pretrained(out / "scheduler")

    @property
    def subfolder(self) -> str:
        return "unet" if self.family == "unet" else "transformer"

    def load_exported(self, out: Path) -> None:
        self.net = type(self.net).from_pretrained(Path(out) / self.subfolder)
        if self.family == "dit":
            disable_label_dropout(self.net)  # from_pretrained restores diffusers' 10% class-label swap

    def checkpointed_networks(self):
        return [self.net]

    def networks(self):
        return {self.family: self.net}
