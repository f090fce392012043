"""The driver side of a Ray Train run, shared by `facediff train` and `facediff train-segformer`.

    start_workers_ray(num_workers, resources_per_worker)
    train = resumable_dataset(functools.partial(build_dataset, path, "train", ...), storage)
    result = fit(loop, loop_config, request=..., storage=storage, datasets={"train": train, ...}, ...)

A run lives in one folder (`storage.RunStorage`: local, or s3://...). Re-running it (the same name and storage path)
resumes: Ray Train V2 restores the run's latest registered checkpoint, and the training split is rebuilt for that
checkpoint's data position (`resume_point`) each time Ray starts the workers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import posixpath
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from facediff.ray_start import start_ray
from facediff.storage import RunStorage
from facediff.train import checkpoint
from facediff.train.elastic import scaling_workers
from facediff.train.placement import WorkerRequest, check_cluster, failure_config, placement_timeout

log = logging.getLogger("facediff.train")

# Ray Train V2 keeps the run's registered checkpoints in this file of the run folder (ray.train.v2 constants)
RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"


def start_workers_ray(num_workers: int, resources_per_worker: dict[str, float], other_cpus: float = 0.0) -> None:
    """Join the running cluster, or start a local instance that leaves Ray Data a CPU beside the workers (and
    `other_cpus` for other tasks of the run: its evaluation task).

    With as many logical CPUs as cores, workers of one CPU each can take them all; Ray Data then never gets
    one and training waits forever without an error."""
    start_ray(num_workers * resources_per_worker.get("CPU", 1.0) + 1 + other_cpus)


@dataclass
class ResumePoint:
    """Where the data of a resumed run continues: the pass in progress and the records used in it."""

    checkpoint: str | None = None  # folder name of the checkpoint Ray Train resumes from
    epoch: int = 0  # first data epoch of the pass in progress
    consumed: set[tuple[int, int]] = field(default_factory=set)  # (epoch, id) consumed in the pass in progress


def resume_point(run: Path | RunStorage) -> ResumePoint:
    """The checkpoint Ray Train will hand to the workers (the latest registered one in its snapshot, never a
    folder whose upload did not finish) and the data position it holds. Only the checkpoint's small files are
    read (copied into the local mirror first when the run is in remote storage)."""
    storage = run if isinstance(run, RunStorage) else RunStorage(str(Path(run).parent), Path(run).name)
    if not storage.exists(RAY_CHECKPOINT_SNAPSHOT):
        return ResumePoint()
    latest = json.loads(storage.read_bytes(RAY_CHECKPOINT_SNAPSHOT)).get("latest_checkpoint_result") or {}
    name = latest.get("checkpoint_dir_name")
    if not name or not storage.exists(f"{name}/{checkpoint.STATE_FILE}"):
        return ResumePoint()
    for file in checkpoint.position_files(storage.listing(name)):
        storage.pull(f"{name}/{file}")
    folder = storage.local / name
    return ResumePoint(name, checkpoint.read_state(folder).epoch, checkpoint.consumed_records(folder))


def _resumed_split(build: Callable[..., Any], run: RunStorage):
    point = resume_point(run)
    if point.checkpoint:
        log.info("data resumes in the pass from epoch %d at %s, %d records of it already consumed",
                 point.epoch, point.checkpoint, len(point.consumed))
    return build(first_epoch=point.epoch, skip_ids=checkpoint.by_epoch(point.consumed))


def resumable_dataset(build: Callable[..., Any], run: RunStorage) -> Callable[[], Any]:
    """A dataset factory for Ray Train: `build(first_epoch=..., skip_ids=...)` (a partial of
    `stream.build_dataset`) for the checkpoint the workers are about to restore: passes (flips, file order)
    counted from its pass, the records already consumed in that pass left out. Ray Train calls it each time it
    starts the workers, in a new `fit()` and after a worker failure alike. It is called once here as well: the
    shards are checked in the driver, with a readable error, before anything is written."""
    factory = functools.partial(_resumed_split, build, run)
    factory()
    return factory


def fit(loop: Callable[[dict], None], loop_config: dict[str, Any], *, request: WorkerRequest, use_gpu: bool,
        resources_per_worker: dict[str, float], storage: RunStorage, datasets: dict, dataset_config,
        max_failures: int, keep: int, score: tuple[str, str] | None = None, callbacks: list | None = None,
        progress: Callable[[], Any] | None = None, min_workers: int | None = None, resize_interval_s: float = 60.0,
        validation=None):
    """Fit a TorchTrainer whose run is `storage` (Ray must be started): its checkpoints go there, keeping the
    `keep` newest (or, with `score` = (metric, "min"/"max"), the `keep` best by that metric besides the latest);
    a request no node can hold is refused before, a worker group that cannot be placed ends the run after the
    request's timeout (`request`: what `use_gpu` and `resources_per_worker` ask for, as `WorkerRequest.of`).
    `progress`: a context manager factory around `fit()` (the console's progress line). `min_workers`: an elastic
    run between it and `request.num_workers` workers, resized at most every `resize_interval_s` (`elastic.py`).
    `validation`: Ray's ValidationConfig, the checkpoint validation task of `eval.async_validation`
    (`runs/validation.py`)."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # a request no node can hold would wait forever; an elastic run needs room for its minimum only
    check_cluster(request if min_workers is None else dataclasses.replace(request, num_workers=min_workers))
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=scaling_workers(request.num_workers, min_workers), use_gpu=use_gpu,
                                     elastic_resize_monitor_interval_s=resize_interval_s,
                                     resources_per_worker=dict(resources_per_worker),
                                     placement_strategy=request.strategy),
        run_config=RunConfig(
            name=storage.name,  # the same name and storage path again: Ray Train V2 restores the run
            # remote: the filesystem travels with its endpoint and options (Ray then wants the path without scheme)
            storage_path=posixpath.dirname(storage.root) if storage.remote else str(storage.local.parent),
            storage_filesystem=storage.fs if storage.remote else None,
            checkpoint_config=CheckpointConfig(num_to_keep=keep,
                                               **({"checkpoint_score_attribute": score[0],
                                                   "checkpoint_score_order": score[1]} if score else {})),
            # elastic: a group that cannot be placed in time is retried, at the size the cluster holds then (right
            # after a node left, Ray Train may still count it and ask for a group the cluster cannot place)
            failure_config=failure_config(request if min_workers is None else
                                          dataclasses.replace(request, timeout_s=None), max_failures),
            callbacks=list(callbacks or []),
        ),
        datasets=datasets,
        dataset_config=dataset_config,
        validation_config=validation,
    )
    with placement_timeout(request), (progress() if progress else nullcontext()):
        return trainer.fit()
