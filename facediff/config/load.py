"""Load YAML configs with `base:` inheritance and `key=value` overrides; errors name the key and its file.

Layers, in order: a file's `base:` files (a name or a list, relative to the file, each loaded the same way and
laid over the one before), then the file itself, then command-line overrides, each laid over what came before.
Laying a layer over another:
- merge (the default): mappings are merged key by key; anything else (a scalar, a list) replaces the old value.
- replace a mapping whole: `!replace` on it in a file (`resources_per_worker: !replace {CPU: 2}`), or `:=` on the
  command line (`trainer.resources_per_worker:={CPU: 2}`); the keys it does not give are gone.
- drop a key: `!delete` as its value in a file (`GPU: !delete`), or `~key` on the command line
  (`~trainer.resources_per_worker.GPU`); the key then takes its schema default, or is simply absent from a
  mapping. Dropping a key that nothing before sets is an error (a misspelt key would otherwise pass silently).
`null` is not a deletion: it is a value some keys accept (e.g. `eval.every_kimg: null`).
Command-line overrides are dotted keys whose values are parsed as YAML (`trainer.num_workers=2`,
`model.block_out_channels=[32,64]`, and the tags above: `'model=!replace {family: dit}'`).
Each leaf remembers the file (or "command line") that set it, replaced and dropped subtrees included, so a
validation error can say where the bad key was written. docs/configuration-overrides.md shows them in use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from facediff.config.grid import GridConfig
from facediff.config.errors import dotted, format_errors, origin_of
from facediff.config.schema import ExperimentConfig

CLI = "command line"
REPLACE_TAG, DELETE_TAG = "!replace", "!delete"
T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A config that cannot be loaded; the message names the file and the key."""


class Replace(dict):
    """A mapping laid over the one under its key by replacing it, not merging into it (`!replace`, `key:=`)."""


class _Delete:
    """The value of a dropped key (`!delete`, `~key`)."""

    def __repr__(self) -> str:
        return DELETE_TAG

    def __reduce__(self) -> str:
        return "DELETE"  # one instance through pickling (Tune ships a grid's overrides to trials) and deepcopy


DELETE = _Delete()


class _MarkerError(yaml.constructor.ConstructorError):
    """A layering tag put where it means nothing."""


class _Loader(yaml.SafeLoader):
    """`yaml.safe_load` plus the layering tags."""


def _construct_replace(loader: _Loader, node: yaml.Node) -> Replace:
    if not isinstance(node, yaml.MappingNode):
        raise _MarkerError(None, None, f"{REPLACE_TAG} marks a mapping (lists and single values always replace)",
                           node.start_mark)
    return Replace(loader.construct_mapping(node, deep=True))


def _construct_delete(loader: _Loader, node: yaml.Node) -> _Delete:
    if not (isinstance(node, yaml.ScalarNode) and node.value == ""):
        raise _MarkerError(None, None, f"{DELETE_TAG} takes no value (write `key: {DELETE_TAG}`)", node.start_mark)
    return DELETE


_Loader.add_constructor(REPLACE_TAG, _construct_replace)
_Loader.add_constructor(DELETE_TAG, _construct_delete)
# Registered on PyYAML's SafeDumper itself: the grid's `overrides:` (which may hold these markers) are turned back
# into `key=value` texts with yaml.safe_dump, here and in facediff.tune.space; no other data holds these types.
yaml.SafeDumper.add_representer(Replace, lambda dumper, value: dumper.represent_mapping(REPLACE_TAG, dict(value)))
yaml.SafeDumper.add_representer(_Delete, lambda dumper, value: dumper.represent_scalar(DELETE_TAG, ""))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
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


def _forget(origins: dict[tuple, str], path: tuple) -> None:
    for stale in [p for p in origins if p[: len(path)] == path]:
        del origins[stale]


