"""Exponential moving average of the trained weights, from DeepSpeed's fp32 master weights, correct under ZeRO.

Every rank keeps a full fp32 copy of the averaged weights, so any rank can sample with them. Under bf16/fp16 the
module's parameters are low-precision copies: averaging those would quantise the average to bf16 at every
update (a decay of 0.9999 moves it by 1e-4 of a difference bf16 cannot hold). So each update reads the
optimizer's fp32 *master* weights instead, and only the part of them this rank holds (its ZeRO partition, with
no communication and no gather of ZeRO-3 parameters per step); each rank updates that part of its copy.
`gather()` (a collective, run by every rank before the average is read: evaluation, checkpoints) then
assembles the full average on every rank with one all-reduce. Without separate masters (fp32 without ZeRO) the
parameters are the masters and every rank averages all of them alike. The decay warms up as
1 - (1 + step / inv_gamma) ** -power, capped at `decay`, and updates start after `start_step` (before that the
average tracks the weights exactly).
"""

from __future__ import annotations

import torch
from torch import nn

from facediff.config.schema import EMAConfig
from facediff.models.weights import gathered, is_zero3_partitioned


def replicated_masters(optimizer) -> dict[int, torch.Tensor]:
    """id(param) -> its fp32 master for DeepSpeed's FP16 optimizers, which bf16/fp16 without ZeRO use: whole on
    every rank, one flat fp32 copy per parameter group in the group's parameter order (FP16_Optimizer, with a
    fused Adam) or one fp32 tensor per parameter (FP16_UnfusedOptimizer, with torch's AdamW)."""
    views: dict[int, torch.Tensor] = {}
    groups = getattr(optimizer, "fp16_groups", ())
    for params, flat in zip(groups, getattr(optimizer, "fp32_groups_flat", ())):
        offset = 0
        for p in params:
            views[id(p)] = flat.narrow(0, offset, p.numel())
            offset += p.numel()
    for params, masters in zip(groups, getattr(optimizer, "fp32_groups", ())):
        views.update((id(p), m.view(-1)) for p, m in zip(params, masters))
    return views


def master_fragment(param: nn.Parameter, replicated: dict[int, torch.Tensor]) -> tuple[torch.Tensor, int, bool] | None:
    """The fp32 master weights this rank holds of `param` (a view into the optimizer's flat fp32 copy, updated
    in place by every step), the offset of their first element in the flattened parameter, and whether the
    masters are split across ranks (ZeRO) rather than whole on each; None when the parameter is its own master
    (fp32 without ZeRO)."""
    if id(param) in replicated:
        return replicated[id(param)], 0, False
    if is_zero3_partitioned(param):
        import torch.distributed as dist

        optimizer = param._z3_optimizer
        local = optimizer.get_local_fp32_param(param)  # this rank's padded partition of the flat parameter
        group = optimizer._get_param_partition_group(param)
        flat, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False)
        if local.data_ptr() != flat.data_ptr():  # a copy (optimizer offload): it would not follow the steps
            raise ValueError("the EMA reads ZeRO-3's fp32 master weights on the device; optimizer offload keeps "
                             "them elsewhere: remove trainer.deepspeed's offload_optimizer")
        start = dist.get_rank(group=group) * local.numel()
        count = max(0, min(local.numel(), param.ds_numel - start))
        return local.view(-1)[:count], start, True
    if hasattr(param, "_hp_mapping"):  # ZeRO 1-2 and DeepSpeed's bf16 optimizer
        mapping = param._hp_mapping
        if mapping is None:  # no element of this parameter is in this rank's partition
            return param.new_zeros(0, dtype=torch.float32), 0, True
        return mapping.get_hp_fragment().view(-1), mapping.lp_fragment_address.start, True
    return None


class EMA:
    def __init__(self, module: nn.Module, cfg: EMAConfig, optimizer=None):
        """`optimizer`: the engine's (`engine.optimizer`), where the fp32 masters of a bf16/fp16 run live
        without ZeRO; ZeRO's are found from the parameters themselves."""
        self.cfg = cfg
        self.names = [name for name, p in module.named_parameters() if p.requires_grad]
        params = self._params(module)
        with gathered(params):
            self.shadow = [p.detach().float().clone() for p in params]
        self.step = 0
        # where this rank reads each parameter's master weights (None: the parameter itself, whole)
        replicated = replicated_masters(optimizer)
        self.fragments = [master_fragment(p, replicated) for p in params]
        self.from_masters = all(f is not None for f in self.fragments)
        if not self.from_masters and any(f is not None for f in self.fragments):
            raise ValueError("some trained parameters have fp32 masters and some do not: an optimizer layout "
                             "facediff's EMA does not know")
        self.partial = self.from_masters and any(split for _, _, split in self.fragments)  # gather() to read
        self.stale = False
        if self.from_masters:  # start from the fp32 masters, not from their bf16 copies
            self._read_masters(weight=1.0)
            self.gather()

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

    def _read_masters(self, weight: float) -> None:
        """Move this rank's part of the average towards its master weights (`lerp` by `weight`; 1: a copy)."""
        for shadow, (fragment, start, _) in zip(self.shadow, self.fragments):
            part = shadow.view(-1).narrow(0, start, fragment.numel())
            part.lerp_(fragment.to(part.device), weight)
        self.stale = self.partial

    @torch.no_grad()
    def update(self, module: nn.Module) -> float:
        self.step += 1
        decay = self.decay(self.step)
        if self.from_masters:
            self._read_masters(1 - decay)
            return decay
        params = self._params(module)
        with gathered(params):
            for shadow, p in zip(self.shadow, params):
                shadow.lerp_(p.detach().float(), 1 - decay)
        return decay

    @torch.no_grad()
    def gather(self) -> None:
        """Assemble the full average on every rank from each rank's part (a collective: every rank calls it;
        a no-op when nothing changed since the last gather or nothing is split)."""
        if not self.stale:
            return
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.zeros(sum(s.numel() for s in self.shadow), device=self.shadow[0].device)
            offset = 0
            for shadow, (fragment, start, _) in zip(self.shadow, self.fragments):
                flat.narrow(0, offset + start, fragment.numel()).copy_(shadow.view(-1).narrow(0, start, fragment.numel()))
                offset += shadow.numel()
            dist.all_reduce(flat)  # every element is held by exactly one rank: the sum is that rank's value
            offset = 0
            for shadow in self.shadow:
                shadow.view(-1).copy_(flat.narrow(0, offset, shadow.numel()))
                offset += shadow.numel()
        self.stale = False

    def _check_gathered(self) -> None:
        if self.stale:
            raise RuntimeError("the EMA was updated on this rank's part only: call gather() on every rank first")

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged weights into `module` (a plain, unpartitioned copy of the network)."""
        self._check_gathered()
        for shadow, p in zip(self.shadow, self._params(module)):
            p.copy_(shadow.to(dtype=p.dtype, device=p.device))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors keyed by parameter name (safetensors-ready) plus the update count."""
        self._check_gathered()
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
        self.stale = False  # the file holds the whole average
