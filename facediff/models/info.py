"""Parameter counts of the networks a config builds, without paying for their weights.

`describe` builds the task under `torch.device("meta")`, pretrained networks from their shipped architecture
(no weights read): parameters get shapes but no storage and no random init, so even the 289M-parameter UNet
costs milliseconds and no memory, and counts are exact (they depend only on shapes). A build that needs real tensors while constructing is retried on CPU.
"""

from __future__ import annotations

import torch

from facediff.config.schema import ExperimentConfig
from facediff.tasks import build_task


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts; shared parameters are counted once."""
    trainable = frozen = 0
    for p in module.parameters():
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return trainable, frozen


def _build_shapes_only(cfg: ExperimentConfig):
    try:
        with torch.device("meta"):
            return build_task(cfg, load_pretrained=False)
    except (NotImplementedError, RuntimeError):
        return build_task(cfg, load_pretrained=False)


def describe(cfg: ExperimentConfig) -> list[dict]:
    """One row per network the config builds ({"name", "class", "trainable", "frozen"}), and a "total" row over
    the whole task when it has several (it includes small parameters no single network owns)."""
    task = _build_shapes_only(cfg)
    rows = []
    for name, net in task.networks().items():
        trainable, frozen = count_parameters(net)
        frozen += sum(sum(count_parameters(held)) for held in task.frozen_networks_within(net))
        rows.append({"name": name, "class": type(net).__name__, "trainable": trainable, "frozen": frozen})
    if len(rows) > 1:
        trainable, frozen = count_parameters(task)
        # networks held frozen outside the module (`DiffusionTask.hold_frozen`) are not among its parameters
        frozen += sum(sum(count_parameters(net)) for net in task.frozen_networks().values())
        rows.append({"name": "total", "class": type(task).__name__, "trainable": trainable, "frozen": frozen})
    return rows
