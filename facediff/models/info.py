"""Parameter counts of the networks a config builds, without paying for their weights.

`describe` builds each network under `torch.device("meta")`: parameters get shapes but no storage and no random
init, so even the 289M-parameter UNet costs milliseconds and no memory, and counts are exact (they depend only on
shapes). A builder that needs real tensors while constructing (e.g. one that loads weights) is retried on CPU.
"""

from __future__ import annotations

import torch

from facediff.config.schema import ExperimentConfig
from facediff.models import build_network


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts; shared parameters are counted once."""
    trainable = frozen = 0
    for p in module.parameters():
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return trainable, frozen


def _build_shapes_only(model_cfg) -> torch.nn.Module:
    try:
        with torch.device("meta"):
            return build_network(model_cfg)
    except (NotImplementedError, RuntimeError):
        return build_network(model_cfg)


def describe(cfg: ExperimentConfig) -> list[dict]:
    """One row per network the config builds: {"name", "class", "trainable", "frozen"}."""
    net = _build_shapes_only(cfg.model)
    trainable, frozen = count_parameters(net)
    return [{"name": cfg.model.family, "class": type(net).__name__, "trainable": trainable, "frozen": frozen}]
