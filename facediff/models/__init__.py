"""Denoising networks built from a model config, and one call that hides how each family is invoked.

`build_network(cfg.model)` dispatches on `cfg.model.family` through `BUILDERS`; a family without a builder is a
`ValueError` that lists those that have one. `model_output(model, x, t)` returns the network's prediction in the
diffusion's `prediction_type` space (epsilon, v or x0), with the shape of `x`, whatever the family.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DiTTransformer2DModel

from facediff.models.conditional import build_conditional_unet
from facediff.models.dit import build_dit, class_labels
from facediff.models.unet import build_unet

# family name -> builder(model_cfg) -> randomly initialised nn.Module. Add a family by adding an entry.
BUILDERS: dict[str, Callable[..., torch.nn.Module]] = {
    "unet": build_unet,
    "dit": build_dit,
    "lc_unet": build_conditional_unet,  # the UNet alone; its task adds the autoencoder and condition encoder
}


def build_network(model_cfg) -> torch.nn.Module:
    family = model_cfg.family
    builder = BUILDERS.get(family)
    if builder is None:
        raise ValueError(f"model family {family!r} has no network builder; families with one: {sorted(BUILDERS)}")
    return builder(model_cfg)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The network under DDP/DeepSpeed (`.module`) or torch.compile (`._orig_mod`) wrappers, to read its type."""
    for attr in ("_orig_mod", "module"):
        inner = getattr(model, attr, None)
        if isinstance(inner, torch.nn.Module):
            return _unwrap(inner)
    return model


def model_output(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """The denoiser's output for noisy `x` (N, C, H, W) at timesteps `t` (scalar or (N,)), shaped like `x`.

    UNet2DModel is called as `model(x, t)`; a DiT as `model(x, timestep=t, class_labels=zeros)`. A network with
    2*C output channels (learned variance) has its variance half dropped: only the prediction is returned.
    """
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])  # DiT's timestep embedding needs one value per sample
    if isinstance(_unwrap(model), DiTTransformer2DModel):
        out = model(x, timestep=t, class_labels=class_labels(x.shape[0], x.device)).sample
    else:
        out = model(x, t).sample
    if out.shape[1] == 2 * x.shape[1]:
        out = out[:, : x.shape[1]]
    return out


__all__ = ["BUILDERS", "build_network", "model_output", "build_unet", "build_dit"]
