"""The `tracking:` section: where a run's params, metrics and images go besides `metrics.jsonl` and TensorBoard."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from facediff.config.types import ConflictingKeys, Strict

# the keys only one backend reads: set under the other, they would be silently ignored
MLFLOW_KEYS = ("tracking_uri", "experiment")
WANDB_KEYS = ("project", "entity", "mode")


class TrackingConfig(Strict):
    """`backend: none` (the default) imports neither MLflow nor W&B and costs nothing. With a backend, rank 0
    logs every row it writes to `metrics.jsonl` to one tracker run per Train run (a Tune trial's nested under
    its experiment's run), the resolved config as its params, and at the end the exported model."""

    backend: Literal["none", "mlflow", "wandb"] = "none"  # none: no tracker, neither library imported
    tracking_uri: str | None = None  # MLflow (required): the server (http://host:port) or a store (sqlite:///...)
    experiment: str | None = None  # MLflow experiment; default: the config's `name` (a Tune grid's: its name)
    project: str | None = None  # W&B project (required)
    entity: str | None = None  # W&B entity; default: the account's
    mode: Literal["online", "offline", "disabled"] | None = None  # W&B mode; default: WANDB_MODE, else online
    tags: dict[str, str] = {}  # on every run (MLflow tags; W&B tags as key:value)
    log_export: bool = True  # the exported model (RUN/export) as run artifacts at the end

    @model_validator(mode="after")
    def _backend_keys(self) -> TrackingConfig:
        if self.backend == "mlflow" and not self.tracking_uri:
            raise ConflictingKeys("tracking.tracking_uri: tracking.backend mlflow needs the tracking server or "
                                  "store (e.g. http://127.0.0.1:5000 or sqlite:///mlflow.db)",
                                  [("tracking_uri",), ("backend",)])
        if self.backend == "wandb" and not self.project:
            raise ConflictingKeys("tracking.project: tracking.backend wandb needs the W&B project",
                                  [("project",), ("backend",)])
        others = {"mlflow": WANDB_KEYS, "wandb": MLFLOW_KEYS, "none": MLFLOW_KEYS + WANDB_KEYS}[self.backend]
        if stray := [k for k in others if getattr(self, k) is not None]:
            raise ConflictingKeys(f"tracking.{stray[0]}: not read by tracking.backend {self.backend}; remove it "
                                  "or set the backend that reads it",
                                  [(stray[0],), ("backend",)])
        return self
