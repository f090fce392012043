"""Checkpoint contents and their safe loading.

A checkpoint folder holds DeepSpeed's engine state under the tag `state/` (model, optimizer and LR schedule,
one optimizer partition per rank), `ema.safetensors` (the full averaged weights), `rng_rank{r}.safetensors`
(each rank's generators) and `trainer_state.json` (step, data epoch and position). Each rank writes its files
into a local folder; Ray Train merges the ranks' folders in storage and registers the checkpoint only once
every upload finished, so a crash mid-write leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from facediff.train.ema import EMA

TAG = "state"
STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # data epoch in progress
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed (skipped on resume)


def save(directory: Path, engine, ema: EMA, state: TrainState, generator: torch.Generator, rank: int) -> None:
    directory = Path(directory)
    engine.save_checkpoint(str(directory), tag=TAG)  # collective: every rank writes its partition
    save_file(
        {"generator": generator.get_state(), "torch": torch.get_rng_state()},
        str(directory / f"rng_rank{rank}.safetensors"),
    )
    if rank == 0:
        save_file(ema.state_dict(), str(directory / EMA_FILE))
        (directory / STATE_FILE).write_text(json.dumps(asdict(state)))


def load(directory: Path, engine, ema: EMA, generator: torch.Generator, rank: int) -> TrainState:
    directory = Path(directory)
    if not (directory / STATE_FILE).is_file():
        raise FileNotFoundError(f"{directory}: not a facediff checkpoint (no {STATE_FILE})")
    path, _ = engine.load_checkpoint(str(directory), tag=TAG)
    if path is None:  # DeepSpeed returns (None, None) instead of raising
        raise FileNotFoundError(f"{directory / TAG}: DeepSpeed found no engine state to resume from")
    ema.load_state_dict(load_file(str(directory / EMA_FILE)))
    rng_file = directory / f"rng_rank{rank}.safetensors"
    if rng_file.is_file():  # absent when resuming with more workers than before: keep the fresh seed
        rng = load_file(str(rng_file))
        generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
    state = TrainState(**json.loads((directory / STATE_FILE).read_text()))
    if engine.global_steps != state.step:
        raise RuntimeError(f"{directory}: engine is at step {engine.global_steps}, trainer state says {state.step}")
    return state


def load_ema_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The averaged weights of a checkpoint, keyed by parameter name (for export and sampling)."""
    state = load_file(str(Path(directory) / EMA_FILE))
    return {name[len("ema."):]: t for name, t in state.items() if name.startswith("ema.")}
