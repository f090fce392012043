"""Rank 0's record of a run: a progress line, `metrics.jsonl` (for curves) and TensorBoard events."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from facediff.train import async_eval
from facediff.train.engine import images_per_step, total_steps

if TYPE_CHECKING:
    from facediff.config.schema import ExperimentConfig
    from facediff.storage import RunStorage

log = logging.getLogger("facediff.train")

METRICS_FILE = "metrics.jsonl"
# marks a checkpoint's report to Ray that holds no evaluation: its scored metric is a placeholder (`loop._scored`)
CHECKPOINT_ONLY = "checkpoint_only"
# Copies of the log to remote storage, at most this often between checkpoints: a copy after every row (the
# whole file and TensorBoard folder) would stall rank 0 every `log_every_steps`, and every rank at the next
# collective.
PUSH_EVERY_S = 30.0


def planned_kimg(cfg: ExperimentConfig, world_size: int) -> float:
    """What the run trains: `trainer.total_kimg` rounded up to whole steps (the last step's batch is whole), so
    the progress line counts towards the images the run will really see, and ends at its own total."""
    return total_steps(cfg, world_size) * images_per_step(cfg, world_size) / 1000


def rounding_note(cfg: ExperimentConfig, world_size: int) -> str | None:
    """One line when whole steps overshoot `trainer.total_kimg` (0.1 kimg at 16 images a step is 112 images)."""
    planned, ips = planned_kimg(cfg, world_size), images_per_step(cfg, world_size)
    if math.isclose(planned, cfg.trainer.total_kimg, rel_tol=1e-9, abs_tol=1e-12):
        return None
    return (f"trainer.total_kimg {cfg.trainer.total_kimg:g} is {cfg.trainer.total_kimg * 1000 / ips:.4g} steps of "
            f"{ips} images: training {total_steps(cfg, world_size)} whole steps, {planned:g} kimg")


def epochs_seen(images: int, train_rows: int) -> float:
    """Passes over the training split the images trained amount to (fractional): `epoch` in `metrics.jsonl`.

    Not the data-epoch tags of the rows trained on: a pass reads several epochs (`passes.ShardPasses`) and the
    local shuffle buffer mixes them, so rows of a pass's last epoch arrive within its first steps (a 58-face
    split logged epoch 5 at step 6, after 96 images)."""
    return round(images / max(1, train_rows), 3)


class RunLog:
    """Written in the run's local folder and copied to its storage (a no-op for local storage) with the first row,
    with every row written with `sync` (checkpoints: a resumed run continues the stored rows), at most every
    PUSH_EVERY_S seconds between, and at the end."""

    def __init__(self, storage: RunStorage, total_steps: int, total_kimg: float, resumed_step: int,
                 tracker=None, evals: bool = False):
        """`tracker`: the run's MLflow or W&B end (`tracking.attach`), sent every row and image; None: off.
        `evals`: evaluations run in Ray's validation task; their results are appended as they arrive
        (`async_eval.take_arrived`, at each copy to storage)."""
        from torch.utils.tensorboard import SummaryWriter

        self.storage, self.dir = storage, storage.local
        self.dir.mkdir(parents=True, exist_ok=True)
        self.total_steps, self.total_kimg = total_steps, total_kimg
        self.path = self.dir / METRICS_FILE
        storage.pull(METRICS_FILE)  # a resumed run continues the stored rows, wherever this rank runs now
        self._drop_rows_after(resumed_step)
        self.evals_merged = async_eval.merged_steps(read_metrics(self.dir)) if evals else None
        self.tensorboard = SummaryWriter(str(self.dir / "tensorboard"), purge_step=resumed_step + 1)
        self.start, self.start_step = time.time(), resumed_step
        self.pushed_at: float | None = None
        self.unpushed = False  # rows written since the last copy
        self.tracker, self.tracker_failed = tracker, False

    def _drop_rows_after(self, step: int) -> None:
        """A crashed run may have logged past its last checkpoint; the resumed run re-does those steps."""
        if not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def push(self) -> None:
        if self.evals_merged is not None:
            self._append_arrived_evals()
        self.storage.push(METRICS_FILE)
        self.storage.push("tensorboard")
        self.pushed_at, self.unpushed = time.time(), False

    def _append_arrived_evals(self) -> None:
        rows = async_eval.take_arrived(self.storage, self.evals_merged)
        with self.path.open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        for row in rows:
            async_eval.add_scalars(self.tensorboard, row)
            # MLflow keeps a late row at its checkpoint's step; W&B drops steps below its last (docs/tracking.md)
            self._track("log_metrics", _numeric(row), row["step"])
            log.info("evaluation of the checkpoint at kimg %.3f: %s", row["kimg"],
                     " ".join(f"{k} {v:.4g}" for k, v in row.items() if k.startswith(("fid", "fd_"))))
        self.tensorboard.flush()

    def write(self, metrics: dict, sync: bool = False) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, metrics["step"])
        self.tensorboard.flush()
        self._track("log_metrics", _numeric(metrics), metrics["step"])
        self.unpushed = True
        if sync or self.pushed_at is None or time.time() - self.pushed_at >= PUSH_EVERY_S:
            self.push()
        step = metrics["step"]
        rate = (step - self.start_step) / max(1e-9, time.time() - self.start)
        eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
        extras = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith(("fid", "fd_")))
        log.info(
            "step %d/%d  kimg %.3f/%.3f  loss %.4f  lr %.3g  img/s %.1f  eta %.0fs %s",
            step, self.total_steps, metrics["kimg"], self.total_kimg, metrics.get("loss", float("nan")),
            metrics.get("lr", float("nan")), metrics.get("images_per_s", float("nan")), eta, extras,
        )

    def log_image(self, tag: str, png: Path, kimg: float) -> None:
        """An image of the run (e.g. a sample grid, `samples/kimg_00012.png`) to the tracker at the step of
        `kimg`; TensorBoard stays the caller's. Nothing when tracking is off."""
        step = round(kimg * self.total_steps / self.total_kimg) if self.total_kimg else 0
        self._track("log_image", tag, Path(png), step)

    def _track(self, method: str, *args) -> None:
        """A tracker that fails (server down, quota) is named once and left behind: the run goes on."""
        if self.tracker is None or self.tracker_failed:
            return
        try:
            getattr(self.tracker, method)(*args)
        except Exception as err:  # noqa: BLE001 - any tracker error: the run's own log keeps every row
            self.tracker_failed = True
            log.warning("tracking: %s failed (%s: %s); nothing more is sent to it in this attempt, "
                        "metrics.jsonl and TensorBoard go on", method, type(err).__name__, err)

    def close(self) -> None:
        self.tensorboard.close()
        self._track("close")
        if self.unpushed:  # the loop's last row is a checkpoint's, already copied
            self.push()


def _numeric(row: dict) -> dict[str, float]:
    """A metrics row's numbers, less its step: what a tracker logs at that step."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