def _merge(into: dict, new: dict, source: str | dict[tuple, str], origins: dict[tuple, str],
           prefix: tuple = ()) -> None:
    """Lay `new` over `into`, in place. `source` is the file (or CLI) `new` comes from, or, for a loaded base
    chain, the origins of its keys (which come from several files).

    A `!delete` with nothing under its key is kept, so that a later layer of bases can still drop that key from
    an earlier one; `_settle` refuses any left when the layers are done."""
    for key, value in new.items():
        path = prefix + (key,)
        old = into.get(key, DELETE)
        if value is DELETE and old is not DELETE:
            del into[key]
            _forget(origins, path)
        elif isinstance(value, dict) and not isinstance(value, Replace) and isinstance(old, dict):
            _merge(old, value, source, origins, path)
        else:  # a new key or a replaced value: the whole subtree now comes from `source`
            into[key] = value
            _forget(origins, path)
            if isinstance(source, str):
                origins[path] = source
            else:
                if (where := origin_of(path, source, None)) is not None:
                    origins[path] = where
                origins.update({p: o for p, o in source.items() if p[: len(path)] == path})


def load_raw(path: str | Path, origins: dict[tuple, str] | None = None, _seen: tuple = ()) -> dict[str, Any]:
    """The merged mapping of a config file and its bases, before validation (may still hold `Replace` marks)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: `base` cycle through {[str(p) for p in _seen]}")
    origins = {} if origins is None else origins
    data = _read_yaml(path)
    bases = data.pop("base", [])
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        base_origins: dict[tuple, str] = {}
        _merge(merged, load_raw(path.parent / base, base_origins, _seen + (path,)), base_origins, origins)
    _merge(merged, data, str(path), origins)
    return merged


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """`key=value` (merge), `key:=value` (replace) or `~key` (drop) -> the key's parts and the value to lay."""
    stripped = text.strip()
    if stripped.startswith("~"):
        if "=" in stripped or not stripped[1:].strip():
            raise ConfigError(f"{CLI}: override {text!r}: `~key` drops a key and takes no value")
        return tuple(stripped[1:].strip().split(".")), DELETE
    key, sep, value = text.partition("=")
    replace = key.rstrip().endswith(":")
    key = key.strip().removesuffix(":").strip()
    if not sep or not key:
        raise ConfigError(f"{CLI}: override {text!r} is not of the form key=value, key:=value or ~key")
    try:
        parsed = yaml.load(value, Loader=_Loader) if value.strip() else ""
    except _MarkerError as err:
        raise ConfigError(f"{CLI}: override {text!r}: {err.problem}") from None
    except yaml.YAMLError:
        parsed = value
    if replace and isinstance(parsed, dict):
        parsed = Replace(parsed)
    return tuple(key.split(".")), parsed


def nested_override(section: str, text: str) -> str:
    """An override `text` applied to the keys under `section` (a grid's `overrides:`), in any of its forms."""
    stripped = text.strip()
    return f"~{section}.{stripped[1:].strip()}" if stripped.startswith("~") else f"{section}.{stripped}"


