"""Load YAML configs with `base:` inheritance and `key=value` overrides; errors name the key and its file.

A config file may start with `base: other.yaml` (or a list), resolved relative to itself; the base is loaded
first and this file's keys are merged over it, mappings key by key, everything else replaced. Command-line
overrides are dotted keys (`trainer.num_workers=2`, `model.block_out_channels=[32,64]`) whose values are
parsed as YAML. Each leaf remembers the file (or "command line") that set it, so a validation error can say
where the bad key was written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from facediff.config.grid import GridConfig
from facediff.config.schema import MODEL_FAMILIES, ExperimentConfig

CLI = "command line"
T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A config that cannot be loaded; the message names the file and the key."""


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:  # e.g. saved as Latin-1 or UTF-16 by an editor
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                          "save the config as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _merge(into: dict, new: dict, source: str, origins: dict[tuple, str], prefix: tuple = ()) -> None:
    for key, value in new.items():
        path = prefix + (key,)
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, source, origins, path)
        else:
            into[key] = value
            # a replaced subtree now comes wholly from `source`
            for stale in [p for p in origins if p[: len(path)] == path]:
                del origins[stale]
            origins[path] = source


def load_raw(path: str | Path, origins: dict[tuple, str] | None = None, _seen: tuple = ()) -> dict[str, Any]:
    """The merged mapping of a config file and its bases, before validation."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: `base` cycle through {[str(p) for p in _seen]}")
    origins = {} if origins is None else origins
    data = _read_yaml(path)
    bases = data.pop("base", [])
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        _merge(merged, load_raw(path.parent / base, origins, _seen + (path,)), str(path.parent / base), {})
    # origins of the bases were recorded by the recursive calls; this file's keys override them
    _merge(merged, data, str(path), origins)
    return merged


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{CLI}: override {text!r} is not of the form key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return tuple(key.strip().split(".")), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str], origins: dict[tuple, str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _merge(raw, nested, CLI, origins)
    return raw


def _origin_of(loc: tuple, origins: dict[tuple, str], fallback: str) -> str:
    for n in range(len(loc), 0, -1):
        if loc[:n] in origins:
            return origins[loc[:n]]
    # a missing key is "set" nowhere: blame the top file
    return fallback


def _format_errors(err: ValidationError, origins: dict[tuple, str], top: str) -> str:
    lines = []
    for e in err.errors():
        # the tagged union puts the family name in the path (model.unet.x); the user wrote model.x
        loc = tuple(p for i, p in enumerate(e["loc"]) if not (i == 1 and e["loc"][0] == "model" and p in MODEL_FAMILIES))
        key = ".".join(str(p) for p in loc) or "(top level)"
        message = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{_origin_of(loc, origins, top)}: {key}: {message}")
    return "invalid config:\n  " + "\n  ".join(lines)


def validate(model: type[T], raw: dict[str, Any], origins: dict[tuple, str], top: str) -> T:
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origins, top)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load, merge bases, apply overrides and validate an experiment config."""
    origins: dict[tuple, str] = {}
    raw = apply_overrides(load_raw(path, origins), list(overrides or []), origins)
    raw.setdefault("name", Path(path).stem)
    return validate(ExperimentConfig, raw, origins, str(Path(path).resolve()))


GRID_CONFIG_KEY = "train_config"  # a search dimension over whole training config files (architecture ablations)


def load_grid(path: str | Path, overrides: list[str] | None = None) -> tuple[GridConfig, ExperimentConfig]:
    """Load a Tune grid file and its base training config; every search-space key must exist in the schema.

    The search key `train_config` (a grid or choice of config files, relative to the grid file) swaps the
    whole training config per trial, for ablations that change the model section rather than one key; every
    file it names is loaded and validated here, with the grid's `overrides` and every other dimension.
    """
    origins: dict[tuple, str] = {}
    grid_path = Path(path).resolve()
    raw = apply_overrides(load_raw(grid_path, origins), list(overrides or []), origins)
    grid = validate(GridConfig, raw, origins, str(grid_path))
    base_path = grid_path.parent / grid.train_config
    fixed = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in grid.overrides.items()]
    config_files = [base_path]
    if (files := grid.search_space.get(GRID_CONFIG_KEY)) is not None:
        if files.grid is None and files.choice is None:
            raise ConfigError(f"{grid_path}: search_space.{GRID_CONFIG_KEY}: give a grid or choice of config files")
        config_files = [grid_path.parent / f for f in (files.grid or files.choice)]
    try:
        base = load_config(base_path, fixed)
        for other in config_files:
            load_config(other, fixed)
    except ConfigError as err:
        raise ConfigError(f"{grid_path}: {err}") from None
    for key, dim in grid.search_space.items():
        if key == GRID_CONFIG_KEY:
            continue
        # one probe value per dimension: proves the key exists and the value type fits
        probe = (dim.grid or dim.choice or [None])[0] if (dim.grid or dim.choice) else (dim.uniform or dim.loguniform)[0]
        for config_file in config_files:
            try:
                load_config(config_file, fixed + [f"{key}={yaml.safe_dump(probe, default_flow_style=True).strip()}"])
            except ConfigError as err:
                raise ConfigError(f"{grid_path}: search_space.{key}: does not fit {config_file}: {err}") from None
    return grid, base


def dump_config(config: BaseModel) -> str:
    """The fully resolved config as YAML, as saved beside every run."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
