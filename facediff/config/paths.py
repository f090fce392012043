"""Make every filesystem path of a config absolute, once, in the process the user started.

Code that runs inside Ray (a Tune trial's driver, a Train worker, Ray Train's dataset factory) runs in Ray's
packaged copy of the working directory, where a relative path such as `outputs/demo/shards` does not exist
(git-ignored folders are not packaged). So the driver resolves paths against the directory the command was run
in before anything is shipped to Ray. Hub ids (`org/name`) are left as they are: a pretrained reference is
treated as a local folder when it is absolute, starts with `./` or `../`, or exists relative to that directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from facediff.config.schema import ExperimentConfig, PretrainedRef


def _absolute(path: str, base: Path) -> str:
    # abspath, not resolve(): a symlinked data folder keeps the name the user gave it
    return path if "://" in path else os.path.abspath(base / Path(path).expanduser())


def is_local_reference(ref: str, base: Path) -> bool:
    return Path(ref).expanduser().is_absolute() or ref.startswith(("./", "../")) or (base / ref).exists()


def resolve_reference(ref: str | None, base: Path | None = None) -> str | None:
    """A pretrained reference: a local folder made absolute, or a hub id unchanged."""
    base = Path(base or os.getcwd())
    if ref is None or "://" in ref or not is_local_reference(ref, base):
        return ref
    return _absolute(ref, base)


def _references(node) -> list[PretrainedRef]:
    """Every PretrainedRef inside a model config section (autoencoder, mask encoder, pipeline, controlnet...)."""
    found = []
    for name in type(node).model_fields:
        value = getattr(node, name)
        if isinstance(value, PretrainedRef):
            found.append(value)
        if hasattr(type(value), "model_fields"):
            found.extend(r for r in _references(value) if r is not value)
    return found


def resolve_paths(cfg: ExperimentConfig, base: str | Path | None = None) -> ExperimentConfig:
    """A copy of `cfg` whose data, storage, Inception weights, mask segmenter and local pretrained folders are
    absolute."""
    base = Path(base or os.getcwd())
    cfg = cfg.model_copy(deep=True)
    cfg.data.path = _absolute(cfg.data.path, base)
    cfg.trainer.storage_path = _absolute(cfg.trainer.storage_path, base)
    if cfg.eval.inception_weights is not None:
        cfg.eval.inception_weights = _absolute(cfg.eval.inception_weights, base)
    if cfg.eval.mask_segmenter is not None:
        cfg.eval.mask_segmenter = _absolute(cfg.eval.mask_segmenter, base)
    for ref in _references(cfg.model):
        ref.pretrained = resolve_reference(ref.pretrained, base)
    return cfg
