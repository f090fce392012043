"""A run folder's checkpoints and export: the newest complete checkpoint, its EMA weights in a plain task."""

from __future__ import annotations

from pathlib import Path

from facediff.config.schema import ExperimentConfig
from facediff.tasks import DiffusionTask, build_task
from facediff.train import checkpoint

EXPORT_DIR = "export"  # the run folder's exported model (written at the end of `facediff train`)


def run_checkpoint(run: Path) -> Path:
    """The newest complete checkpoint of a run folder (damaged newer ones skipped with a warning line)."""
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


def load_task_with_ema(cfg: ExperimentConfig, checkpoint_dir: Path) -> DiffusionTask:
    """A plain (non-DeepSpeed) task holding a checkpoint's averaged weights."""
    task = build_task(cfg)
    weights = checkpoint.load_ema_weights(checkpoint_dir)
    where = f"{Path(checkpoint_dir) / checkpoint.EMA_FILE}: the EMA weights do not fit the config's " \
            f"{cfg.model.family!r} model"
    fix = "was the run's config.yaml (or a --set model.* override) changed after training? Use the config it " \
          "was trained with"
    try:
        missing, unexpected = task.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # shapes differ: torch lists every tensor over many lines; name the first
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        first = first.rstrip(".").replace("torch.Size(", "(")
        raise ValueError(f"{where} ({first}); {fix}") from None
    trainable = {name for name, p in task.named_parameters() if p.requires_grad}
    if unexpected or trainable & set(missing):
        raise ValueError(f"{where} (missing {sorted(trainable & set(missing))[:3]}, unexpected "
                         f"{unexpected[:3]}); {fix}")
    return task.eval()
