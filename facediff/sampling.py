"""`facediff sample`: load a run (latest checkpoint's EMA weights) or an exported model, draw a PNG grid.

Each batch of samples gets its own seed derived from (seed, batch index), so batches differ and any batch
can be redrawn alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from facediff.config import load_config
from facediff.config.schema import ExperimentConfig
from facediff.data.celebamask import ATTRIBUTE_NAMES
from facediff.integrity import folder_problem
from facediff.storage import is_remote
from facediff.tasks import DiffusionTask, build_task
from facediff.viz import image_grid

EXPORT_CONFIG = DiffusionTask.EXPORT_CONFIG


def batch_generator(seed: int, *indices: int) -> torch.Generator:
    """A CPU generator for one batch, distinct for every (seed, indices...) combination."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, *indices]).generate_state(1)[0]))


def resolve_device(name: str = "auto") -> torch.device:
    """"auto": the (first) CUDA GPU when there is one, else the CPU; or an explicit torch device ("cuda:1")."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA GPU; use --device cpu (or auto)")
    return device


def run_checkpoint(run: Path) -> Path:
    """The newest complete checkpoint of a run folder (damaged newer ones skipped with a warning line)."""
    from facediff.train import checkpoint
    from facediff.train.run import EXPORT_DIR

    found = checkpoint.latest_complete(run)
    if found is not None:
        return found
    folders = sorted(p for p in Path(run).glob("checkpoint_*") if p.is_dir())
    if not folders:
        raise FileNotFoundError(f"{run}: run folder has no checkpoint_* folder yet")
    export = Path(run) / EXPORT_DIR
    n = len(folders) - 1
    before = "" if n == 0 else ", and so is the one before it" if n == 1 else f", and so are the {n} before it"
    raise ValueError(f"{folders[-1]}: damaged checkpoint ({checkpoint.problem(folders[-1])}){before}; resume "
                     "training with `facediff train` to write a new one"
                     + (f", or use the run's export {export}" if export.is_dir() else ""))


def fetch_remote_run(uri: str) -> Path:
    """A run in remote storage (s3://bucket/prefix/run) as a local folder holding what sampling and evaluation
    read: its config, its export and each checkpoint's top-level files (EMA weights, trainer state; not the
    optimizer state under `state/`), in the run's local mirror (see `storage.RunStorage`)."""
    from facediff.storage import RunStorage
    from facediff.train.run import EXPORT_DIR

    parent, _, name = uri.rstrip("/").rpartition("/")
    storage = RunStorage(parent, name)
    if not storage.pull("config.yaml"):
        raise FileNotFoundError(f"{uri}: no run there (no config.yaml)")
    storage.pull(EXPORT_DIR)
    for folder, is_folder in storage.listing().items():
        if not (is_folder and folder.startswith("checkpoint_")):
            continue
        for file, sub in storage.listing(folder).items():
            if not sub:
                storage.pull(f"{folder}/{file}")
    return storage.local


def load_model(path: str | Path, overrides: list[str] = (),
               check: Callable[[ExperimentConfig], None] | None = None) -> tuple[ExperimentConfig, DiffusionTask]:
    """A run folder (uses its newest complete checkpoint), an exported model folder (written by `export`), or an
    experiment config file (the model as built, untrained).

    `overrides` change the stored config (e.g. `data.path=...` when the data moved, `eval.steps=...`). `check`
    sees the config before any network is built (a caller's own checks fail fast, not after loading weights)."""
    cfg, task, _ = load_model_and_source(path, overrides, check)
    return cfg, task


def load_model_and_source(path: str | Path, overrides: list[str] = (),
                          check: Callable[[ExperimentConfig], None] | None = None,
                          ) -> tuple[ExperimentConfig, DiffusionTask, dict]:
    """`load_model`, and which weights it loaded (`evaluate` records them): `kind` (run checkpoint, export or
    untrained config), `path` as given, and for a run the checkpoint folder and its step."""
    from facediff.train.run import load_task_with_ema

    given = str(path)
    path = fetch_remote_run(given) if is_remote(given) else Path(path)
    untrained = path.is_file() and path.suffix in (".yaml", ".yml")
    if untrained:
        source = path
    elif (path / "config.yaml").is_file():
        source = path / "config.yaml"  # a run folder
    elif (path / EXPORT_CONFIG).is_file():
        source = path / EXPORT_CONFIG
    else:
        raise FileNotFoundError(f"{path}: neither a run folder (config.yaml) nor an exported model ({EXPORT_CONFIG})")
    cfg = load_config(source, list(overrides))
    if check is not None:
        check(cfg)
    if untrained:
        # an experiment config, untrained: its pretrained networks as published (for controlnet a fresh branch,
        # whose zero convolutions add exactly nothing: plain Stable Diffusion, Table 1's "Stable Diffusion" row)
        return cfg, build_task(cfg).eval(), {"kind": "untrained config", "path": given,
                                             "weights": "as built (pretrained networks or random init)"}
    if source.name == "config.yaml":
        from facediff.train.checkpoint import read_state

        folder = run_checkpoint(path)
        return cfg, load_task_with_ema(cfg, folder), {"kind": "run checkpoint", "path": given,
                                                      "checkpoint": folder.name, "step": read_state(folder).step,
                                                      "weights": "ema"}
    # checked first: diffusers fails on a cut-short or missing file without naming it
    if (damage := folder_problem(path)) is not None:
        raise ValueError(f"{damage}; this export is incomplete: sample its run folder instead, or copy the "
                         "export again")
    task = build_task(cfg, load_pretrained=False)  # the export holds every weight, frozen ones included
    task.load_exported(path)
    return cfg, task.eval(), {"kind": "export", "path": given, "weights": "ema (exported at the end of training)"}


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
    from facediff.eval.evaluate import local_test_batches

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
