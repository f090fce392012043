"""The latent conditional UNet and its condition encoder (attributes, optionally part masks).

    context, embedding = ConditionEncoder(model_cfg, num_groups, load_weights)(attributes, part_masks, keep_a, keep_m)
    eps = unet(z_t, t, encoder_hidden_states=context).sample

Attributes (B, 40) go through an MLP to `tokens` tokens of width `dim` (the InfoNCE loss reads this embedding).
With a mask encoder, the pooled SegFormer features of the grouped part masks (B, proj_dim) are concatenated to
every attribute token and a Linear always projects the result to the UNet's cross-attention width (the paper's
"concatenated and projected", even where dim + proj_dim already equals it: LC_UNet_3's 128 + 128 -> its 256-d
context); without one, the attribute tokens are the context (a Linear only when `dim` differs from the
cross-attention width).

Classifier-free guidance needs a "no condition": each branch has a learned null embedding that replaces a
sample's attribute tokens (or mask features) where `keep_*` is False. `torch.where` gives the unselected branch a
zero gradient rather than none, so optimizers and ZeRO see every parameter in every step.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from facediff.config.schema import AttributeEmbedderConfig, LatentConditionalModelConfig
from facediff.data.celebamask import NUM_ATTRIBUTES

UNET_FIELDS = (
    "sample_size", "in_channels", "out_channels", "layers_per_block", "block_out_channels", "down_block_types",
    "up_block_types", "mid_block_type", "attention_head_dim", "cross_attention_dim", "use_linear_projection",
    "norm_num_groups",
)


def build_conditional_unet(cfg: LatentConditionalModelConfig) -> UNet2DConditionModel:
    """A randomly initialised UNet2DConditionModel from the config's UNet fields."""
    return UNet2DConditionModel(**cfg.model_dump(include=set(UNET_FIELDS)))


class AttributeEmbedder(nn.Module):
    """MLP: multi-hot attributes (B, 40) -> (B, tokens, dim); hidden layers Linear-LayerNorm-GELU-Dropout."""

    def __init__(self, cfg: AttributeEmbedderConfig, num_attributes: int = NUM_ATTRIBUTES):
        super().__init__()
        layers, width = [], num_attributes
        for hidden in cfg.hidden:
            layers += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(cfg.dropout)]
            width = hidden
        layers.append(nn.Linear(width, cfg.tokens * cfg.dim))
        self.mlp = nn.Sequential(*layers)
        self.tokens, self.dim = cfg.tokens, cfg.dim

    def forward(self, attributes: torch.Tensor) -> torch.Tensor:
        return self.mlp(attributes.to(self.mlp[0].weight.dtype)).view(-1, self.tokens, self.dim)


def _where(keep: torch.Tensor | None, value: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """`value` for kept samples, the null embedding for the others (keep: (B,) bool; None keeps all)."""
    if keep is None:
        return value
    keep = keep.to(value.device).view(-1, *([1] * (value.ndim - 1)))
    return torch.where(keep, value, null.to(value.dtype).expand_as(value))


class ConditionEncoder(nn.Module):
    def __init__(self, cfg: LatentConditionalModelConfig, num_groups: int, load_weights: bool):
        super().__init__()
        a = cfg.attribute_embedder
        self.attributes = AttributeEmbedder(a)
        self.null_attributes = nn.Parameter(torch.zeros(a.tokens, a.dim))
        self.masks = None
        width = a.dim
        if cfg.mask_encoder is not None:
            # lazily: transformers only with a mask encoder
            from facediff.models.segformer import PartMaskEncoder

            if num_groups < 1:
                raise ValueError("a mask encoder needs part groups (data.part_groups)")
            self.masks = PartMaskEncoder(cfg.mask_encoder, num_groups, load_weights)
            self.null_masks = nn.Parameter(torch.zeros(cfg.mask_encoder.proj_dim))
            width += cfg.mask_encoder.proj_dim
        project = self.masks is not None or width != cfg.cross_attention_dim
        self.fuse = nn.Linear(width, cfg.cross_attention_dim) if project else nn.Identity()

    def forward(
        self,
        attributes: torch.Tensor,
        part_masks: torch.Tensor | None = None,
        keep_attributes: torch.Tensor | None = None,
        keep_masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, tokens, cross_attention_dim), attribute embedding (B, tokens, dim) before dropout).

        Without `part_masks` every sample gets the null mask features (sampling from attributes alone).
        """
        embedding = self.attributes(attributes)
        tokens = _where(keep_attributes, embedding, self.null_attributes)
        if self.masks is not None:
            if part_masks is None:
                features = self.null_masks.to(tokens.dtype).expand(len(tokens), -1)
            else:
                features = _where(keep_masks, self.masks(part_masks.to(tokens.dtype)), self.null_masks)
            tokens = torch.cat([tokens, features[:, None].expand(-1, tokens.shape[1], -1)], dim=-1)
        return self.fuse(tokens), embedding
