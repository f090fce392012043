"""`facediff sample`: draw a PNG grid from a model (loaded by `runs.load`: a run's latest checkpoint's EMA weights,
or an export).

Each batch of samples gets its own seed derived from (seed, batch index), so batches differ and any batch
can be redrawn alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from facediff.config.schema import ExperimentConfig
from facediff.data.celebamask import ATTRIBUTE_NAMES
from facediff.data.stream.local_batches import local_test_batches
from facediff.rng import batch_generator
from facediff.tasks import DiffusionTask
from facediff.viz import image_grid


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def generate(task: DiffusionTask, n: int, sampler: str, steps: int, seed: int, batch_size: int = 32,
             conditions: dict[str, torch.Tensor] | None = None) -> np.ndarray:
    """`n` samples as uint8 (N, H, W, 3); `conditions` holds one row per sample for conditional families."""
    out = []
    for b, start in enumerate(range(0, n, batch_size)):
        stop = min(n, start + batch_size)
        batch = None if conditions is None else {k: v[start:stop] for k, v in conditions.items()}
        out.append(to_uint8(task.sample(stop - start, batch_generator(seed, b), sampler, steps, batch)))
    return np.concatenate(out)


def attribute_vector(names: str) -> torch.Tensor:
    """"Smiling,Eyeglasses" -> a (40,) multi-hot vector with exactly the named attributes set."""
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    if not wanted:  # an empty list would silently condition every sample on "no attribute at all"
        raise ValueError(f"--attributes {names!r}: names no attribute; give comma-separated names, e.g. "
                         "Smiling,Male")
    unknown = [name for name in wanted if name not in ATTRIBUTE_NAMES]
    if unknown:
        raise ValueError(f"unknown attributes {unknown}; the 40 CelebA attributes are: {', '.join(ATTRIBUTE_NAMES)}")
    return torch.tensor([float(name in wanted) for name in ATTRIBUTE_NAMES])


def record_conditions(cfg: ExperimentConfig, n: int, split: str | None = None) -> dict[str, torch.Tensor]:
    """Attributes (and part masks) of the first `n` records of the evaluation split, cycled if it is smaller."""
    rows: dict[str, list[torch.Tensor]] = {}
    for batch in local_test_batches(cfg, split)():
        for key in ("id", "attributes", "part_masks"):
            if key in batch:
                rows.setdefault(key, []).append(batch[key])
        if sum(len(t) for t in rows["id"]) >= n:
            break
    if not rows:
        raise ValueError(f"{cfg.data.path}: split {split or cfg.data.eval_split!r} has no records")
    columns = {k: torch.cat(v) for k, v in rows.items()}
    index = torch.arange(n) % len(columns["id"])
    return {k: v[index] for k, v in columns.items()}


def check_outputs(grid: Path, individual_dir: Path | None = None) -> None:
    """Refuse output paths `save_samples` cannot write, before any sampling (which may take hours) starts."""
    Image.init()
    if Path(grid).suffix.lower() not in Image.registered_extensions() or Path(grid).is_dir():
        raise ValueError(f"--out {grid}: not an image file name; end it in .png (or .jpg)")
    for option, target in (("--out", Path(grid).parent), ("--individual", individual_dir)):
        if target is None:
            continue
        existing = next(p for p in (Path(target).absolute(), *Path(target).absolute().parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise ValueError(f"{option} {target}: {existing} is not a writable folder")


def save_samples(images: np.ndarray, grid: Path, individual_dir: Path | None = None) -> Path:
    grid = Path(grid)
    grid.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(grid)
    if individual_dir is not None:
        individual_dir.mkdir(parents=True, exist_ok=True)
        for k, image in enumerate(images):
            Image.fromarray(image).save(individual_dir / f"{k:05d}.png")
    return grid


def attribute_sweep(task: DiffusionTask, conditions: dict[str, torch.Tensor], columns: list[dict[str, float]],
                    sampler: str, steps: int, seed: int) -> np.ndarray:
    """One row per conditioning record, one column per attribute edit ({} = the record as it is).

    Every image of a row starts from the same noise (seed, row), so a row shows what the edited attributes change,
    not a different draw. Returns (rows * len(columns), H, W, 3) uint8, row-major.
    """
    images = []
    for row in range(len(conditions["attributes"])):
        record = {k: v[row : row + 1] for k, v in conditions.items()}
        for edits in columns:
            batch = {**record, "attributes": with_edits(record["attributes"], edits)}
            images.append(to_uint8(task.sample(1, batch_generator(seed, row), sampler, steps, batch)))
    return np.concatenate(images)


def with_edits(attributes: torch.Tensor, edits: dict[str, float]) -> torch.Tensor:
    """A copy of (n, 40) attributes with the named ones set to the given values."""
    edited = attributes.clone()
    for name, value in edits.items():
        edited[:, ATTRIBUTE_NAMES.index(name)] = value
    return edited
