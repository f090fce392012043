"""`facediff train`: build the Ray datasets and a TorchTrainer, fit (resuming if the run exists), export.

Re-running the same config (same `trainer.run_name` and `trainer.storage_path`) resumes from the run's latest
checkpoint: Ray Train V2 restores by run name and storage path, and the loop continues its step count,
schedule, EMA and data position from there.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import ray
import ray.train
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from facediff.config import dump_config
from facediff.config.schema import ExperimentConfig
from facediff.data.stream import build_dataset
from facediff.tasks import DiffusionTask, build_task
from facediff.train.checkpoint import load_ema_weights
from facediff.train.loop import train_loop_per_worker

log = logging.getLogger("facediff.train")
EXPORT_DIR = "export"


def run_name(cfg: ExperimentConfig) -> str:
    return cfg.trainer.run_name or cfg.name


def run_dir(cfg: ExperimentConfig) -> Path:
    if "://" in cfg.trainer.storage_path:
        raise ValueError("facediff's logs and export need a filesystem storage_path (NFS on a cluster)")
    return Path(cfg.trainer.storage_path).resolve() / run_name(cfg)


def build_datasets(cfg: ExperimentConfig) -> dict[str, ray.data.Dataset]:
    d = cfg.data
    common = dict(image_size=d.image_size, part_groups=d.resolved_part_groups(), read_parallelism=d.read_parallelism,
                  use_latents=d.use_latents)
    datasets = {
        "train": build_dataset(
            d.path, d.train_split, hflip=d.hflip, shuffle=d.shuffle, seed=cfg.trainer.seed, epoch=None, **common
        )
    }
    if cfg.eval.every_kimg is not None:
        datasets["test"] = build_dataset(d.path, d.eval_split, hflip=False, shuffle=False, **common)
    return datasets


def load_task_with_ema(cfg: ExperimentConfig, checkpoint_dir: Path) -> DiffusionTask:
    """A plain (non-DeepSpeed) task holding a checkpoint's averaged weights."""
    task = build_task(cfg)
    weights = load_ema_weights(checkpoint_dir)
    missing, unexpected = task.load_state_dict(weights, strict=False)
    trainable = {name for name, p in task.named_parameters() if p.requires_grad}
    if unexpected or trainable & set(missing):
        raise KeyError(f"{checkpoint_dir}: EMA weights do not fit {cfg.model.family}: "
                       f"missing {sorted(trainable & set(missing))[:3]}, unexpected {unexpected[:3]}")
    return task.eval()


def init_ray(cfg: ExperimentConfig) -> None:
    """Join the running cluster, or start a local instance that leaves Ray Data a CPU beside the workers.

    With as many logical CPUs as cores, workers of one CPU each can take them all; Ray Data then never gets
    one and training waits forever without an error. Logical CPUs are only a scheduling budget, so a local
    instance declares enough for the workers plus one.
    """
    init_ray_for(cfg.trainer.num_workers * cfg.trainer.resources_per_worker.get("CPU", 1.0) + 1)


def init_ray_for(wanted: float) -> None:
    """`init_ray` for a job that needs `wanted` logical CPUs (Tune: concurrent trials plus Ray Data)."""
    if ray.is_initialized():
        return
    try:
        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(wanted)))
    except ValueError:  # a cluster is already running (`ray start`, `ray job submit`): use it as it is
        ray.init()


def train(cfg: ExperimentConfig, fault: dict | None = None, callbacks: list | None = None) -> Path:
    """Fit (or resume) the run and export its EMA model; returns the run folder.

    `callbacks`: Ray Train callbacks for the trainer's RunConfig (a Tune trial passes one that forwards the
    trainer's reports to Tune).
    """
    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    if cfg.eval.every_kimg is not None:
        from facediff.eval.evaluate import build_attribute_metric

        build_attribute_metric(cfg)  # trains and caches the attribute reader once, before any worker needs it
    init_ray(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": cfg.model_dump(mode="json"), "log_dir": str(out), "fault": fault},
        scaling_config=ScalingConfig(
            num_workers=cfg.trainer.num_workers,
            use_gpu=cfg.trainer.use_gpu,
            resources_per_worker=dict(cfg.trainer.resources_per_worker),
        ),
        run_config=RunConfig(
            name=run_name(cfg),
            storage_path=str(out.parent),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.trainer.keep_last),
            failure_config=FailureConfig(max_failures=cfg.trainer.max_failures),
            callbacks=list(callbacks or []),
        ),
        datasets=build_datasets(cfg),
        dataset_config=DataConfig(datasets_to_split=["train"]),  # every worker evaluates on the whole test split
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        load_task_with_ema(cfg, Path(folder)).export(out / EXPORT_DIR)
    log.info("run %s finished; EMA model exported to %s", run_name(cfg), out / EXPORT_DIR)
    return out
