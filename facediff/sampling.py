"""`facediff sample`: load a run (latest checkpoint's EMA weights) or an exported model, draw a PNG grid.

Each batch of samples gets its own seed derived from (seed, batch index), so batches differ and any batch
can be redrawn alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from facediff.config import load_config
from facediff.config.schema import ExperimentConfig
from facediff.tasks import DiffusionTask, build_task
from facediff.viz import image_grid

EXPORT_CONFIG = DiffusionTask.EXPORT_CONFIG


def batch_generator(seed: int, *indices: int) -> torch.Generator:
    """A CPU generator for one batch, distinct for every (seed, indices...) combination."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, *indices]).generate_state(1)[0]))


def latest_checkpoint(run: Path) -> Path | None:
    found = sorted(p for p in Path(run).glob("checkpoint_*") if p.is_dir())
    return found[-1] if found else None


def load_model(path: str | Path, overrides: list[str] = ()) -> tuple[ExperimentConfig, DiffusionTask]:
    """A run folder (uses its latest checkpoint) or an exported model folder (written by `export`).

    `overrides` change the stored config (e.g. `data.path=...` when the data moved, `eval.steps=...`)."""
    from facediff.train.run import load_task_with_ema

    path = Path(path)
    if (path / "config.yaml").is_file():
        cfg = load_config(path / "config.yaml", list(overrides))
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(f"{path}: run folder has no checkpoint_* folder yet")
        return cfg, load_task_with_ema(cfg, ckpt)
    if (path / EXPORT_CONFIG).is_file():
        cfg = load_config(path / EXPORT_CONFIG, list(overrides))
        task = build_task(cfg)
        task.load_exported(path)
        return cfg, task.eval()
    raise FileNotFoundError(f"{path}: neither a run folder (config.yaml) nor an exported model ({EXPORT_CONFIG})")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def generate(task: DiffusionTask, n: int, sampler: str, steps: int, seed: int, batch_size: int = 32) -> np.ndarray:
    out = []
    for b, start in enumerate(range(0, n, batch_size)):
        images = task.sample(min(batch_size, n - start), batch_generator(seed, b), sampler, steps)
        out.append(to_uint8(images))
    return np.concatenate(out)


def save_samples(images: np.ndarray, grid: Path, individual_dir: Path | None = None) -> Path:
    grid = Path(grid)
    grid.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(grid)
    if individual_dir is not None:
        individual_dir.mkdir(parents=True, exist_ok=True)
        for k, image in enumerate(images):
            Image.fromarray(image).save(individual_dir / f"{k:05d}.png")
    return grid
