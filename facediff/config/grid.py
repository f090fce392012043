"""The schema of a Ray Tune grid file (`facediff tune GRID.yaml`): the training config every trial starts from,
the search space over its dotted keys (checked against `ExperimentConfig` by `load_grid`), the metric and the
ASHA scheduler."""

from __future__ import annotations

import itertools
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from facediff.config.types import PositiveFloat, PositiveInt, Strict


class SearchDimension(Strict):
    """Exactly one of: a grid (every value, crossed with the other grids), a random choice, or a range."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[PositiveFloat, PositiveFloat] | None = None

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform (got {given or 'none'})")
        return self

    def values(self) -> list[Any]:
        """The values to check: a grid's or choice's, a range's two ends."""
        for listed in (self.grid, self.choice, self.uniform, self.loguniform):
            if listed is not None:
                return list(listed)
        return []


class SchedulerConfig(Strict):
    kind: Literal["asha", "fifo"] = "asha"
    grace_period_kimg: PositiveFloat = 1.0
    reduction_factor: Annotated[float, Field(gt=1)] = 2.0
    max_kimg: PositiveFloat | None = None  # None = the base config's trainer.total_kimg


class PaperRow(Strict):
    """A row of the paper's table that one grid point reproduces, with the number the paper printed."""

    row: str  # the row as the paper labels it
    point: dict[str, Any]  # its values of the grid's search dimensions (every `grid` dimension)
    fid: PositiveFloat


class GridConfig(Strict):
    train_config: str  # the training config every trial starts from, relative to the grid file
    name: str | None = None  # the experiment folder's name under storage_path; None = the grid file's stem
    reproduces: str = ""  # which table of which paper this grid reproduces
    overrides: dict[str, Any] = {}  # dotted keys applied to every trial
    search_space: dict[str, SearchDimension]
    num_samples: PositiveInt = 1
    metric: str = "fid"
    mode: Literal["min", "max"] = "min"
    scheduler: SchedulerConfig = SchedulerConfig()
    resources_per_trial: dict[str, PositiveFloat] = {"CPU": 1.0}
    max_concurrent_trials: PositiveInt | None = None
    storage_path: str = "runs/tune"
    # The paper's rows this grid reproduces: the results table prints each one's FID beside the trial's metric.
    paper_rows: list[PaperRow] = []

    @model_validator(mode="after")
    def _rows_are_grid_points(self):
        grids = {key: dim.grid for key, dim in self.search_space.items() if dim.grid is not None}
        seen = []
        for row in self.paper_rows:
            if set(row.point) != set(grids):
                raise ValueError(f"paper_rows: {row.row!r}: point must give exactly the grid dimensions "
                                 f"{sorted(grids)}, got {sorted(row.point)}")
            off = [k for k, v in row.point.items() if v not in grids[k]]
            if off:
                raise ValueError(f"paper_rows: {row.row!r}: {off[0]}={row.point[off[0]]!r} is not in its grid "
                                 f"{grids[off[0]]}")
            if row.point in seen:
                raise ValueError(f"paper_rows: {row.row!r}: another row has the same point {row.point}")
            seen.append(row.point)
        return self

    def points(self) -> list[dict[str, Any]]:
        """Every combination of values a trial can get, for checking them all before any trial starts: every
        value of a grid or choice, both ends of a range (Tune samples between them), crossed."""
        keys = list(self.search_space)
        values = [self.search_space[k].values() for k in keys]
        return [dict(zip(keys, combination)) for combination in itertools.product(*values)]

    def paper_row(self, values: dict[str, Any]) -> PaperRow | None:
        """The paper row of the trial with these search-space values, if it reproduces one."""
        for row in self.paper_rows:
            if all(values.get(k) == v for k, v in row.point.items()):
                return row
        return None
