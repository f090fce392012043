"""A DeepSpeed engine from config: ZeRO stage, precision, accumulation, clipping, AdamW, warm-up + cosine."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from facediff.config.schema import ExperimentConfig


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: ExperimentConfig) -> dict[str, Any]:
    t = cfg.trainer
    config = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": cfg.optimizer.grad_clip or 0.0,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16},
        # our AdamW is torch's own; DeepSpeed runs it under ZeRO but calls it "untested"
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # facediff prints its own progress
    }
    return deep_merge(config, t.deepspeed)


def images_per_step(cfg: ExperimentConfig, world_size: int) -> int:
    return cfg.trainer.batch_size * cfg.trainer.grad_accum * world_size


def total_steps(cfg: ExperimentConfig, world_size: int) -> int:
    return math.ceil(cfg.trainer.total_kimg * 1000 / images_per_step(cfg, world_size))


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Linear warm-up from 0, then constant or cosine decay to `min_ratio` of the peak at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(module: nn.Module, cfg: ExperimentConfig, world_size: int):
    o = cfg.optimizer
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    total = total_steps(cfg, world_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, o.warmup_steps, total, o.schedule, o.min_lr_ratio)
    )
    return optimizer, schedule


def safe_checkpoint_engine(ds_config):
    """DeepSpeed's torch checkpoint engine, but loading with `weights_only=True`.

    DeepSpeed's own engine unpickles arbitrary objects; ours allows tensors, containers and the few plain
    DeepSpeed/torch types its files hold, so a tampered checkpoint cannot run code.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        # found by loading real ZeRO-2/3 checkpoints: plain state holders, no code runs on load
        allowed = [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler, set]

        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(self.allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeTorchCheckpointEngine(ds_config)


def build_engine(module: nn.Module, cfg: ExperimentConfig, world_size: int):
    import deepspeed

    optimizer, schedule = build_optimizer(module, cfg, world_size)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=schedule, config=deepspeed_config(cfg)
    )
    engine.checkpoint_engine = safe_checkpoint_engine(engine._config)
    return engine
