"""`facediff train`: build the Ray datasets and a TorchTrainer, fit (resuming if the run exists), export.

Re-running the same config (same `trainer.run_name` and `trainer.storage_path`) resumes from the run's latest
checkpoint: Ray Train V2 restores by run name and storage path, and the loop continues its step count,
schedule, EMA and data position from there. The run folder's recorded config decides whether a re-run may resume
(`identity.py`); it is written by the workers once they restored the run, not here.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict
from pathlib import Path

import ray
from ray.train import DataConfig

from facediff.config import resolve_paths
from facediff.config.schema import ExperimentConfig
from facediff.console import RunProgressLine
from facediff.data.prepare.latents import check_cached_inputs
from facediff.data.stream import passes
from facediff.data.stream.bad_records import check_parquet_files, describe, start_tally
from facediff.data.shards import check_train_records, shard_paths, split_rows
from facediff.data.stream.dataset import build_dataset
from facediff.eval.build import build_attribute_metric
from facediff.eval.metrics import load_inception
from facediff.runs.checkpoints import EXPORT_DIR, load_task_with_ema
from facediff.runs.validation import append_late_results, validation_config
from facediff.storage import RunStorage
from facediff.train import identity, tracking
from facediff.train.driver import fit, resumable_dataset, start_workers_ray
from facediff.train.loop import train_loop_per_worker
from facediff.train.placement import WorkerRequest, check_cluster
from facediff.train.run_log import METRICS_FILE, planned_kimg, rounding_note

log = logging.getLogger("facediff.train")


def run_name(cfg: ExperimentConfig) -> str:
    return cfg.trainer.run_name or cfg.name


def run_storage(cfg: ExperimentConfig) -> RunStorage:
    """The run's folder in `trainer.storage_path` (a local folder, or s3://bucket/prefix: see `storage.py`)."""
    return RunStorage(cfg.trainer.storage_path, run_name(cfg))


def _dataset_options(cfg: ExperimentConfig) -> dict:
    d = cfg.data
    return dict(image_size=d.image_size, read_parallelism=d.read_parallelism,
                blocks_per_cpu=not d.deterministic_order, use_latents=d.use_latents)


def epochs_per_pass(cfg: ExperimentConfig) -> int:
    """Data epochs in one streaming execution of the training split (`data.epochs_per_pass`, or by its size)."""
    return passes.epochs_per_pass(cfg.data.epochs_per_pass, split_rows(Path(cfg.data.path), cfg.data.train_split))


def data_config(cfg: ExperimentConfig) -> DataConfig:
    """How Ray Train deals the training split to the workers (every worker evaluates on the whole test split).

    Ray Data's streaming split gives each block to the worker with the fewest rows so far, in the order blocks
    arrive, preferring blocks already on the worker's node. With `data.deterministic_order` the order is the
    Dataset's own and node locality is off, so the rows each rank is dealt depend on neither timing nor
    placement."""
    if not cfg.data.deterministic_order:
        return DataConfig(datasets_to_split=["train"])
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(datasets_to_split=["train"], execution_options={"train": options}, enable_shard_locality=False)


def check_inputs(cfg: ExperimentConfig) -> None:
    """The dataset a run reads, checked before any output or Ray process exists (ValueError/FileNotFoundError
    naming the file and key): its splits' shards, the data regime (`data.train_records`), the cached latents; the
    MLflow server `tracking:` names."""
    d = cfg.data
    check_parquet_files(shard_paths(d.path, d.train_split))  # a truncated shard: named now, not mid-run by Ray
    if cfg.eval.every_kimg is not None:
        check_parquet_files(shard_paths(d.path, d.eval_split))
    check_train_records(d.path, d.train_split, d.train_records)
    if d.use_latents:
        check_cached_inputs(d.path, cfg.model)
    if cfg.tracking.backend == "mlflow":  # a server that does not answer: one line, not minutes of retries
        tracking.check_server(cfg.tracking.tracking_uri)


def build_datasets(cfg: ExperimentConfig, run: RunStorage, bad_records=None) -> dict:
    """The training split as the run continues from its latest checkpoint (`driver.resumable_dataset`: checked
    now, in the driver), and the test split when the run evaluates. `bad_records`: the run's tally of records
    that do not decode (`data.max_bad_records`)."""
    d = cfg.data
    split = functools.partial(build_dataset, d.path, d.train_split, hflip=d.hflip, shuffle=d.shuffle,
                              seed=cfg.trainer.seed, epoch=None, epochs_per_pass=epochs_per_pass(cfg),
                              bad_records=bad_records, **_dataset_options(cfg))
    datasets = {"train": resumable_dataset(split, run)}
    if cfg.eval.every_kimg is not None and not cfg.eval.async_validation:  # the validation task reads its own
        datasets["test"] = build_dataset(d.path, d.eval_split, hflip=False, shuffle=False, bad_records=bad_records,
                                         **_dataset_options(cfg))
    return datasets


def init_ray(cfg: ExperimentConfig) -> None:
    """Ray for the run's workers, and for its evaluation task beside them (`eval.async_validation`): a task no
    node can hold would never run, and the run would wait for it forever at its end."""
    task = dict(cfg.eval.async_resources) if cfg.eval.async_validation and cfg.eval.every_kimg is not None else {}
    start_workers_ray(cfg.trainer.num_workers, cfg.trainer.resources_per_worker, task.get("CPU", 0.0))
    if task:
        check_cluster(WorkerRequest(1, task, "PACK", "eval", field="async_resources"))


