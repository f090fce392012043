"""Exponential moving average of the trained weights, correct under DeepSpeed ZeRO-3.

Every rank keeps a full fp32 copy of the averaged weights, so any rank can sample with them. Under ZeRO-3 a
rank's parameters are shards; each update gathers the full parameters first (the average of the gathered
weights, never an average of shards). The decay warms up as 1 - (1 + step / inv_gamma) ** -power, capped at
`decay`, and updates start after `start_step` (before that the average tracks the weights exactly).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from facediff.config.schema import EMAConfig


def is_zero3_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")  # ZeRO-3 tags the parameters it partitions


def gathered(params: list[nn.Parameter]):
    """Context that materialises full ZeRO-3 parameters on every rank (a no-op for ZeRO 0-2)."""
    if params and is_zero3_partitioned(params[0]):
        import deepspeed

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


class EMA:
    def __init__(self, module: nn.Module, cfg: EMAConfig):
        self.cfg = cfg
        self.names = [name for name, p in module.named_parameters() if p.requires_grad]
        params = self._params(module)
        with gathered(params):
            self.shadow = [p.detach().float().clone() for p in params]
        self.step = 0

    def _params(self, module: nn.Module) -> list[nn.Parameter]:
        by_name = dict(module.named_parameters())
        return [by_name[name] for name in self.names]

    def decay(self, step: int) -> float:
        """Decay used for the update that makes `step` updates in total."""
        k = step - self.cfg.start_step
        if not self.cfg.enabled or k <= 0:
            return 0.0  # copy the weights
        if not self.cfg.warmup:
            return self.cfg.decay
        return min(self.cfg.decay, 1 - (1 + k / self.cfg.inv_gamma) ** -self.cfg.power)

    @torch.no_grad()
    def update(self, module: nn.Module) -> float:
        self.step += 1
        decay = self.decay(self.step)
        params = self._params(module)
        with gathered(params):
            for shadow, p in zip(self.shadow, params):
                shadow.lerp_(p.detach().float(), 1 - decay)
        return decay

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged weights into `module` (a plain, unpartitioned copy of the network)."""
        for shadow, p in zip(self.shadow, self._params(module)):
            p.copy_(shadow.to(dtype=p.dtype, device=p.device))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors keyed by parameter name (safetensors-ready) plus the update count."""
        state = {f"ema.{name}": t for name, t in zip(self.names, self.shadow)}
        state["ema_step"] = torch.tensor(self.step, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [name for name in self.names if f"ema.{name}" not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        wrong = [name for name, old in zip(self.names, self.shadow) if state[f"ema.{name}"].shape != old.shape]
        if wrong:
            raise ValueError(f"EMA state has other shapes for {len(wrong)} parameters, e.g. {wrong[:3]}")
        # onto the live averages' device (the worker's GPU), whatever device the file was read to
        self.shadow = [state[f"ema.{name}"].to(device=old.device, dtype=torch.float32).clone()
                       for name, old in zip(self.names, self.shadow)]
        self.step = int(state["ema_step"])
