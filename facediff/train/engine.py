"""A DeepSpeed engine from config: ZeRO stage, precision, accumulation, clipping, AdamW, warm-up + cosine, and
the GPU step's speed options (`trainer.gpu`: TF32, fused AdamW, channels_last, torch.compile, bf16 autocast)."""

from __future__ import annotations

import contextlib
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


def build_optimizer(module: nn.Module, cfg: ExperimentConfig, world_size: int, fused: bool = False):
    o = cfg.optimizer
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                  fused=fused or None)
    total = total_steps(cfg, world_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, o.warmup_steps, total, o.schedule, o.min_lr_ratio)
    )
    return optimizer, schedule


def apply_optimizer_settings(schedule, cfg: ExperimentConfig) -> None:
    """After a resume, the config's optimizer settings, not the checkpoint's. Loading an optimizer and a schedule
    restores the hyperparameters they were saved with (each param group's lr, betas, eps and weight decay; the
    schedule's base rate), so a run resumed with another `optimizer.lr` trained on at the old one while its config
    said the new one. A no-op when nothing changed. `schedule`: the run's LambdaLR (its optimizer is the torch AdamW
    DeepSpeed wraps)."""
    o = cfg.optimizer
    schedule.base_lrs = [o.lr] * len(schedule.base_lrs)
    for group, factor in zip(schedule.optimizer.param_groups, schedule.lr_lambdas):
        group.update(lr=o.lr * factor(schedule.last_epoch), initial_lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                     weight_decay=o.weight_decay)
    schedule._last_lr = [group["lr"] for group in schedule.optimizer.param_groups]  # what get_last_lr() reports


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


class GpuStep:
    """What `trainer.gpu` changes in the step, resolved for this worker's device (nothing on a CPU)."""

    def __init__(self, cfg: ExperimentConfig, device: torch.device | str):
        g, on_gpu = cfg.trainer.gpu, torch.device(device).type == "cuda"
        self.on_gpu = on_gpu
        self.fused_adamw = on_gpu and g.fused_adamw
        self.channels_last = on_gpu and g.channels_last
        self.compile = on_gpu and g.compile
        self.autocast = on_gpu and g.autocast == "bf16"
        if on_gpu:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = g.tf32

    def batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Image-shaped float tensors in NHWC (noising is elementwise, so the network's input inherits it)."""
        if not self.channels_last:
            return batch
        return {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 and v.is_floating_point() else v
                for k, v in batch.items()}

    def forward(self):
        """The context the forward runs in: bf16 autocast, or nothing."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()


def build_engine(module: nn.Module, cfg: ExperimentConfig, world_size: int, step: GpuStep | None = None):
    import deepspeed

    step = step or GpuStep(cfg, "cpu")
    optimizer, schedule = build_optimizer(module, cfg, world_size, fused=step.fused_adamw)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=schedule, config=deepspeed_config(cfg)
    )
    if step.channels_last:
        # after initialize: its broadcast of the weights views each as bytes, which an NHWC weight refuses. At
        # ZeRO-0 fp32 (the config allows nothing else) the optimizer holds these very Parameters, whose data this
        # re-lays in place.
        engine.module.to(memory_format=torch.channels_last)
    engine.checkpoint_engine = safe_checkpoint_engine(engine._config)
    if step.compile:
        engine.compile()  # compiles the wrapped module's forward; the first steps pay for it
    return engine
