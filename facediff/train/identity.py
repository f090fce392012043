"""A run has one config: the run folder's `config.yaml` says what the run trains, and a re-run is checked against it.

`facediff train` on a run folder that holds a recorded config compares the new, resolved config with it before
anything is written or started:
- identical: the run resumes;
- only keys of `MAY_CHANGE_ON_RESUME` differ (`trainer.total_kimg` only upwards): it resumes with them and the change
  is recorded;
- anything else: `RunConfigChanged` (exit code 2 in the CLI) naming each differing key with both values and the two
  ways out: a new run (`trainer.run_name=...`) or `--resume-with-changes`, which resumes and records them.

The record (a dated line in `config-history.jsonl` with the old and new values, then `config.yaml` replaced
atomically) is written by rank 0 once every worker has restored the checkpoint (`commit`), so a resume that fails
there (a model of another shape) leaves the run folder as it was. The user's page: docs/resuming.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from facediff.config import dump_config
from facediff.config.schema import ExperimentConfig
from facediff.data.shards import atomic_write_text
from facediff.storage import RunStorage

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "config-history.jsonl"
TOTAL_KIMG = "trainer.total_kimg"

# The keys a re-run may change and still resume the run without being asked (each change recorded): where the run
# folder is, how far the run goes, and how often it logs, checkpoints, evaluates and retries. Every other key says
# what is trained (data, model, schedule, optimizer, batch, precision, seeds, evaluation protocol). A key names
# itself and everything under it. docs/resuming.md lists these with the reasons.
MAY_CHANGE_ON_RESUME: dict[str, str] = {
    "name": "the config's label; the run folder, not the label, identifies the run",
    "description": "free text",
    "trainer.run_name": "the folder's name: the run found under it is this run",
    "trainer.storage_path": "where the folder is: a moved run folder resumes",
    TOTAL_KIMG: "may grow (never shrink): the schedule continues to the new end",
    "trainer.checkpoint_every_kimg": "checkpoint cadence",
    "trainer.keep_last": "checkpoints kept",
    "trainer.log_every_steps": "logging cadence",
    "trainer.max_failures": "worker restarts allowed",
    "trainer.on_nonfinite_loss": "what a non-finite loss does",
    "data.max_bad_records": "how many undecodable records a run skips before it stops",
    "trainer.resources_per_worker": "what Ray reserves per worker (not the worker count)",
    "trainer.placement": "where Ray places the workers",
    "trainer.min_workers": "the fewest workers an elastic run goes on with (the global batch is the maximum's)",
    "trainer.elastic_resize_interval_s": "how often an elastic run looks for room to grow",
    "trainer.placement_timeout_s": "how long the start waits for the workers to be placed",
    "trainer.gradient_checkpointing": "activations recomputed in the backward (the same gradients, less memory)",
    "eval.every_kimg": "evaluation cadence (the protocol itself is fixed)",
    "tracking": "where the metrics are also sent (MLflow, W&B): nothing that is trained",
    "eval.mask_segmenter": "read by `facediff evaluate` only, never by training",
    "eval.sample_grid": "the training-time sample grids (pictures to look at, not measured)",
    "eval.sample_grid_steps": "the training-time sample grids' sampler steps",
    "eval.log_images_every_kimg": "the training-time sample grids' cadence",
}
_ABSENT = "(absent)"


class RunConfigChanged(ValueError):
    """A re-run whose config differs from the run's recorded one in keys that define the run."""


@dataclass
class Resumption:
    """What the driver found: the config to record, and the changes to the recorded one (none for a new run or an
    identical re-run). Shipped to the workers, whose rank 0 writes it (`commit`)."""

    config: str  # config.yaml as it must read once the run started
    changes: dict[str, list] = field(default_factory=dict)  # key -> [old, new]
    how: str = ""  # why the changes were allowed: "may change on resume" or "--resume-with-changes"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a config's leaves (lists and empty mappings are leaves)."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(old: dict, new: dict) -> dict[str, list]:
    """Each key whose value differs between two configs (as plain data): key -> [old, new], `(absent)` for a key on
    one side only."""
    before, after = flatten(old), flatten(new)
    keys = list(after) + [k for k in before if k not in after]
    return {k: [before.get(k, _ABSENT), after.get(k, _ABSENT)] for k in keys
            if before.get(k, _ABSENT) != after.get(k, _ABSENT)}


def may_change(key: str, old: Any, new: Any) -> bool:
    """Whether a resumed run may take this change without `--resume-with-changes`."""
    if key == TOTAL_KIMG:
        return isinstance(old, (int, float)) and isinstance(new, (int, float)) and new >= old
    return any(key == k or key.startswith(k + ".") for k in MAY_CHANGE_ON_RESUME)


