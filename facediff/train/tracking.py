"""Experiment tracking (`tracking:` config section, docs/tracking.md): MLflow or Weights & Biases beside
`metrics.jsonl` and TensorBoard. With `backend: none` nothing here imports either library.

One tracker run per Train run. The driver opens it before `fit` and records its id in the run folder
(`tracking.json`), so every worker start, a re-run that resumes, and the export at the end log to the same run;
rank 0's `RunLog` sends it every row it writes (`attach`). A Tune trial's run is nested under one run of its
experiment (`start_parent`).

Why not Ray's `setup_mlflow` / `MLflowLoggerCallback`: the first starts a new MLflow run at every worker start
(a Train V2 restart or a resumed run would split one Train run into several) and has no parent run; the
second logs what reaches Tune, which here is the evaluations only, not the per-step rows. W&B resumes a run by
id, so rank 0 uses Ray's `setup_wandb` with the recorded id.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from facediff.config.schema import ExperimentConfig
    from facediff.config.tracking import TrackingConfig
    from facediff.storage import RunStorage

log = logging.getLogger("facediff.train")

RECORD = "tracking.json"  # in a run (or Tune experiment) folder: the tracker run it logs to
PARAM_LIMIT = 6000  # characters of an MLflow param value (longer values are cut, marked)
MLFLOW_BATCH = 100  # MLflow takes at most 100 params per log_batch


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The resolved config as dotted keys (`model.family`), lists and empty sections as JSON text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return flat


def _recorded(storage: RunStorage, tracking: TrackingConfig) -> dict | None:
    """The tracker run recorded in the folder, if it is the same backend (and MLflow store) as now."""
    if not storage.pull(RECORD):
        return None
    record = json.loads((storage.local / RECORD).read_text())
    same = record.get("backend") == tracking.backend and record.get("tracking_uri") == tracking.tracking_uri
    return record if same else None


def _record(storage: RunStorage, handle: dict) -> dict:
    (storage.local / RECORD).parent.mkdir(parents=True, exist_ok=True)
    (storage.local / RECORD).write_text(json.dumps(handle, indent=1) + "\n")
    storage.push(RECORD)
    return handle


def _mlflow_client(tracking: TrackingConfig):
    from mlflow.tracking import MlflowClient  # here: only a run that tracks to MLflow pays its import

    return MlflowClient(tracking_uri=tracking.tracking_uri)


def check_server(uri: str, timeout_s: float = 10.0) -> None:
    """An MLflow server that does not answer: one line now (ValueError naming the key), not MLflow's minutes of
    retries and a traceback. Stores (sqlite:, file:, a path) are not probed."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except (OSError, urllib.error.URLError) as err:
        raise ValueError(f"tracking.tracking_uri: no MLflow server answers at {uri} ({err}); start it "
                         "(mlflow server ...) or fix the key") from None


def _mlflow_run(tracking: TrackingConfig, experiment: str, name: str, params: dict[str, Any],
                parent: dict | None) -> dict:
    from mlflow.entities import Param

    client = _mlflow_client(tracking)
    if parent is not None:
        experiment_id = parent["experiment_id"]
    elif (found := client.get_experiment_by_name(experiment)) is not None:
        experiment_id = found.experiment_id
    else:
        experiment_id = client.create_experiment(experiment)
    tags = dict(tracking.tags)
    if parent is not None:  # what MLflow's UI nests a run under
        tags["mlflow.parentRunId"] = parent["run_id"]
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    values = [Param(k, _param_text(v)) for k, v in params.items()]
    for start in range(0, len(values), MLFLOW_BATCH):
        client.log_batch(run_id, params=values[start:start + MLFLOW_BATCH])
    return {"backend": "mlflow", "tracking_uri": tracking.tracking_uri, "experiment_id": experiment_id,
            "run_id": run_id, "name": name}


def _param_text(value: Any) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= PARAM_LIMIT else text[:PARAM_LIMIT - 3] + "..."


def start_run(cfg: ExperimentConfig, storage: RunStorage, name: str, parent: dict | None = None) -> dict | None:
    """Driver, before `fit`: the tracker run of this Train run, created with the resolved config as its params,
    or the one the run folder records (a re-run resumes it). Returns plain data for rank 0 (`attach`); None when
    tracking is off. `parent`: a Tune experiment's run (`start_parent`)."""
    tracking = cfg.tracking
    if tracking.backend == "none":
        return None
    name = parent.get("trial", name) if parent else name  # a Tune trial's run: named by its trial id
    if (recorded := _recorded(storage, tracking)) is not None:
        log.info("tracking: continuing %s run %s", tracking.backend, recorded["run_id"])
        return recorded
    params = flatten(cfg.model_dump(mode="json"))
    if tracking.backend == "mlflow":
        check_server(tracking.tracking_uri)
        handle = _mlflow_run(tracking, tracking.experiment or cfg.name, name, params, parent)
    else:
        handle = {"backend": "wandb", "tracking_uri": None, "run_id": uuid.uuid4().hex[:12], "name": name,
                  "group": parent["name"] if parent else None}
    log.info("tracking: %s run %s (%s)", tracking.backend, handle["run_id"], name)
    return _record(storage, handle)


