"""Checkpoint contents and their safe loading.

A checkpoint folder holds DeepSpeed's engine state under the tag `state/` (model, optimizer and LR schedule,
one optimizer partition per rank), `ema.safetensors` (the full averaged weights), `rng_rank{r}.safetensors`
(each rank's generators: the noise generator, the CPU RNG and, on a GPU, the CUDA RNG of its device),
`data_rank{r}.safetensors` (the records rank r consumed in the pass in progress: their ids and data epochs) and
`trainer_state.json` (step, data epoch and position). Each rank writes its files
into a local folder; Ray Train merges the ranks' folders in storage and registers the checkpoint only once
every upload finished, so a crash mid-write leaves the previous checkpoint as the latest. Ray copies into
the final `checkpoint_<step>` folder itself, though, so a reader that takes folders by name (`sample`,
`evaluate`) can meet a torn one: `latest_complete` checks the files before handing one out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors.torch import load_file, save_file

from facediff.integrity import safetensors_problem
from facediff.train.ema import EMA

log = logging.getLogger("facediff.checkpoint")

TAG = "state"
STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
DATA_FILE = "data_rank{rank}.safetensors"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # first data epoch of the pass in progress (`passes.ShardPasses`: one pass, one execution)
    batches_in_epoch: int = 0  # micro-batches of that pass consumed by each rank (their records: DATA_FILE)
    # the ranks that saved the checkpoint (None: not recorded). Ray merges a rewritten checkpoint_<step> folder into
    # what an earlier, larger worker group left there unregistered: its data_rank{r} files for r >= world are stale
    world: int | None = None


def rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # dropout on a GPU draws from the device's own generator
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(directory: Path, engine, ema: EMA, state: TrainState, generator: torch.Generator, rank: int,
         consumed: Iterable[tuple[int, int]] = (), world: int | None = None) -> None:
    directory = Path(directory)
    # collective: every rank writes its partition. Frozen weights are left out (every build of the task makes them
    # identically: seeded, or read from the same pretrained files), so an SD family's checkpoint holds its
    # adapter / ControlNet, not another copy of the 1.3 B-parameter pipeline.
    engine.save_checkpoint(str(directory), tag=TAG, exclude_frozen_parameters=True)
    ema.gather()  # collective too: the average is assembled from every rank's part before rank 0 writes it
    save_file(rng_state(generator), str(directory / f"rng_rank{rank}.safetensors"))
    if rank == 0:
        save_file(ema.state_dict(), str(directory / EMA_FILE))
    save_position(directory, state, rank, consumed, world)


def save_position(directory: Path, state: TrainState, rank: int, consumed: Iterable[tuple[int, int]],
                  world: int | None = None) -> None:
    """The data position (every rank the (epoch, id) of the records it consumed in the pass in progress, rank 0
    the trainer state with `world`, the ranks saving): what `driver.resume_point` reads to build a resumed run's
    data pipeline."""
    pairs = torch.tensor(sorted(consumed), dtype=torch.int64).reshape(-1, 2)
    save_file({"consumed_epochs": pairs[:, 0].contiguous(), "consumed_ids": pairs[:, 1].contiguous()},
              str(Path(directory) / DATA_FILE.format(rank=rank)))
    if rank == 0:
        (Path(directory) / STATE_FILE).write_text(json.dumps(asdict(dataclasses.replace(state, world=world))))


def check_resumed_data(batch, state: TrainState, skipped: set[tuple[int, int]], epochs_per_pass: int = 1) -> None:
    """The data pipeline must continue where the checkpoint left off (see `driver.resume_point`): the first batch
    of a pass belongs to the pass's epochs and holds none of the records consumed before the checkpoint."""
    epochs = batch["epoch"].tolist()
    expected = range(state.epoch, state.epoch + epochs_per_pass)
    if not set(epochs) <= set(expected):
        raise RuntimeError(f"data epochs {sorted(set(epochs))} reached the loop, but the run's pass holds epochs "
                           f"{expected.start}-{expected.stop - 1}: the dataset was built for another checkpoint "
                           "than the one resumed from")
    if skipped and skipped & set(zip(epochs, batch["id"].tolist())):
        raise RuntimeError("records consumed before the checkpoint came again in the resumed pass")


