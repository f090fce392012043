"""The worker side of a Ray Train run, shared by `facediff train` (`loop.py`) and `train-segformer`: resumable passes
over the training shard, checkpoint-and-report, and fault injection for tests.

    passes = ResumablePasses(state, consumed, epochs_per_pass)
    for batch in passes.batches(shard, total, batch_size=..., device=..., seed=...):
        ... one micro-batch; advance state.step ...
        report(metrics, step=state.step, save=lambda folder: ... )  # a checkpoint of the step

The driver side (Ray start, dataset factory, `fit`) is `driver.py`; rank 0's run log is `run_log.RunLog`.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from facediff.data.stream.dataset import iter_train_batches
from facediff.train import checkpoint
from facediff.train.checkpoint import TrainState

SHUFFLE_BUFFER = 256


def maybe_crash(step: int, fault: dict | None) -> None:
    """Fault injection for tests of resume and FailureConfig: `crash_at_step` raises once at that step;
    `step_delay` (seconds) slows every step, a window for a test that kills a worker process from outside;
    every step waits while the file `pause_file` exists (a test holds the run while it changes the cluster)."""
    if not fault:
        return
    while fault.get("pause_file") and Path(fault["pause_file"]).exists():
        time.sleep(0.2)
    if fault.get("step_delay"):
        time.sleep(fault["step_delay"])
    if step != fault.get("crash_at_step"):
        return
    marker = Path(fault["marker"])
    if not marker.exists():
        marker.touch()
        raise RuntimeError(f"injected worker crash at step {step}")


class ResumablePasses:
    """The training shard read pass after pass from a checkpoint's position: `state` (step, pass's first epoch)
    and `consumed`, the (epoch, id) records every rank used in the pass in progress, which a checkpoint saves
    (`checkpoint.save_position`) and the driver's dataset factory leaves out of the resumed pass
    (`driver.resume_point`). The first batch of each pass is checked against that position."""

    def __init__(self, state: TrainState, consumed: set[tuple[int, int]], epochs_per_pass: int = 1):
        self.state, self.consumed, self.epochs_per_pass = state, consumed, epochs_per_pass
        self.skipped = set(consumed)  # what the resumed pass must not bring again

    def batches(self, shard, total_steps: int, *, batch_size: int, device, seed: int,
                **options: Any) -> Iterator[dict]:
        """Batches until `state.step` reaches `total_steps` (the caller advances it); a pass that runs out moves
        the state to the next pass. Each pass is shuffled locally with its own seeded order."""
        state = self.state
        while state.step < total_steps:
            batches = iter_train_batches(shard, batch_size, device=device, local_shuffle_buffer_size=SHUFFLE_BUFFER,
                                         local_shuffle_seed=seed * 10_007 + state.epoch, **options)
            for index, batch in enumerate(batches):
                if index == 0:
                    checkpoint.check_resumed_data(batch, state, self.skipped, self.epochs_per_pass)
                self.consumed.update(zip(batch["epoch"].tolist(), batch["id"].tolist()))
                state.batches_in_epoch += 1
                yield batch
                if state.step >= total_steps:
                    return
            state.epoch, state.batches_in_epoch = state.epoch + self.epochs_per_pass, 0
            self.consumed, self.skipped = set(), set()


def report(metrics: dict[str, Any], step: int, save: Callable[[Path], None] | None = None, *,
           upload: str = "sync", validation: Any = None) -> None:
    """Report to Ray Train; with `save`, a checkpoint too: `save(folder)` writes this rank's files into a
    temporary folder, which Ray copies into the run's `checkpoint_<step>` (merged over ranks) and registers once
    every rank's upload finished. `upload="async"` (`trainer.checkpoint_upload`): the copy runs in a background
    thread of this worker and training goes on; Ray deletes the folder once copied. `validation`: Ray's
    checkpoint validation task evaluates the checkpoint once it is registered (`async_eval.due`)."""
    import ray.train
    from ray.train import CheckpointUploadMode

    if save is None:
        ray.train.report(metrics)
        return
    options = {"checkpoint_dir_name": f"checkpoint_{step:09d}", "validation": validation or False}
    if upload == "async":  # the folder outlives this call: the upload thread reads it, then Ray deletes it
        folder = tempfile.mkdtemp(prefix="facediff-ckpt-")
        save(Path(folder))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC, **options)
        return
    with tempfile.TemporaryDirectory(prefix="facediff-ckpt-") as folder:
        save(Path(folder))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), **options)