def start_parent(cfg: ExperimentConfig, storage: RunStorage, name: str, grid: dict[str, Any]) -> dict | None:
    """A Tune experiment's own run, the parent of its trials' runs (MLflow: nested runs; W&B: the trials'
    group); recorded in the experiment folder, so a restored experiment keeps it."""
    tracking = cfg.tracking
    if tracking.backend == "none":
        return None
    if (recorded := _recorded(storage, tracking)) is not None:
        return recorded
    if tracking.backend == "mlflow":
        check_server(tracking.tracking_uri)
    if tracking.backend == "wandb":  # W&B has no parent runs: the trials share a group
        return _record(storage, {"backend": "wandb", "tracking_uri": None, "run_id": None, "name": name})
    return _record(storage, _mlflow_run(tracking, tracking.experiment or name, name, flatten(grid), None))


class MLflowTracker:
    """Rank 0's end of an MLflow run: rows as metrics at their step, images as artifacts."""

    def __init__(self, handle: dict):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri=handle["tracking_uri"]), handle["run_id"]

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, v, now, step) for k, v in metrics.items() if math.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=rows)

    def log_image(self, tag: str, png: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(png), artifact_path=tag)

    def close(self) -> None:
        pass  # the driver ends the run once the model is exported


class WandbTracker:
    """Rank 0's end of a W&B run, opened by Ray's `setup_wandb` with the id the driver recorded."""

    def __init__(self, handle: dict, tracking: TrackingConfig, config: dict[str, Any], folder: Path):
        from ray.air.integrations.wandb import setup_wandb

        extra = {k: v for k, v in (("entity", tracking.entity), ("mode", tracking.mode)) if v is not None}
        self.run = setup_wandb(flatten(config), project=tracking.project, id=handle["run_id"],
                               name=handle["name"], group=handle.get("group"), resume="allow",
                               tags=sorted(f"{k}:{v}" for k, v in tracking.tags.items()) or None,
                               dir=str(folder), **extra)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_image(self, tag: str, png: Path, step: int) -> None:
        import wandb

        self.run.log({tag: wandb.Image(str(png))}, step=step)

    def close(self) -> None:
        self.run.finish()


def attach(config: dict[str, Any], handle: dict | None, folder: Path) -> MLflowTracker | WandbTracker | None:
    """Rank 0, in the worker: the tracker `RunLog` logs to (`config`: the resolved config as JSON data)."""
    if handle is None:
        return None
    if handle["backend"] == "mlflow":
        return MLflowTracker(handle)
    from facediff.config.tracking import TrackingConfig

    return WandbTracker(handle, TrackingConfig.model_validate(config["tracking"]), config, folder)


def finish_run(cfg: ExperimentConfig, handle: dict | None, artifacts: list[Path], status: str = "FINISHED") -> None:
    """Driver, at the end: `artifacts` (a folder goes under its own name, e.g. `export/`; files at the top)
    logged to the run, then the run ended. A run that failed stays open: re-running it resumes it."""
    if handle is None or handle.get("run_id") is None:
        return
    kept = [p for p in artifacts if p.exists()]
    if handle["backend"] == "mlflow":
        client = _mlflow_client(cfg.tracking)
        for path in kept:
            if path.is_dir():
                client.log_artifacts(handle["run_id"], str(path), artifact_path=path.name)
            else:
                client.log_artifact(handle["run_id"], str(path))
        client.set_terminated(handle["run_id"], status=status)
        return
    if kept:
        import wandb

        t = cfg.tracking
        extra = {k: v for k, v in (("entity", t.entity), ("mode", t.mode)) if v is not None}
        # its own folder: W&B names a run's files by the second it starts, and rank 0's may have closed in this one
        folder = kept[0].parent / "wandb" / "driver"
        folder.mkdir(parents=True, exist_ok=True)
        with wandb.init(project=t.project, id=handle["run_id"], resume="allow", dir=str(folder),
                        settings=wandb.Settings(silent=True), **extra) as run:  # the driver's console: facediff's
            artifact = wandb.Artifact(f"{handle['name']}-files", type="model")
            for path in kept:
                (artifact.add_dir(str(path), name=path.name) if path.is_dir() else artifact.add_file(str(path)))
            run.log_artifact(artifact)
        wandb.teardown()  # waits for W&B's service to write the run out: finish alone returns before it has