def _plain(raw: Any) -> Any:
    """A recorded config as the current schema dumps it (keys added since filled with their defaults); as read when
    it no longer validates (a key since removed: it then shows as a difference)."""
    try:
        return ExperimentConfig.model_validate(raw).model_dump(mode="json")
    except ValidationError:
        return raw


def recorded_config(storage: RunStorage) -> dict | None:
    """The run's recorded config as plain data, None when the folder holds none."""
    if not storage.exists(CONFIG_FILE):
        return None
    raw = yaml.safe_load(storage.read_bytes(CONFIG_FILE).decode("utf-8"))
    return _plain(raw) if isinstance(raw, dict) else {}


def _show(value: Any) -> str:
    return value if value == _ABSENT else json.dumps(value)


SHOWN_WITH_VALUES = 8  # a family swapped changes dozens of keys: the rest are named without their values


def describe(changes: dict[str, list]) -> str:
    """`key old -> new; ...` for each change (the first SHOWN_WITH_VALUES with values, the others by name)."""
    parts = []
    for key, (old, new) in list(changes.items())[:SHOWN_WITH_VALUES]:
        note = " (a resumed run may grow, not shrink)" if key == TOTAL_KIMG else ""
        parts.append(f"{key} {_show(old)} -> {_show(new)}{note}")
    rest = list(changes)[SHOWN_WITH_VALUES:]
    if rest:
        parts.append(f"and {len(rest)} more: {', '.join(rest)}")
    return "; ".join(parts)


def _refusal(cfg: ExperimentConfig, storage: RunStorage, changes: dict[str, list]) -> str:
    where = f"{storage.uri}/{CONFIG_FILE}"
    text = f"{storage.uri}: this run was trained with another config ({where}): {describe(changes)}. "
    if cfg.trainer.run_name is None:
        text += (f"The run folder is named after the config's `name`, which defaults to the config file's name "
                 f"({cfg.name!r}): another config file of that name lands in the same folder. ")
    return text + (f"Start a new run with trainer.run_name=<new name>, or continue this one with these changes "
                   f"(recorded in {HISTORY_FILE}) with --resume-with-changes; docs/resuming.md says what may change")


def check_resume(cfg: ExperimentConfig, storage: RunStorage, resume_with_changes: bool = False) -> Resumption:
    """Compare a run's (resolved) config with the one its folder recorded; nothing is written. Raises
    RunConfigChanged when they differ in keys a resume may not change unasked."""
    new = cfg.model_dump(mode="json")
    text = dump_config(cfg)
    old = recorded_config(storage)
    if old is None:
        if not resume_with_changes and any(name.startswith("checkpoint_") for name in storage.listing()):
            raise RunConfigChanged(
                f"{storage.uri}: holds checkpoints but no {CONFIG_FILE}, so what they were trained with is unknown; "
                "start a new run with trainer.run_name=<new name>, or resume it with this config with "
                "--resume-with-changes")
        return Resumption(text)
    changes = config_changes(old, new)
    refused = {k: v for k, v in changes.items() if not may_change(k, *v)}
    if refused and not resume_with_changes:
        raise RunConfigChanged(_refusal(cfg, storage, refused))
    return Resumption(text, changes, "--resume-with-changes" if refused else "may change on resume")


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def commit(storage: RunStorage, resumption: Resumption, step: int) -> bool:
    """Rank 0, once every worker restored the run's checkpoint (`step`; 0 for a new run): record the config. A
    change gets a dated line in the history first (old and new values), then `config.yaml` is replaced. A no-op
    when the folder already records this config (an identical re-run, a worker restart). Returns whether it wrote."""
    if storage.exists(CONFIG_FILE) and storage.read_bytes(CONFIG_FILE).decode("utf-8") == resumption.config:
        return False
    if resumption.changes:
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "resumed_at_step": step,
                 "allowed_by": resumption.how,
                 "changes": {k: {"old": old, "new": new} for k, (old, new) in resumption.changes.items()}}
        storage.pull(HISTORY_FILE)
        history = storage.local / HISTORY_FILE
        earlier = history.read_text(encoding="utf-8") if history.is_file() else ""
        _write_atomically(history, earlier + json.dumps(entry) + "\n")
        storage.push(HISTORY_FILE)
    _write_atomically(storage.local / CONFIG_FILE, resumption.config)
    storage.push(CONFIG_FILE)
    return True


def read_history(storage: RunStorage) -> list[dict]:
    """The run's recorded config changes, oldest first."""
    if not storage.exists(HISTORY_FILE):
        return []
    return [json.loads(line) for line in storage.read_bytes(HISTORY_FILE).decode("utf-8").splitlines() if line]