def train(cfg: ExperimentConfig, fault: dict | None = None, callbacks: list | None = None,
          trace_dir: str | Path | None = None, progress: bool = True, storage: RunStorage | None = None,
          resume_with_changes: bool = False, score: tuple[str, str] | None = None,
          tracking_parent: dict | None = None, forward_evaluation=None) -> Path:
    """Fit (or resume) the run and export its EMA model; returns the run folder.

    `callbacks`: Ray Train callbacks for the trainer's RunConfig (a Tune trial passes one that forwards the
    trainer's reports to Tune). `fault` (tests) makes a worker crash once at a step; `trace_dir` makes every
    rank log the ids, epochs and flips it trained on (`loop.DataTrace`). `progress`: a progress line on the
    console (a Tune trial has none: Tune reports its trials). `storage`: the run's folder as the caller resolved
    it (a Tune trial's, through its experiment's filesystem); default `trainer.storage_path`/run name.
    `resume_with_changes`: resume an existing run although its recorded config differs in keys that define the run
    (recorded); without it such a re-run raises `identity.RunConfigChanged` before anything is written.
    `score`: (metric, "min" or "max") for a Tune trial: every evaluation also writes a checkpoint, and Ray
    Train keeps the `trainer.keep_last` best-scoring ones by that metric besides the latest (which resumes),
    so the checkpoint of the trial's best report is never deleted. Default: the `keep_last` newest.
    `tracking_parent`: a Tune experiment's tracker run, which this run's is nested under (`tracking.py`).
    `forward_evaluation`: with `eval.async_validation`, called in each validation task with its result row and
    checkpoint (a Tune trial forwards the row to ASHA: `runs.validation.validation_config`).
    """
    cfg = resolve_paths(cfg)  # before anything reaches Ray, whose processes run in a packaged copy of the cwd
    check_inputs(cfg)
    storage = storage or run_storage(cfg)
    resumption = identity.check_resume(cfg, storage, resume_with_changes)  # before anything is written
    if resumption.changes:
        log.info("resuming run %s with changes (%s), recorded in %s once the workers restored it: %s",
                 run_name(cfg), resumption.how, identity.HISTORY_FILE, identity.describe(resumption.changes))
    out = storage.local
    tracker_run = tracking.start_run(cfg, storage, run_name(cfg), parent=tracking_parent)
    if cfg.eval.every_kimg is not None:
        if cfg.eval.fallback_features != "none":  # the workers' own copies of this warning stay in their logs
            load_inception(cfg.eval.inception_weights, cfg.eval.fallback_features)
        build_attribute_metric(cfg)  # trains and caches the attribute reader once, before any worker needs it
    init_ray(cfg)
    bad_records = start_tally()  # every decode task reports undecodable records to it; the loop reads it
    t = cfg.trainer
    request = WorkerRequest.of(t.num_workers, t.use_gpu, t.resources_per_worker, t.placement,
                               timeout_s=t.placement_timeout_s)
    world = t.num_workers
    result = fit(
        train_loop_per_worker,
        {"experiment": cfg.model_dump(mode="json"), "storage": storage, "fault": fault,
         "trace_dir": str(trace_dir) if trace_dir else None, "epochs_per_pass": epochs_per_pass(cfg),
         "resumption": asdict(resumption), "score": score, "tracking": tracker_run,
         "train_rows": split_rows(Path(cfg.data.path), cfg.data.train_split), "bad_records": bad_records},
        request=request, use_gpu=t.use_gpu, resources_per_worker=t.resources_per_worker, storage=storage,
        datasets=build_datasets(cfg, storage, bad_records), dataset_config=data_config(cfg),
        max_failures=t.max_failures, min_workers=t.min_workers, resize_interval_s=t.elastic_resize_interval_s,
        keep=t.keep_last, score=score, callbacks=callbacks,
        validation=validation_config(cfg, storage, forward_evaluation),
        progress=(lambda: RunProgressLine(f"train {run_name(cfg)}", storage.file(METRICS_FILE),
                                      planned_kimg(cfg, world), note=rounding_note(cfg, world))) if progress else None)
    if cfg.eval.async_validation:
        append_late_results(storage)
    with result.checkpoint.as_directory() as folder:
        load_task_with_ema(cfg, Path(folder)).export(out / EXPORT_DIR)
    storage.push(EXPORT_DIR)
    tracking.finish_run(cfg, tracker_run, [out / EXPORT_DIR] if cfg.tracking.log_export else [])
    for written_by_rank0 in (METRICS_FILE, "tensorboard"):  # into the driver's mirror (rank 0 may be elsewhere)
        storage.pull(written_by_rank0)
    log.info("run %s finished; EMA model exported to %s", run_name(cfg), f"{storage.uri}/{EXPORT_DIR}")
    if (skipped := ray.get(bad_records.summary.remote()))["count"]:
        log.warning("%s: skipped (ids in %s)", describe(skipped), f"{storage.uri}/logs/rank0.log")
    return out
