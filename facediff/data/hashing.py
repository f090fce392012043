"""A fast, well-mixed integer hash for decisions that must depend on ids alone (never on order or batching)."""

from __future__ import annotations

import numpy as np


def splitmix64(x: np.ndarray | int) -> np.ndarray:
    """SplitMix64's output function of uint64 values, vectorised (wrapping arithmetic): a bijection whose
    output bits look independent even for regular inputs (consecutive ids, all-even ids)."""
    x = np.asarray(x).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))
