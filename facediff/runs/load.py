"""A model from a run folder (its newest complete checkpoint's EMA weights), an export, a run in remote storage
or an experiment config (untrained); and the device to use it on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from facediff.config import load_config
from facediff.config.schema import ExperimentConfig
from facediff.integrity import folder_problem
from facediff.runs.checkpoints import load_task_with_ema, run_checkpoint
from facediff.runs.remote import fetch_remote_run
from facediff.storage import is_remote
from facediff.tasks import DiffusionTask, build_task
from facediff.train.checkpoint import read_state

EXPORT_CONFIG = DiffusionTask.EXPORT_CONFIG


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
