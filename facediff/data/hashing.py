"""A fast, well-mixed integer hash for decisions that must depend on ids alone (never on order or batching)."""

from __future__ import annotations

import numpy as np
import torch


def splitmix64(x: np.ndarray | int) -> np.ndarray:
    """SplitMix64's output function of uint64 values, vectorised (wrapping arithmetic): a bijection whose
    output bits look independent even for regular inputs (consecutive ids, all-even ids)."""
    x = np.asarray(x).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def owned_by(ids: torch.Tensor | np.ndarray, rank: int, world: int) -> torch.Tensor:
    """Which records of a batch belong to `rank`: a fixed function of each record's id, never of its position.

    Every rank iterates the whole evaluation split, but Ray Data does not keep row order, so ranks disagree on
    positions; dealing by id gives every record to exactly one rank. ids are mixed (splitmix64) first so that
    regular id patterns (all even, say) still spread evenly."""
    x = splitmix64(np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids))
    return torch.from_numpy((x % np.uint64(world)).astype(np.int64) == rank)
