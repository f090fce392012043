"""The memory of a training step: measured on this device, and estimated per GPU for the configured workers.

`train --dry-run` (`dry_run.py`) measures the peak of its timed step on this device with one worker (CUDA:
`max_memory_allocated`; CPU: the process's peak RSS, VmHWM, reset before the step). Its evaluation copy is built
after the step (a CPU machine holds the ControlNet's engine and copy with little to spare), so that peak leaves
the copy out; a training worker builds it before its first step, and the estimate below counts it. Per GPU with N = `trainer.num_workers` workers at
ZeRO stage z (`per_gpu_estimate`), bytes:

    weights      W_t + W_f_engine (both / N if z = 3) + W_f_held     as built: trainable in the training precision
    fp32 masters 4 P_t (bf16/fp16 only; / N if z >= 1)               DeepSpeed keeps fp32 masters under bf16
    Adam moments 8 P_t (/ N if z >= 1)
    gradients    w P_t (/ N if z >= 2)                               w: 2 for bf16/fp16, 4 for fp32
    eval copy    the evaluation task's weights (fp32)                 when eval.every_kimg is set (`Evaluator`)
    activations  measured: the step's peak minus what stays allocated after it (trainer.gradient_checkpointing
                 as configured: a dry run with and without it shows what checkpointing saves)

P_t: trainable parameters; W_t, W_f_engine, W_f_held: the bytes of the trainable, frozen-in-the-engine and
held-frozen (outside the engine, `DiffusionTask.hold_frozen`) parameters as built.
"""

from __future__ import annotations

from pathlib import Path

import torch

from facediff.config.schema import ExperimentConfig

GIB = 1024**3


class MemoryProbe:
    """Memory now and the peak since `reset_peak`: CUDA's allocator statistics, or the process's RSS and its
    high-water mark (VmHWM, which Linux resets through /proc/self/clear_refs)."""

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"

    def _status(self, key: str) -> int:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key))
        return int(line.split()[1]) * 1024

    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else self._status("VmRSS:")

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return self._status("VmHWM:")


def parameter_bytes(task: torch.nn.Module) -> dict[str, int]:
    """Parameter counts and bytes as built: trainable, frozen inside the module, held frozen outside it."""
    out = dict.fromkeys(("trainable", "frozen", "trainable_bytes", "frozen_bytes", "held_bytes"), 0)
    for p in task.parameters():
        kind, numel = "trainable" if p.requires_grad else "frozen", getattr(p, "ds_numel", p.numel())  # ZeRO-3
        out[kind] += numel
        out[f"{kind}_bytes"] += numel * p.element_size()
    held = getattr(task, "frozen_networks", dict)()
    for net in held.values():
        for p in net.parameters():
            out["frozen"] += p.numel()
            out["held_bytes"] += p.numel() * p.element_size()
    return out


def per_gpu_estimate(cfg: ExperimentConfig, sizes: dict[str, int], eval_copy_bytes: int,
                     activation_bytes: int) -> int:
    """Bytes one GPU needs with `trainer.num_workers` workers at `trainer.zero_stage` (the module docstring's
    formula)."""
    t = cfg.trainer
    n, z = t.num_workers, t.zero_stage
    width = 4 if t.precision == "fp32" else 2
    trainable = sizes["trainable"]
    weights = (sizes["trainable_bytes"] + sizes["frozen_bytes"]) / (n if z >= 3 else 1) + sizes["held_bytes"]
    optimizer = (trainable * (4 if width == 2 else 0) + 8 * trainable) / (n if z >= 1 else 1)
    gradients = width * trainable / (n if z >= 2 else 1)
    return int(weights + optimizer + gradients + eval_copy_bytes + activation_bytes)
