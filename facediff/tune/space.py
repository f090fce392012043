"""A grid file as an experiment: command-line overrides, the metric ASHA reads, the Tune param space, and the
training config of one trial.

Decisions made here, once, before any trial starts:
- The metric. `metric: fid` resolves to what the trainer will actually report: `fid` where the Inception
  weights can be had, else the labelled fallback `fd_<features>` (never relabelled as fid). The resolution is
  logged and used for ASHA, the results table and the plot. Any other metric name is used as written.
- Reporting. ASHA must see the metric at every result it reads, and the trainer reports an image distance only
  on evaluation rows. So a trial forwards to Tune only the trainer's rows that hold the metric
  (`trial.MetricReportCallback`), and an image-distance metric requires `eval.every_kimg` in every trial. With
  `eval.async_validation` those rows come from Ray Train's validation tasks, each tagged with the kimg of the
  checkpoint it measured (`MetricReportCallback.after_validation`).
- Paths. Every training config a trial can use is loaded, checked and path-resolved here (against the
  directory the command runs in), and shipped to the trials as data: a trial runs in Ray's packaged copy of
  the working directory, where relative paths and git-ignored folders do not exist.
- Length. Every trial trains `scheduler.max_kimg` (default: the base config's `trainer.total_kimg`); ASHA's
  `max_t` is that, its time attribute is `kimg`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from facediff.config import ConfigError, ExperimentConfig, GridConfig, load_config, load_grid, resolve_paths
from facediff.config.load import (GRID_CONFIG_KEY, GRID_POINT, apply_overrides, flow_yaml, nested_override,
                                  parse_override, validate)
from facediff.config.schema import EvalConfig
from facediff.data.shards import check_train_records
from facediff.storage import RunStorage

log = logging.getLogger("facediff.tune")
RUN_DIR = "train"  # a trial's Ray Train run folder inside its Tune trial folder


def is_image_metric(name: str) -> bool:
    return name == "fid" or name.startswith("fd_")


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """`key=value` overrides of the grid file (its own fields) and of every trial's training config (the rest).

    `facediff tune demo.yaml num_samples=2 data.path=/x`: `num_samples` is a grid field, `data.path` a training
    key applied to every trial (as if written under the grid's `overrides:`).
    """
    grid_keys, train = [], []
    for text in overrides:
        keys, _ = parse_override(text)
        (grid_keys if keys[0] in GridConfig.model_fields else train).append(text)
    return grid_keys, [nested_override("overrides", text) for text in train]


def resolve_metric(requested: str, eval_cfg: EvalConfig) -> str:
    """The name the trainer will report for `requested`; `fid` becomes `fd_<fallback>` without Inception weights."""
    if requested != "fid" or eval_cfg.fallback_features == "none":
        return requested  # with fallback 'none' a trial without the weights fails loudly instead
    # lazily: torchmetrics only when fid's fallback must be checked
    from facediff.eval.metrics import load_inception

    if load_inception(eval_cfg.inception_weights, eval_cfg.fallback_features) is not None:
        return "fid"
    return f"fd_{eval_cfg.fallback_features}"


@dataclass
class Experiment:
    """Everything a trial needs, resolved on the driver (plain data: Tune ships it to every trial)."""

    grid: GridConfig
    grid_path: Path
    base: ExperimentConfig
    metric: str
    total_kimg: float
    storage: RunStorage  # the experiment folder (local, or s3://...: Tune's state, one folder per trial, results)
    fixed: list[str] = field(default_factory=list)  # training overrides every trial gets
    # each training config file a trial may use (as the grid names it): resolved, with `fixed` applied
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        """The experiment's local folder: the experiment itself, or its local mirror when storage is remote."""
        return self.storage.local

    @property
    def name(self) -> str:
        return self.storage.name

    def trial_storage_path(self, trial_id: str) -> str:
        """Where a trial's Train run lives (`<trial_id>/train`): in the experiment's own storage."""
        return f"{self.storage.uri}/{trial_id}"

    def trial_run(self, trial_id: str) -> RunStorage:
        """A trial's Train run folder, through the experiment's filesystem (resolved once, on the driver)."""
        return RunStorage(self.trial_storage_path(trial_id), RUN_DIR,
                          filesystem=self.storage.fs if self.storage.remote else None)

    def config_names(self) -> list[str]:
        files = self.grid.search_space.get(GRID_CONFIG_KEY)
        return list((files.grid or files.choice) if files else [self.grid.train_config])

    def config_files(self) -> list[Path]:
        return [self.grid_path.parent / f for f in self.config_names()]

    def check_data(self) -> None:
        """Every trial would fail on a missing dataset: say so once, before Ray starts."""
        for name, cfg in self.configs.items():
            data = cfg["data"]
            try:
                check_train_records(data["path"], data["train_split"], data.get("train_records"))
            except (FileNotFoundError, ValueError) as err:
                raise ConfigError(f"{self.grid_path}: data.path (of {name}): {err}") from None

    def trial_config(self, params: dict[str, Any], trial_id: str) -> ExperimentConfig:
        """A trial's training config: its config file (resolved on the driver), the grid's overrides, its
        sampled values, its folder. Reads no file: it runs inside Ray. (`load_grid` has validated every point
        of the search space the same way, so a failure here is a sampled value between a range's ends.)"""
        name = params.get(GRID_CONFIG_KEY, self.grid.train_config)
        sampled = [f"{k}={flow_yaml(v)}" for k, v in params.items() if k != GRID_CONFIG_KEY]
        placed = [f"trainer.storage_path={self.trial_storage_path(trial_id)}", f"trainer.run_name={RUN_DIR}",
                  f"trainer.total_kimg={self.total_kimg}"]
        origins: dict[tuple, str] = {}
        raw = apply_overrides(copy.deepcopy(self.configs[name]), sampled, origins, GRID_POINT)
        raw = apply_overrides(raw, placed, origins, "facediff tune")
        return validate(ExperimentConfig, raw, origins, f"{self.grid_path} ({name})")


def load_experiment(grid_path: str | Path, overrides: list[str] | None = None) -> Experiment:
    """Load and check a grid file (and every training config it names); resolve the metric."""
    grid_overrides, train_overrides = split_overrides(list(overrides or []))
    grid, base = load_grid(grid_path, grid_overrides + train_overrides)
    grid_path = Path(grid_path).resolve()
    fixed = [f"{k}={flow_yaml(v)}" for k, v in grid.overrides.items()]
    total_kimg = grid.scheduler.max_kimg or base.trainer.total_kimg
    try:
        storage = RunStorage(grid.storage_path, grid.name or grid_path.stem)
    except ValueError as err:
        raise ConfigError(f"{grid_path}: storage_path: {err}") from None
    exp = Experiment(grid=grid, grid_path=grid_path, base=base, metric=grid.metric, total_kimg=total_kimg,
                     storage=storage, fixed=fixed)
    if grid.scheduler.kind == "asha" and grid.scheduler.grace_period_kimg > total_kimg:
        raise ConfigError(f"{grid_path}: scheduler.grace_period_kimg ({grid.scheduler.grace_period_kimg}) exceeds "
                          f"the trials' length ({total_kimg} kimg)")
    exp.configs = {name: resolve_paths(load_config(path, fixed)).model_dump(mode="json")
                   for name, path in zip(exp.config_names(), exp.config_files())}
    exp.metric = resolve_metric(grid.metric, base.eval)
    if exp.metric != grid.metric:
        log.warning("metric: %r requested, but the Inception weights are not available: trials report %r "
                    "(not comparable with published FIDs); ASHA, the table and the plot use %r",
                    grid.metric, exp.metric, exp.metric)
    if is_image_metric(exp.metric):
        for path in exp.config_files():  # ASHA needs the metric on the rows it reads: evaluation must run
            cfg = load_config(path, fixed)
            if cfg.eval.every_kimg is None:
                raise ConfigError(f"{grid_path}: eval.every_kimg: must be set for metric {exp.metric!r} "
                                  f"({path.name} leaves it unset); add it under overrides:")
    return exp


def param_space(grid: GridConfig) -> dict[str, Any]:
    """The grid's search space as a flat Tune param space keyed by the dotted config keys."""
    from ray import tune

    space = {}
    for key, dim in grid.search_space.items():
        if dim.grid is not None:
            space[key] = tune.grid_search(dim.grid)
        elif dim.choice is not None:
            space[key] = tune.choice(dim.choice)
        elif dim.uniform is not None:
            space[key] = tune.uniform(*dim.uniform)
        else:
            space[key] = tune.loguniform(*dim.loguniform)
    return space
