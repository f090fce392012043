"""Pixel-space DiT: `diffusers.DiTTransformer2DModel` made unconditional through one constant class label.

DiTTransformer2DModel only supports `norm_type="ada_norm_zero"`, whose adaptive norm in every block embeds
`timestep + class_labels`, so it needs `num_embeds_ada_norm` (the number of classes) and a `class_labels` tensor
in every forward. An unconditional model therefore gets exactly one class, and callers always pass
`class_labels = zeros(batch, dtype=long)`; `facediff.models.model_output` does that for you.

diffusers builds each label table with a classifier-free-guidance "null" row (index `num_classes`) and, in train
mode, replaces each label by it with probability 0.1, drawn from the global torch RNG, independently in every block
and in the output layer. With a single class that is only noise, so `build_dit` switches the replacement off; the
unused null row stays in the table (and in the parameter count) so exported weights load in stock diffusers.
"""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding

from facediff.config.schema import DiTModelConfig

NUM_CLASSES = 1  # the one constant label of an unconditional DiT


def build_dit(cfg: DiTModelConfig) -> DiTTransformer2DModel:
    """A randomly initialised pixel-space DiT (e.g. 3 channels, patch 4 at 128 px -> 32x32 = 1024 tokens)."""
    model = DiTTransformer2DModel(**cfg.model_dump(exclude={"family"}), num_embeds_ada_norm=NUM_CLASSES)
    disable_label_dropout(model)
    return model


def disable_label_dropout(model: torch.nn.Module) -> None:
    """Keep the class label constant in train mode too (see the module docstring)."""
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0


def class_labels(batch_size: int, device: torch.device | str) -> torch.Tensor:
    """The constant labels every forward of an unconditional DiT needs: zeros of shape (batch,), int64."""
    return torch.zeros(batch_size, dtype=torch.long, device=device)
