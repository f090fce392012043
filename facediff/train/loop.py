"""The per-worker training loop run by Ray Train: one DeepSpeed engine per worker.

Progress is counted in optimizer steps and images seen (kimg = steps x global batch / 1000). Every
`log_every_steps` the ranks average their loss and rank 0 logs it (`metrics.jsonl`, TensorBoard: the console's
progress line reads these); every `checkpoint_every_kimg` (and at the end) they write a checkpoint; every
`eval.every_kimg` they sample with the EMA weights and compute the image-distance metric, which Tune's ASHA reads.
In a Tune trial (`loop_config["score"]`) every evaluation writes a checkpoint too: Ray Train keeps the best-scoring
ones by the trial's metric, and the results name the checkpoint of the report that scored best.

Only checkpoints and evaluations are reported to Ray. Train V2's controller takes one report per worker per
poll (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s) and a report waits while the previous one is untaken, so a
report every 10 fast steps held training to 10 steps per 2 s (0.20 s a step where the step costs 0.07 s).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from facediff.config.schema import ExperimentConfig
from facediff.console import hold_log
from facediff.data.stream.bad_records import BadRecordWatch
from facediff.eval.evaluate import Evaluator
from facediff.tasks import build_task
from facediff.train import async_eval, checkpoint, identity, tracking
from facediff.train.checkpoint import TrainState
from facediff.train.distributed import FirstNonFinite, mean_across_ranks, nonfinite_anywhere, seed_worker_rng
from facediff.train.ema import EMA
from facediff.train.elastic import for_world
from facediff.train.engine import GpuStep, apply_optimizer_settings, build_engine, images_per_step, total_steps
from facediff.train.harness import ResumablePasses, maybe_crash, report
from facediff.train.run_log import CHECKPOINT_ONLY, RunLog, epochs_seen, planned_kimg
from facediff.train.sample_grid import SampleGrid

log = logging.getLogger("facediff.train")


def _every(kimg: float | None, ips: int) -> int | None:
    """Steps between events that happen every `kimg` thousand images."""
    return None if kimg is None else max(1, round(kimg * 1000 / ips))


class DataTrace:
    """Optional record of what a rank trained on (`loop_config["trace_dir"]`): one JSON line per micro-batch with
    the step it counts towards, the run's progress (phased timesteps), its epoch, ids and flips. Tests compare an
    interrupted run's data with an uninterrupted one's; each worker start writes its own file."""

    def __init__(self, folder: str | None, rank: int, world: int = 1):
        self.file, self.started, self.world = None, time.time(), world  # started: orders the worker starts
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(folder) / f"rank{rank}-{uuid.uuid4().hex}.jsonl", "a")

    def write(self, step: int, batch: dict[str, torch.Tensor], progress: float) -> None:
        if self.file is not None:
            row = {"step": step, "started": self.started, "world": self.world, "progress": progress,
                   "epoch": batch["epoch"].tolist(), "id": batch["id"].tolist(), "flipped": batch["flipped"].tolist()}
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()


class NonFiniteLoss(RuntimeError):
    pass


def _maybe_poison(loss: torch.Tensor, step: int, rank: int, poison_at: int | None) -> tuple[torch.Tensor, int | None]:
    """Fault injection for tests of the non-finite loss check: rank 0's loss becomes NaN once, at step
    `poison_at`. Returns the loss and the step still to poison (None once done: a skipped batch leaves the
    step where it was, and every rank clears it alike)."""
    if step != poison_at:
        return loss, poison_at
    return (loss * float("nan") if rank == 0 else loss), None


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = ExperimentConfig.model_validate(loop_config["experiment"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = for_world(cfg, world)  # an elastic run: this size's micro-batch x accumulation, the same global batch
    device = ray.train.torch.get_device()
    storage = loop_config["storage"]  # the run's folder: logs and metrics go to its local side, then to storage
    rank_log = f"logs/rank{rank}.log"
    open_log = hold_log(storage.local / rank_log)  # written once the run is known good (below)
    log.info("rank %d of %d: local rank %d on node %s (node rank %d), device %s, pid %d", rank, world,
             ctx.get_local_rank(), ray.get_runtime_context().get_node_id(), ctx.get_node_rank(), device, os.getpid())

    seed_worker_rng(cfg.trainer.seed, rank)  # each rank its own dropout stream
    task = build_task(cfg).to(device)  # seeded itself: identical initial weights on every rank
    gpu_step = GpuStep(cfg, device)
    engine = build_engine(task, cfg, world, gpu_step)
    ema = EMA(engine.module, cfg.trainer.ema, engine.optimizer)  # averages the fp32 masters
    # noise, timesteps and condition dropout are drawn on the device (see `diffusion.DenoisingLoss.noise`)
    generator = torch.Generator(device=device).manual_seed(cfg.trainer.seed * 1_000_003 + rank)
    skipped_nonfinite = 0  # steps skipped for a non-finite loss in this attempt (trainer.on_nonfinite_loss)
    # records the decode step dropped (`data.bad_records`): counted by the run's tally, read at each log
    bad_records = BadRecordWatch(loop_config.get("bad_records"), cfg.data.max_bad_records, rank)
    poison_at = (loop_config.get("fault") or {}).get("nan_at_step")  # tests: the step whose loss turns NaN
    # stop: the check waits on the device until the next log, evaluation or checkpoint (no host sync per step);
    # skip must decide before each backward, so it pays one small all-reduce and a sync per step
    watch = FirstNonFinite(device) if cfg.trainer.on_nonfinite_loss == "stop" else None
    # a pass: the data epochs one iteration of the shard reads (`passes.ShardPasses`)
    epochs_per_pass = loop_config.get("epochs_per_pass", 1)
    state, consumed = TrainState(), set()  # consumed: (epoch, id) used in the pass in progress, by every rank
    if (resume_from := ray.train.get_checkpoint()) is not None:
        with checkpoint.local_folder(resume_from) as folder:
            state = checkpoint.load(folder, engine, ema, generator, rank)
            consumed = checkpoint.consumed_records(folder)
        apply_optimizer_settings(engine.lr_scheduler, cfg)  # the config's lr, betas, ...: not the checkpoint's
        log.info("resumed from the checkpoint of step %d (pass from epoch %d)", state.step, state.epoch)
    _record_the_run(loop_config, storage, state.step, rank, device)
    open_log()
    passes = ResumablePasses(state, consumed, epochs_per_pass)  # the factory drops `consumed` from the resumed pass
    trace = DataTrace(loop_config.get("trace_dir"), rank, world)

    score = loop_config.get("score")  # (metric, mode) Ray Train keeps checkpoints by (a Tune trial's), or None
    ips, total = images_per_step(cfg, world), total_steps(cfg, world)
    checkpoint_every = _every(cfg.trainer.checkpoint_every_kimg, ips)
    eval_every = _every(cfg.eval.every_kimg, ips)
    train_rows = loop_config["train_rows"]  # the training split's size: `epoch` = images / train_rows
    in_task = cfg.eval.async_validation  # evaluations run in Ray's validation task (`async_eval`), not here
    run_log = None
    if rank == 0:  # the tracker (MLflow, W&B: `tracking:`) gets every row the run log writes
        tracker = tracking.attach(loop_config["experiment"], loop_config.get("tracking"), storage.local)
        run_log = RunLog(storage, total, planned_kimg(cfg, world), state.step, tracker=tracker, evals=in_task)
    evaluator = None
    if eval_every is not None and not in_task:
        evaluator = Evaluator(cfg, ray.train.get_dataset_shard("test"), rank, world, device)
    grids = SampleGrid.for_run(cfg, rank, device, storage, ips, evaluator)  # None: eval.sample_grid is 0

    shard = ray.train.get_dataset_shard("train")
    window_loss, window_n, window_start, window_terms = 0.0, 0, time.time(), {}
    for batch in passes.batches(shard, total, batch_size=cfg.trainer.batch_size, device=device, seed=cfg.trainer.seed,
                                part_groups=cfg.data.resolved_part_groups()):
        engine.module.training_progress = state.step / total  # a function of the step: resumes in phase
        trace.write(state.step + 1, batch, engine.module.training_progress)
        with gpu_step.forward():
            loss = engine(gpu_step.batch(batch), generator)
        loss, poison_at = _maybe_poison(loss, state.step + 1, rank, poison_at)
        if watch is not None:
            watch.note(loss, state.step + 1)
        elif nonfinite_anywhere(loss, device):  # every rank takes the same branch: collectives stay matched
            skipped_nonfinite += 1
            log.warning("step %d: non-finite loss on at least one rank; batch skipped (%d so far)",
                        state.step + 1, skipped_nonfinite)
            continue
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        lr = engine.get_lr()[0]  # the rate this step uses; engine.step() advances the schedule
        engine.step()
        # summed on the device: no host sync per step (read once per report)
        window_loss, window_n = window_loss + loss.detach().float(), window_n + 1
        for name, value in getattr(engine.module, "loss_terms", {}).items():  # e.g. loss_mse, loss_infonce
            window_terms[name] = window_terms.get(name, 0.0) + value.detach().float()
        if not boundary:
            continue
        state.step += 1
        decay = ema.update(engine.module)
        maybe_crash(state.step, loop_config.get("fault"))

        done = state.step >= total
        eval_now = eval_every is not None and (done or state.step % eval_every == 0)
        # a Tune trial: every evaluation also writes a checkpoint, which Ray Train scores by it (`train.score`);
        # an evaluation in Ray's validation task evaluates a checkpoint
        save_now = done or state.step % checkpoint_every == 0 or (eval_now and (score is not None or in_task))
        if grids is not None and grids.due(state.step, done):  # not a log row: the logged loss windows stay
            grid = grids.write(ema, state.step, run_log.tensorboard if run_log is not None else None)
            if grid is not None:  # rank 0: the grid to the tracker too (MLflow, W&B)
                run_log.log_image("samples", grid, state.step * ips / 1000)
        if not (save_now or eval_now or state.step % cfg.trainer.log_every_steps == 0):
            continue
        if watch is not None and (bad := watch.first()) is not None:  # before this step is logged or saved
            raise NonFiniteLoss(f"step {bad}: the loss is not finite on at least one rank (found at step "
                                f"{state.step}'s log; nothing after it was saved); trainer.on_nonfinite_loss=skip "
                                "skips such steps")
        bad = bad_records.count(device)  # before anything is logged: a run past the limit stops here
        means = mean_across_ranks(
            {"loss": float(window_loss) / max(1, window_n),
             **{name: float(total) / max(1, window_n) for name, total in sorted(window_terms.items())}},
            device)  # one collective, on the device the process group serves (NCCL: the GPU)
        metrics = {
            "step": state.step,
            "time": time.time(),
            "world_size": world,
            "kimg": state.step * ips / 1000,
            "epoch": epochs_seen(state.step * ips, train_rows),
            **means,
            "lr": lr,
            "ema_decay": decay,
            "images_per_s": window_n * cfg.trainer.batch_size * world / (time.time() - window_start),
            "skipped_nonfinite": skipped_nonfinite,
            "bad_records": bad,
        }
        if eval_now and evaluator is not None:
            metrics.update(evaluator.evaluate(ema, engine.module, state.step))
        if run_log is not None:
            run_log.write(metrics, sync=save_now or bad > cfg.data.max_bad_records)
        bad_records.check(bad)  # after the log: metrics.jsonl shows the count the run stopped at
        if save_now or eval_now:
            save = (lambda folder: checkpoint.save(folder, engine, ema, state, generator, rank, passes.consumed,
                                                   world))
            report(_scored(metrics, score if save_now else None), state.step, save if save_now else None,
                   upload=cfg.trainer.checkpoint_upload,
                   validation=async_eval.due(state.step, metrics["kimg"]) if eval_now and in_task else None)
        if save_now:
            storage.push(rank_log)
        window_loss, window_n, window_start, window_terms = 0.0, 0, time.time(), {}
    if run_log is not None:
        run_log.close()


def _record_the_run(loop_config: dict[str, Any], storage, step: int, rank: int, device) -> None:
    """Once every rank built its engine and restored the checkpoint (a collective: a rank that failed never joins
    it, so nothing is recorded), rank 0 writes the run's config and any recorded change (`identity.commit`). Until
    here this worker start wrote nothing into the run folder: a refused resume leaves it as it was."""
    mean_across_ranks({"started": 1.0}, device)
    resumption = loop_config.get("resumption")
    if rank == 0 and resumption is not None:
        identity.commit(storage, identity.Resumption(**resumption), step)


def _scored(metrics: dict[str, Any], score: tuple[str, str] | None) -> dict[str, Any]:
    """A checkpoint's report with the metric Ray Train scores checkpoints by. A checkpoint between evaluations
    (`trainer.checkpoint_every_kimg` off the `eval.every_kimg` cadence) carries the worst finite value, which Ray
    ranks below every measured one (so it stays only while it is the latest, for resuming), marked
    `CHECKPOINT_ONLY` so that Tune never sees it (`tune.trial.MetricReportCallback`). Not NaN or inf: Ray's
    checkpoint state (JSON through pydantic) stores those as null, which it cannot score after a restore."""
    if score is None or score[0] in metrics:
        return metrics
    worst = sys.float_info.max if score[1] == "min" else -sys.float_info.max
    return {**metrics, score[0]: worst, CHECKPOINT_ONLY: True}
