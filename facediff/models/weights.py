"""A network's weights read whole, whether or not DeepSpeed's ZeRO-3 partitions them across ranks.

Below training so that evaluation can copy trained weights into a plain network without importing the trainer.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def is_zero3_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")  # ZeRO-3 tags the parameters it partitions


def gathered(params: list[nn.Parameter]):
    """Context that materialises full ZeRO-3 parameters on every rank (a no-op for ZeRO 0-2)."""
    if params and is_zero3_partitioned(params[0]):
        import deepspeed  # only under ZeRO-3, which only a DeepSpeed engine makes

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


@torch.no_grad()
def copy_weights(source: nn.Module, target: nn.Module) -> None:
    """Copy `source`'s trainable weights (full, gathered under ZeRO-3) into a plain copy of the network."""
    names = [name for name, p in source.named_parameters() if p.requires_grad]
    src, dst = dict(source.named_parameters()), dict(target.named_parameters())
    params = [src[name] for name in names]
    with gathered(params):
        for name, p in zip(names, params):
            dst[name].copy_(p.detach().to(dtype=dst[name].dtype, device=dst[name].device))
