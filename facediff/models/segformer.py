"""The part-mask encoder of latent conditional models: SegFormer over the grouped part masks -> one vector.

    encoder = PartMaskEncoder(cfg.model.mask_encoder, num_groups=10, load_weights=True)
    vector = encoder(batch["part_masks"])  # (B, G, H, W) {0,1} -> (B, proj_dim)

The backbone is transformers' `SegformerModel` (the Mix Transformer encoder, no decode head), built by
`facediff.models.pretrained.build_from_ref` from a preset and/or pretrained weights: a hub id such as
`nvidia/segformer-b0-finetuned-ade-512-512` or a folder written by `facediff train-segformer`. Both are
`SegformerForSemanticSegmentation` checkpoints; `SegformerModel.from_pretrained` keeps their `segformer.*`
weights (transformers strips the `base_model_prefix`) and drops the decode head.

Its last stage is average-pooled over space and projected by a Linear to `proj_dim` (always trained).

Input modes (`cfg.input`):
- "labels": the masks become a label image (pixel = 1 + index of the last group set there, 0 = none; later groups
  win where custom groups overlap) rendered in a fixed palette and normalised like SegFormer's RGB input
  (ImageNet mean/std), so the pretrained 3-channel patch embedding is used as it is.
- "channels": the G masks are G input channels of a new first patch embedding. It is initialised from the
  (pretrained) RGB kernel so that, at init, it computes exactly what the "labels" mode computes away from the image
  border: kernel_g = sum_c W_c * (palette_g,c - palette_bg,c) and bias = b + sum_c palette_bg,c * sum(W_c). Unlike
  a replicated mean kernel (every group identical, only the union of masks visible), groups stay distinguishable
  even when the backbone is frozen, and activations keep the scale the pretrained layers expect.

`cfg.frozen`: the backbone (including an adapted patch embedding) takes no gradient, runs without building a
graph and stays in eval mode when a parent module calls `.train()`; only the projection trains.
"""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from torch import Tensor, nn
from transformers import SegformerModel

from facediff.config.schema import MaskEncoderConfig
from facediff.models.pretrained import build_from_ref

# SegformerImageProcessor's defaults (ImageNet statistics), applied to [0, 1] RGB.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def group_palette(num_groups: int) -> np.ndarray:
    """(G+1, 3) uint8 colours: black for "no group", then G hues evenly spaced around the colour wheel
    (alternating brightness so neighbouring hues differ more), fixed for a given G."""
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    colours = [(0, 0, 0)]
    for g in range(num_groups):
        r, gr, b = colorsys.hsv_to_rgb(g / num_groups, 1.0, 1.0 if g % 2 == 0 else 0.65)
        colours.append((round(255 * r), round(255 * gr), round(255 * b)))
    return np.array(colours, dtype=np.uint8)


def normalized_palette(num_groups: int) -> Tensor:
    """The palette as SegFormer sees an RGB image: (rgb / 255 - mean) / std, shape (G+1, 3) float32."""
    rgb = torch.tensor(group_palette(num_groups), dtype=torch.float32) / 255.0
    return (rgb - torch.tensor(IMAGE_MEAN)) / torch.tensor(IMAGE_STD)


def masks_to_labels(part_masks: Tensor) -> Tensor:
    """(B, G, H, W) {0,1} masks -> (B, H, W) int64 labels: 1 + the last group set at a pixel, 0 where none is."""
    index = torch.arange(1, part_masks.shape[1] + 1, device=part_masks.device).view(1, -1, 1, 1)
    return ((part_masks > 0.5) * index).amax(dim=1)


def adapt_patch_embedding(conv: nn.Conv2d, palette: Tensor) -> nn.Conv2d:
    """A G-channel copy of an RGB patch-embedding conv that maps one-hot masks as the RGB conv maps their palette
    rendering (see the module docstring); palette is the normalised (G+1, 3) one."""
    if conv.in_channels != 3:
        raise ValueError(f"expected a 3-channel (RGB) patch embedding, got {conv.in_channels} input channels")
    groups = palette.shape[0] - 1
    new = nn.Conv2d(groups, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    bias=True, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        weight = conv.weight  # (O, 3, k, k)
        delta = (palette[1:] - palette[0]).to(weight)  # (G, 3): each group's colour relative to the background
        new.weight.copy_(torch.einsum("ockl,gc->ogkl", weight, delta))
        bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, dtype=weight.dtype)
        new.bias.copy_(bias + torch.einsum("ockl,c->o", weight, palette[0].to(weight)))
    return new


class PartMaskEncoder(nn.Module):
    """SegFormer over (B, G, H, W) part masks -> (B, proj_dim); see the module docstring."""

    def __init__(self, cfg: MaskEncoderConfig, num_groups: int, load_weights: bool):
        super().__init__()
        self.cfg = cfg
        self.num_groups = num_groups
        self.backbone: SegformerModel = build_from_ref(SegformerModel, cfg, load_weights)
        self.register_buffer("palette", normalized_palette(num_groups), persistent=False)
        if cfg.input == "channels":
            embedding = self.backbone.stages[0].patch_embeddings
            embedding.proj = adapt_patch_embedding(embedding.proj, self.palette)
            self.backbone.config.num_channels = num_groups  # a saved backbone then describes itself correctly
        self.proj = nn.Linear(self.backbone.config.hidden_sizes[-1], cfg.proj_dim)
        if cfg.frozen:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> PartMaskEncoder:
        super().train(mode)
        if self.cfg.frozen:
            self.backbone.eval()  # a frozen backbone's dropout / drop-path stay off whatever the parent does
        return self

    def backbone_input(self, part_masks: Tensor) -> Tensor:
        """What the SegFormer backbone receives: the masks themselves, or their normalised palette image."""
        if self.cfg.input == "channels":
            return part_masks
        image = self.palette[masks_to_labels(part_masks)]  # (B, H, W, 3)
        return image.permute(0, 3, 1, 2).contiguous()

    def forward(self, part_masks: Tensor) -> Tensor:
        if part_masks.ndim != 4 or part_masks.shape[1] != self.num_groups:
            raise ValueError(f"part_masks must be (B, {self.num_groups}, H, W), got {tuple(part_masks.shape)}")
        x = self.backbone_input(part_masks.to(self.proj.weight.dtype))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.frozen):
            hidden = self.backbone(pixel_values=x).last_hidden_state
        # (B, C, h, w) normally; (B, h*w, C) for configs with reshape_last_stage=False
        pooled = hidden.mean(dim=(2, 3)) if hidden.ndim == 4 else hidden.mean(dim=1)
        return self.proj(pooled)
