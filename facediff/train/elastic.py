"""The training side of elastic runs (`trainer.num_workers: [min, max]`, docs/cluster.md "Preemptible nodes").

Ray Train starts the worker group at whatever size in [min, max] the cluster holds, and restarts it from the last
checkpoint when a node leaves (a worker failure, counted against `trainer.max_failures`) or when room for more
workers appears (checked every `trainer.elastic_resize_interval_s`). Each start calls `for_world`: the micro-batch
and accumulation of that size, so the global batch, the step count, the schedule and the checkpoint cadence are the
same at every size. The data position is kept as the (epoch, id) records of the pass that every rank consumed
(`checkpoint.consumed_records`, the union over the ranks that saved it), so a group of another size resumes the
pass without a record dropped or repeated.
"""

from __future__ import annotations

import logging

from facediff.config.elastic import split_global_batch
from facediff.config.schema import ExperimentConfig

log = logging.getLogger("facediff.train")


def for_world(cfg: ExperimentConfig, world: int) -> ExperimentConfig:
    """`cfg` with this worker count's `trainer.batch_size` and `trainer.grad_accum` (unchanged for a fixed-size run
    or at the full size); the config was checked at load to have an exact split at every size in the range."""
    t = cfg.trainer
    if t.min_workers is None:
        return cfg
    micro, accum = split_global_batch(t.batch_size * t.grad_accum * t.num_workers, world, t.batch_size)
    log.info("elastic run at %d of %d-%d workers: %d images a worker as %d micro-batch(es) of %d (global batch %d)",
             world, t.min_workers, t.num_workers, micro * accum, accum, micro, micro * accum * world)
    return cfg.model_copy(update={"trainer": t.model_copy(update={"batch_size": micro, "grad_accum": accum})})


def scaling_workers(num_workers: int, min_workers: int | None) -> int | tuple[int, int]:
    """Ray Train's ScalingConfig(num_workers=...): the count, or (min, max) for an elastic run."""
    return num_workers if min_workers is None else (min_workers, num_workers)