def flow_yaml(value: Any) -> str:
    """`value` as one line of YAML (`{model.block_out_channels: [32, 64]}`), markers included."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False)
    return text.strip().removesuffix("...").strip()


def override_text(key: str, value: Any) -> str:
    """`key=value` that `parse_override` reads back as `value` (markers included)."""
    return f"{key}={flow_yaml(value)}"


def apply_overrides(raw: dict[str, Any], overrides: list[str], origins: dict[tuple, str],
                    source: str = CLI) -> dict[str, Any]:
    """Lay `key=value` texts over `raw`; `source` is what errors name as having set them (a Tune grid point's
    values come from its grid file, not the command line)."""
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _merge(raw, nested, source, origins)
    return raw


def _settle(value: Any, origins: dict[tuple, str], top: str, keep: tuple[tuple, ...], path: tuple = ()) -> Any:
    """The merged layers as plain data: `Replace` marks dropped; a `!delete` left means nothing before set its
    key. Mappings at `keep` paths (a grid's overrides, laid over training configs later) keep their marks."""
    if value is DELETE:
        raise ConfigError(f"{origin_of(path, origins, top)}: {dotted(path)}: dropped ({DELETE_TAG} / "
                          f"~{dotted(path)}), but no base file or earlier override sets it; check the key's "
                          "spelling, or remove the deletion")
    if isinstance(value, dict):
        return value if path in keep else {k: _settle(v, origins, top, keep, path + (k,)) for k, v in value.items()}
    if isinstance(value, list):
        return [_settle(v, origins, top, keep, path + (i,)) for i, v in enumerate(value)]
    return value


def validate(model: type[T], raw: dict[str, Any], origins: dict[tuple, str], top: str,
             keep: tuple[tuple, ...] = ()) -> T:
    plain = _settle(raw, origins, top, keep)
    try:
        return model.model_validate(plain)
    except ValidationError as err:
        raise ConfigError(format_errors(err, origins, top, plain)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load, merge bases, apply overrides and validate an experiment config."""
    origins: dict[tuple, str] = {}
    raw = apply_overrides(load_raw(path, origins), list(overrides or []), origins)
    raw.setdefault("name", Path(path).stem)
    return validate(ExperimentConfig, raw, origins, str(Path(path).resolve()))


GRID_CONFIG_KEY = "train_config"  # a search dimension over whole training config files (architecture ablations)
GRID_POINT = "search_space"  # where errors say a Tune trial's sampled values come from


def _sourced_overrides(overrides: dict[str, Any], origins: dict[tuple, str], grid_file: str) -> list[tuple[str, str]]:
    """A grid's `overrides` as `key=value` texts, each with where it was set: the grid file, or the command line
    (`overrides.trainer.lr=...` arrives nested, under key `trainer`). A mapping set in parts by both is split
    down to its keys; merging them one by one lays the same values."""
    sourced = []

    def walk(key: str, value: Any, path: tuple) -> None:
        if isinstance(value, dict) and not isinstance(value, Replace) and value and path not in origins:
            for sub, inner in value.items():
                walk(f"{key}.{sub}", inner, path + (sub,))
        else:
            sourced.append((override_text(key, value), origin_of(path, origins, grid_file)))

    for key, value in overrides.items():
        walk(key, value, ("overrides", key))
    return sourced


def load_grid(path: str | Path, overrides: list[str] | None = None) -> tuple[GridConfig, ExperimentConfig]:
    """Load a Tune grid file and its base training config.

    The search key `train_config` (a grid or choice of config files, relative to the grid file) swaps the
    whole training config per trial, for ablations that change the model section rather than one key; every
    file it names is loaded and validated here, with the grid's `overrides`. Then every point of the search
    space (`GridConfig.points`) is laid over its training config and validated like a trial's config, so a
    value no trial could train with stops the command before Ray starts, naming the grid file and the point.
    The grid's `overrides` keep their `!replace` / `!delete` marks: they are laid over each training config.
    """
    origins: dict[tuple, str] = {}
    grid_path = Path(path).resolve()
    raw = apply_overrides(load_raw(grid_path, origins), list(overrides or []), origins)
    grid = validate(GridConfig, raw, origins, str(grid_path), keep=(("overrides",),))
    if (files := grid.search_space.get(GRID_CONFIG_KEY)) is not None and files.grid is None and files.choice is None:
        raise ConfigError(f"{grid_path}: search_space.{GRID_CONFIG_KEY}: give a grid or choice of config files")
    # each of the grid's overrides is blamed on where it was set: the grid file, or the command line
    fixed = _sourced_overrides(grid.overrides, origins, str(grid_path))

    def trial(name: str, point: dict[str, Any]) -> ExperimentConfig:
        """A trial's training config, as `facediff.tune.space.Experiment.trial_config` builds it in Ray."""
        path, trial_origins = grid_path.parent / name, {}
        raw = load_raw(path, trial_origins)
        for text, source in fixed:
            apply_overrides(raw, [text], trial_origins, source)
        apply_overrides(raw, [override_text(k, v) for k, v in point.items() if k != GRID_CONFIG_KEY],
                        trial_origins, GRID_POINT)
        raw.setdefault("name", path.stem)
        return validate(ExperimentConfig, raw, trial_origins, str(path.resolve()))

    try:
        base = trial(grid.train_config, {})
    except ConfigError as err:
        raise ConfigError(f"{grid_path}: {err}") from None
    points = grid.points()
    for number, point in enumerate(points, 1):  # every trial's config, before any trial starts
        try:
            trial(point.get(GRID_CONFIG_KEY, grid.train_config), point)
        except ConfigError as err:
            raise ConfigError(f"{grid_path}: grid point {number} of {len(points)} {flow_yaml(point)}: {err}") from None
    return grid, base


def dump_config(config: BaseModel) -> str:
    """The fully resolved config as YAML, as saved beside every run."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
