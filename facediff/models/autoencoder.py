"""Frozen autoencoders of latent diffusion: images in [-1, 1] <-> scaled latents.

`LatentCodec(cfg.model.autoencoder, load_weights)` wraps a diffusers `VQModel` (`kind: vq`, e.g. the VQ-f4 of
CompVis/ldm-celebahq-256: 3x64x64 latents at 256 px) or `AutoencoderKL` (`kind: kl`, e.g. Stable Diffusion 2's
VAE: 4x32x32 at 256 px), built by the shared loader `build_from_ref` (preset architecture and/or pretrained
weights; a random init is seeded, so it is the same in every process). The wrapped network never trains: no
parameter requires grad and `.train()` leaves it in eval mode.

Which latents:
- VQ: the pre-quantisation encoder output (`VQModel.encode(x).latents`), as LDM's CelebA-HQ model was trained
  on; `decode` quantises them to the nearest codes first (`VQModel.decode` does), so a diffusion model's slightly
  off latents decode to valid codes.
- KL: the posterior mean, not a sample: deterministic, so a cached latent equals an on-the-fly one, and the
  posterior's standard deviation (~1e-2 x the mean's spread for SD's VAE) is far below the diffusion noise.

Scaling: latents are `(z - shift_factor) * scaling_factor`. `scaling_factor` is `cfg.scaling_factor` when set,
else the value the autoencoder's config states, else (the config does not state one) the convention of its kind:
1.0 for VQ (LDM trained on unscaled VQ latents; diffusers would fill in 0.18215, which is SD's KL value) and
diffusers' AutoencoderKL default 0.18215 (Stable Diffusion's) for KL. Caveat: `save_pretrained` writes every
default into config.json, so a VQModel re-saved by diffusers states 0.18215; set `scaling_factor` explicitly
for such a copy (the published CompVis/ldm-celebahq-256 config states none, so it gets 1.0).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, VQModel
from torch import nn

from facediff.models.pretrained import build_from_ref, preset_config
from facediff.rng import seeded_build

# Seed of a random-init codec (tiny presets, no weights): every process (Train workers, `prepare latents` actors,
# sampling) must build the same frozen autoencoder, or cached and on-the-fly latents would disagree.
RANDOM_INIT_SEED = 0
CLASSES: dict[str, type[nn.Module]] = {"vq": VQModel, "kl": AutoencoderKL}
# Used when an autoencoder's config does not state its scaling factor (see the module docstring).
KIND_DEFAULT_SCALING = {"vq": 1.0, "kl": 0.18215}


def _stated(config: Any, key: str) -> Any:
    """`config[key]` if the config stated it, None if diffusers filled in its own default (or it is absent)."""
    if key not in config or key in (config.get("_use_default_values") or ()):
        return None
    return config[key]


def unscaled_latents(model: nn.Module, kind: str, images: torch.Tensor) -> torch.Tensor:
    """The latents a latent model trains on, before scaling: VQ pre-quantisation, KL posterior mean (see above)."""
    if kind == "vq":
        return model.encode(images).latents
    return model.encode(images).latent_dist.mean


def resolve_scaling_factor(cfg, config: Any) -> float:
    if cfg.scaling_factor is not None:
        return float(cfg.scaling_factor)
    stated = _stated(config, "scaling_factor")
    return float(stated) if stated is not None else KIND_DEFAULT_SCALING[cfg.kind]


def _check_class(cfg, config: Any, where: str) -> None:
    name = config.get("_class_name")
    want = CLASSES[cfg.kind].__name__
    if name is not None and name != want:
        raise ValueError(f"{where}: is a {name}, but the autoencoder config says kind {cfg.kind!r} ({want})")


def _architecture(cfg) -> dict[str, Any]:
    """The autoencoder's config dict without building it: the preset, else the pretrained model's config.json
    (a local folder or the Hugging Face cache; may download a few bytes)."""
    if cfg.preset is not None:
        config, where = preset_config(cfg.preset), f"preset {cfg.preset!r}"
    else:
        kwargs = {k: v for k, v in (("subfolder", cfg.subfolder), ("revision", cfg.revision)) if v}
        config, where = dict(CLASSES[cfg.kind].load_config(cfg.pretrained, **kwargs)), f"{cfg.pretrained}"
    _check_class(cfg, config, where)
    return config


def latent_shape(cfg, image_size: int) -> tuple[int, int, int]:
    """(C, H, W) of the latents of an `image_size` image, from the architecture config alone (no weights)."""
    config = _architecture(cfg)
    factor = 2 ** (len(config["block_out_channels"]) - 1)  # every encoder block but the last halves the size
    if image_size % factor:
        raise ValueError(f"image size {image_size} is not divisible by the autoencoder's downsampling factor {factor}")
    return int(config["latent_channels"]), image_size // factor, image_size // factor


def scaling_factor(cfg) -> float:
    """The scaling factor a `LatentCodec` of `cfg` uses, from the architecture config alone (no weights)."""
    return resolve_scaling_factor(cfg, _architecture(cfg))


class LatentCodec(nn.Module):
    """A frozen VQ or KL autoencoder: `encode(images) -> scaled latents`, `decode(latents) -> images`."""

    def __init__(self, cfg, load_weights: bool):
        super().__init__()
        if cfg.preset is not None:
            _check_class(cfg, preset_config(cfg.preset), f"preset {cfg.preset!r}")
        with seeded_build(RANDOM_INIT_SEED):  # leaves the caller's RNG streams untouched
            model = build_from_ref(CLASSES[cfg.kind], cfg, load_weights)
        _check_class(cfg, model.config, cfg.pretrained or f"preset {cfg.preset!r}")
        self.model = model.requires_grad_(False).eval()
        self.kind: str = cfg.kind
        self.latent_channels = int(model.config.latent_channels)
        self.downsample = 2 ** (len(model.config.block_out_channels) - 1)
        self.scaling_factor = resolve_scaling_factor(cfg, model.config)
        self.shift_factor = float(_stated(model.config, "shift_factor") or 0.0)  # SD3/Flux VAEs; 0 for SD2, LDM

    def train(self, mode: bool = True) -> "LatentCodec":
        # Frozen: a parent's .train() must not switch on dropout or change normalisation behaviour here.
        return super().train(False)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        if image_size % self.downsample:
            raise ValueError(f"image size {image_size} is not divisible by the downsampling factor {self.downsample}")
        return self.latent_channels, image_size // self.downsample, image_size // self.downsample

    def _param(self) -> torch.Tensor:
        return next(self.model.parameters())

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f), in the codec's dtype."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encode expects images (B, 3, H, W), got {tuple(images.shape)}")
        self.latent_shape(images.shape[-1])  # a clear error for sizes the encoder cannot halve evenly
        p = self._param()
        z = unscaled_latents(self.model, self.kind, images.to(device=p.device, dtype=p.dtype))
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, h*f, w*f) clamped to [-1, 1] (VQ: quantised first)."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"decode expects latents (B, {self.latent_channels}, h, w), got {tuple(latents.shape)}")
        p = self._param()
        z = latents.to(device=p.device, dtype=p.dtype) / self.scaling_factor + self.shift_factor
        return self.model.decode(z).sample.clamp(-1.0, 1.0)

    @property
    def subfolder(self) -> str:
        """Where exports keep the autoencoder, as diffusers pipelines name it."""
        return "vqvae" if self.kind == "vq" else "vae"

    def save_pretrained(self, folder) -> None:
        self.model.save_pretrained(folder)

    def load_pretrained(self, folder) -> None:
        """Replace the weights with those of a diffusers folder (an export's `vqvae/` or `vae/`)."""
        self.model = CLASSES[self.kind].from_pretrained(folder).requires_grad_(False).eval()

    def describe(self) -> dict[str, Any]:
        """What a latent cache records about the codec that made it."""
        return {"kind": self.kind, "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "downsample": self.downsample, "latent_channels": self.latent_channels}
