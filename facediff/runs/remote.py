"""A run in remote storage, copied into its local mirror as far as sampling and evaluation read it."""

from __future__ import annotations

from pathlib import Path

from facediff.runs.checkpoints import EXPORT_DIR
from facediff.storage import RunStorage


def fetch_remote_run(uri: str) -> Path:
    """A run in remote storage (s3://bucket/prefix/run) as a local folder holding what sampling and evaluation
    read: its config, its export and each checkpoint's top-level files (EMA weights, trainer state; not the
    optimizer state under `state/`), in the run's local mirror (see `storage.RunStorage`)."""
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