def load(directory: Path, engine, ema: EMA, generator: torch.Generator, rank: int) -> TrainState:
    directory = Path(directory)
    if not (directory / STATE_FILE).is_file():
        raise FileNotFoundError(f"{directory}: not a facediff checkpoint (no {STATE_FILE})")
    path, _ = engine.load_checkpoint(str(directory), tag=TAG, load_module_strict=False)  # frozen keys absent
    if path is None:  # DeepSpeed returns (None, None) instead of raising
        raise FileNotFoundError(f"{directory / TAG}: DeepSpeed found no engine state to resume from")
    ema.load_state_dict(load_file(str(directory / EMA_FILE)))
    state = TrainState(**json.loads((directory / STATE_FILE).read_text()))
    rng_file = directory / f"rng_rank{rank}.safetensors"
    # absent (or another group's, see TrainState.world) when resuming with more workers than saved: a fresh seed
    if rng_file.is_file() and (state.world is None or rank < state.world):
        restore_rng(load_file(str(rng_file)), generator)
    if engine.global_steps != state.step:
        raise RuntimeError(f"{directory}: engine is at step {engine.global_steps}, trainer state says {state.step}")
    return state


def consumed_records(directory: Path) -> set[tuple[int, int]]:
    """(epoch, id) of the records every rank consumed in the checkpoint's pass in progress (skipped when that
    pass resumes): the files of the ranks that saved it (`TrainState.world`; all of them where it is not recorded).
    Files written before passes hold ids only: those were all of the checkpoint's epoch."""
    directory = Path(directory)
    state = read_state(directory)
    paths = (sorted(directory.glob(DATA_FILE.format(rank="*"))) if state.world is None else
             [directory / DATA_FILE.format(rank=r) for r in range(state.world)])
    records: set[tuple[int, int]] = set()
    for path in paths:
        data = load_file(str(path))
        ids = data["consumed_ids"].tolist()
        epochs = data["consumed_epochs"].tolist() if "consumed_epochs" in data else None
        if epochs is None:
            epochs = [state.epoch] * len(ids)
        records.update(zip(epochs, ids))
    return records


def by_epoch(records: Iterable[tuple[int, int]]) -> dict[int, set[int]]:
    """{epoch: ids} of (epoch, id) records: what `stream.dataset.build_dataset(skip_ids=...)` takes."""
    out: dict[int, set[int]] = {}
    for epoch, record_id in records:
        out.setdefault(epoch, set()).add(record_id)
    return out


def position_files(names) -> list[str]:
    """Of a checkpoint folder's file names, those that hold the data position (trainer state, consumed ids)."""
    data = re.compile(DATA_FILE.format(rank=r"\d+").replace(".", r"\.") + "$")
    return [name for name in names if name == STATE_FILE or data.match(name)]


def read_state(directory: Path) -> TrainState:
    return TrainState(**json.loads((Path(directory) / STATE_FILE).read_text()))


def load_ema_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The averaged weights of a checkpoint, keyed by parameter name (for export and sampling)."""
    state = load_file(str(Path(directory) / EMA_FILE))
    return {name[len("ema."):]: t for name, t in state.items() if name.startswith("ema.")}


def problem(directory: Path) -> str | None:
    """Why a checkpoint folder cannot give its EMA model (None when it can): the trainer state missing or
    unreadable, or a safetensors file (the EMA weights first) missing or cut short, as a torn upload leaves it."""
    directory = Path(directory)
    try:
        read_state(directory)
    except FileNotFoundError:
        return f"{directory / STATE_FILE}: missing"
    except (ValueError, TypeError):  # also UnicodeDecodeError and JSONDecodeError
        return f"{directory / STATE_FILE}: unreadable"
    for path in [directory / EMA_FILE, *sorted(p for p in directory.glob("*.safetensors") if p.name != EMA_FILE)]:
        if found := safetensors_problem(path):
            return found
    return None


def latest_complete(run: Path) -> Path | None:
    """The newest `checkpoint_*` folder of a run whose files are whole; each newer damaged one is named in one
    warning line. None when there is none (no checkpoint yet, or all damaged: the caller says so, see `problem`)."""
    damaged = []
    for folder in sorted((p for p in Path(run).glob("checkpoint_*") if p.is_dir()), reverse=True):
        found = problem(folder)
        if found is None:
            for name, why in damaged:
                log.warning("skipping damaged checkpoint %s (%s); using %s", name, why, folder.name)
            return folder
        damaged.append((folder.name, found))
    return None


@contextlib.contextmanager
def local_folder(resume_from) -> Iterator[Path]:
    """A Ray Train checkpoint as a local folder, for one worker to read.

    A local checkpoint is read in place. A remote one (S3, ...) is downloaded by each worker into its own
    temporary folder, removed afterwards. Ray's shared download (`Checkpoint.as_directory`) is not safe for the
    ranks of one node: a rank that takes the download lock after another rank's download has finished downloads
    again, in place, over the files that rank is reading (ray-project/ray#48726, open). A resume from S3 failed
    that way with a truncated safetensors header."""
    import pyarrow.fs

    if isinstance(resume_from.filesystem, pyarrow.fs.LocalFileSystem):
        yield Path(resume_from.path)
        return
    folder = Path(tempfile.mkdtemp(prefix="facediff-resume-"))
    try:
        resume_from.to_directory(str(folder))
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
