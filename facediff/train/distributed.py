"""Collectives and per-rank randomness for the training workers.

Collectives take the worker's device explicitly: under `use_gpu` Ray Train creates an NCCL-only process group,
which cannot reduce CPU tensors, so every value is moved to the device the group serves (the worker's GPU, or
the CPU under gloo) before it is reduced, and back afterwards.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def sum_across_ranks(tensors: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Element-wise sums over ranks of equally shaped lists of tensors, in one all-reduce on `device`.

    Returned on the tensors' original devices, in float64 (counts of pixels and sums of losses stay exact)."""
    if not is_distributed() or not tensors:
        return [t.double() for t in tensors]
    flat = torch.cat([t.reshape(-1).to(device=device, dtype=torch.float64) for t in tensors])
    dist.all_reduce(flat)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].reshape(t.shape).to(t.device))
        start += t.numel()
    return out


def nonfinite_anywhere(loss: torch.Tensor, device: torch.device | str) -> bool:
    """Whether the loss is NaN or infinite on any rank (one small all-reduce; every rank gets the same answer)."""
    bad = (~torch.isfinite(loss.detach())).any().reshape(1)
    (count,) = sum_across_ranks([bad], device)
    return bool(count.item() > 0)


class FirstNonFinite:
    """The first step whose loss was NaN or infinite on any rank, kept on the device: `note` costs no host sync
    (a `.item()` per step would stall a GPU's queue), `first` (one all-reduce and one sync) is asked only where
    the loop logs, evaluates or saves, so a run stops before anything after the bad step is written
    (trainer.on_nonfinite_loss=stop)."""

    def __init__(self, device: torch.device | str):
        self.step = torch.full((1,), float("inf"), dtype=torch.float64, device=device)

    def note(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        self.step = torch.where(bad, self.step.clamp(max=step), self.step)

    def first(self) -> int | None:
        step = self.step.clone()
        if is_distributed():
            dist.all_reduce(step, op=dist.ReduceOp.MIN)
        value = float(step.item())
        return None if value == float("inf") else int(value)


def mean_across_ranks(values: dict[str, float], device: torch.device | str) -> dict[str, float]:
    """The mean over ranks of each named scalar (one collective for all of them)."""
    if not is_distributed() or not values:
        return dict(values)
    names = list(values)
    (total,) = sum_across_ranks([torch.tensor([values[k] for k in names], dtype=torch.float64)], device)
    world = dist.get_world_size()
    return {name: float(v) / world for name, v in zip(names, total.tolist())}


def rank_seed(seed: int, rank: int) -> int:
    """The seed of one rank's global RNG (dropout, DeepSpeed internals): distinct per rank, fixed per (seed, rank)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def seed_worker_rng(seed: int, rank: int) -> None:
    """Seed this worker's global CPU and CUDA RNGs for its own dropout stream. Initial weights do not depend on
    it: `build_task` seeds its own build from `trainer.seed`, identically on every rank."""
    torch.manual_seed(rank_seed(seed, rank))  # seeds every CUDA device too
