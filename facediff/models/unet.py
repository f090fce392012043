"""Pixel-space UNet: `diffusers.UNet2DModel` with the config's fields as its constructor arguments."""

from __future__ import annotations

from diffusers import UNet2DModel

from facediff.config.schema import UNetModelConfig


def build_unet(cfg: UNetModelConfig) -> UNet2DModel:
    """A randomly initialised UNet2DModel; every field of `cfg` but `family` is a constructor argument."""
    return UNet2DModel(**cfg.model_dump(exclude={"family"}))
