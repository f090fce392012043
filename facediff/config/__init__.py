"""Typed, validated configuration: `load_config(path, ["key=value", ...])`."""

from facediff.config.load import ConfigError, dump_config, load_config, load_grid
from facediff.config.paths import resolve_paths
from facediff.config.grid import GridConfig
from facediff.config.schema import ExperimentConfig

__all__ = ["ConfigError", "ExperimentConfig", "GridConfig", "dump_config", "load_config", "load_grid",
           "resolve_paths"]
