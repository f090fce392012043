"""Samples while it trains: rank 0 draws the same small grid from the EMA weights every
`eval.log_images_every_kimg` (default `eval.every_kimg`) and at the end, so a user watches the same faces sharpen.

The same faces: the noise is a fixed bank (CPU generators seeded from `eval.seed` alone, never the step) and the
conditions are the evaluation split's first records in file order, read once (conditional families draw each
record's attributes, masks, caption or people map). The grid goes to `RUN/samples/kimg_<kimg>.png` (copied to
the run's storage at once) and to TensorBoard as the `samples` image at the step (copied with the next log row).

It leaves training alone: sampling runs inside `torch.random.fork_rng` (the global CPU and CUDA streams the
dropout reads are restored) and never touches the loss's generator, so the per-step losses are those of a run
without grids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from facediff.config.schema import ExperimentConfig
from facediff.data.stream.local_batches import local_test_batches
from facediff.eval.metrics import to_uint8
from facediff.rng import batch_generator
from facediff.tasks import DiffusionTask, build_task
from facediff.viz import image_grid

SAMPLES_DIR = "samples"
# The noise bank's index beside `eval.seed`: evaluation's generators are (seed, step, rank, batch), steps start at 1
NOISE_BANK = 0
SAMPLER = "ddim"  # deterministic given the noise: the grids differ only by the weights


def grid_name(kimg: float) -> str:
    """`kimg_00012.800.png`: tiny runs train fractions of a kimg, and the names sort by training time."""
    return f"kimg_{kimg:09.3f}.png"


def grid_conditions(cfg: ExperimentConfig, n: int) -> dict[str, torch.Tensor]:
    """Every column of the first `n` records of the evaluation split (file order, cycled if it is smaller)."""
    rows: dict[str, list[torch.Tensor]] = {}
    count = 0
    for batch in local_test_batches(cfg)():
        for key, value in batch.items():
            rows.setdefault(key, []).append(value)
        count += len(batch["id"])
        if count >= n:
            break
    if not count:
        raise ValueError(f"{cfg.data.path}: split {cfg.data.eval_split!r} has no records for eval.sample_grid; "
                         "set eval.sample_grid=0")
    index = torch.arange(n) % count
    return {key: torch.cat(parts)[index] for key, parts in rows.items()}


@torch.no_grad()
def draw_grid(task: DiffusionTask, cfg: ExperimentConfig, conditions: dict[str, torch.Tensor]) -> np.ndarray:
    """The grid's images (N, H, W, 3) uint8 from `task`'s weights: the same noise and conditions every call."""
    n, size, e = len(conditions["id"]), cfg.eval.batch_size, cfg.eval
    devices = [task.device] if task.device.type == "cuda" else []
    images = []
    with torch.random.fork_rng(devices=devices):  # whatever a sampler draws globally, training's streams go on
        for b, start in enumerate(range(0, n, size)):
            cut = {k: v[start : start + size] for k, v in conditions.items()}
            fake = task.sample(len(cut["id"]), batch_generator(e.seed, NOISE_BANK, b), SAMPLER, e.sample_grid_steps,
                               cut)
            images.append(to_uint8(fake).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(images)


class SampleGrid:
    """The grids of one training run. Every rank calls `due` and `write` alike (the EMA's gather is a collective);
    only rank 0 builds a task, reads the conditions and samples."""

    def __init__(self, cfg: ExperimentConfig, rank: int, device: torch.device, storage, images_per_step: int,
                 task: DiffusionTask | None = None):
        e = cfg.eval
        every_kimg = e.log_images_every_kimg or e.every_kimg
        self.cfg, self.rank, self.storage, self.ips = cfg, rank, storage, images_per_step
        self.every = None if every_kimg is None else max(1, round(every_kimg * 1000 / images_per_step))
        self.task = self.conditions = None
        if rank == 0:
            self.task = task if task is not None else build_task(cfg).eval().to(device)
            self.conditions = grid_conditions(cfg, e.sample_grid)

    @classmethod
    def for_run(cls, cfg: ExperimentConfig, rank: int, device: torch.device, storage, images_per_step: int,
                evaluator=None) -> SampleGrid | None:
        """None when `eval.sample_grid` is 0; shares the evaluator's plain task (one copy of the networks)."""
        if cfg.eval.sample_grid == 0:
            return None
        return cls(cfg, rank, device, storage, images_per_step, getattr(evaluator, "task", None))

    def due(self, step: int, done: bool) -> bool:
        return done or (self.every is not None and step % self.every == 0)

    def write(self, ema, step: int, tensorboard=None) -> Path | None:
        """Draw the grid from the EMA weights; rank 0 saves it and returns its path (other ranks: None)."""
        ema.gather()  # every rank: each holds part of the average under ZeRO
        if self.rank != 0:
            return None
        ema.copy_to(self.task)
        images = draw_grid(self.task, self.cfg, self.conditions)
        name = f"{SAMPLES_DIR}/{grid_name(step * self.ips / 1000)}"
        path = self.storage.local / name
        path.parent.mkdir(parents=True, exist_ok=True)
        grid = image_grid(images)
        grid.save(path)
        self.storage.push(name)
        if tensorboard is not None:
            tensorboard.add_image(SAMPLES_DIR, np.asarray(grid), step, dataformats="HWC")
        return path
