"""Seeded randomness: network builds that leave every other random stream alone; one generator per sampled batch.

`torch.manual_seed` also seeds every CUDA device, and `torch.random.fork_rng(devices=[])` restores only the CPU
state, so a seeded build inside a worker used to overwrite the per-rank CUDA seed (`distributed.seed_worker_rng`)
with one shared by all ranks: every GPU then drew the same dropout masks. Builds run on the CPU, so seeding the
CPU generator alone is enough to make them identical in every process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def seeded_build(seed: int) -> Iterator[None]:
    """Inside: torch's global CPU generator starts from `seed`. After: the caller's CPU stream goes on where it
    was; CUDA generators are never touched (no `torch.cuda.manual_seed_all`, no CUDA initialisation)."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def batch_generator(seed: int, *indices: int) -> torch.Generator:
    """A CPU generator for one batch, distinct for every (seed, indices...) combination."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, *indices]).generate_state(1)[0]))
