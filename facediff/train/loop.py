"""The per-worker training loop run by Ray Train: one DeepSpeed engine per worker.

Progress is counted in optimizer steps and images seen (kimg = steps x global batch / 1000). Every
`log_every_steps` the ranks average their loss and report to Ray; every `checkpoint_every_kimg` (and at the
end) they write a checkpoint with the report; every `eval.every_kimg` they sample with the EMA weights and
report the image-distance metric, which Tune's ASHA reads.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from facediff.config.schema import ExperimentConfig
from facediff.data.stream import iter_train_batches
from facediff.tasks import build_task
from facediff.train import checkpoint
from facediff.train.checkpoint import TrainState
from facediff.train.ema import EMA
from facediff.train.engine import build_engine, images_per_step, total_steps
from facediff.train.progress import RunLog

SHUFFLE_BUFFER = 256


def _every(kimg: float | None, ips: int) -> int | None:
    """Steps between events that happen every `kimg` thousand images."""
    return None if kimg is None else max(1, round(kimg * 1000 / ips))


def _mean_across_ranks(value: float) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def _maybe_crash(step: int, fault: dict | None) -> None:
    """Fault injection for tests of resume and FailureConfig: raise once at a given step."""
    if not fault or step != fault["crash_at_step"]:
        return
    marker = Path(fault["marker"])
    if not marker.exists():
        marker.touch()
        raise RuntimeError(f"injected worker crash at step {step}")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = ExperimentConfig.model_validate(loop_config["experiment"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    torch.manual_seed(cfg.trainer.seed)  # the global RNG (dropout) starts seeded too
    task = build_task(cfg).to(device)  # seeded itself: identical initial weights on every rank
    engine = build_engine(task, cfg, world)
    ema = EMA(engine.module, cfg.trainer.ema)
    generator = torch.Generator().manual_seed(cfg.trainer.seed * 1_000_003 + rank)
    state = TrainState()
    if (resume_from := ray.train.get_checkpoint()) is not None:
        with resume_from.as_directory() as folder:
            state = checkpoint.load(Path(folder), engine, ema, generator, rank)

    ips, total = images_per_step(cfg, world), total_steps(cfg, world)
    checkpoint_every = _every(cfg.trainer.checkpoint_every_kimg, ips)
    eval_every = _every(cfg.eval.every_kimg, ips)
    run_log = RunLog(Path(loop_config["log_dir"]), total, cfg.trainer.total_kimg, state.step) if rank == 0 else None
    evaluator = None
    if eval_every is not None:
        from facediff.eval.evaluate import Evaluator

        evaluator = Evaluator(cfg, ray.train.get_dataset_shard("test"), rank, world, device)

    shard = ray.train.get_dataset_shard("train")
    window_loss, window_n, window_start, window_terms = 0.0, 0, time.time(), {}
    while state.step < total:
        batches = iter_train_batches(
            shard, cfg.trainer.batch_size, device=device, local_shuffle_buffer_size=SHUFFLE_BUFFER,
            local_shuffle_seed=cfg.trainer.seed * 10_007 + state.epoch,  # a different, seeded order each epoch
        )
        for index, batch in enumerate(batches):
            if index < state.batches_in_epoch:
                continue  # consumed before the checkpoint this run resumed from
            loss = engine(batch, generator)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            lr = engine.get_lr()[0]  # the rate this step uses; engine.step() advances the schedule
            engine.step()
            state.batches_in_epoch = index + 1
            window_loss, window_n = window_loss + loss.item(), window_n + 1
            for name, value in getattr(engine.module, "loss_terms", {}).items():  # e.g. loss_mse, loss_infonce
                window_terms[name] = window_terms.get(name, 0.0) + float(value)
            if not boundary:
                continue
            state.step += 1
            decay = ema.update(engine.module)
            _maybe_crash(state.step, loop_config.get("fault"))

            done = state.step >= total
            save_now = done or state.step % checkpoint_every == 0
            eval_now = evaluator is not None and (done or state.step % eval_every == 0)
            if not (save_now or eval_now or state.step % cfg.trainer.log_every_steps == 0):
                continue
            metrics = {
                "step": state.step,
                "time": time.time(),
                "kimg": state.step * ips / 1000,
                "epoch": state.epoch,
                "loss": _mean_across_ranks(window_loss / max(1, window_n)),
                **{name: _mean_across_ranks(total / max(1, window_n)) for name, total in sorted(window_terms.items())},
                "lr": lr,
                "ema_decay": decay,
                "images_per_s": window_n * cfg.trainer.batch_size * world / (time.time() - window_start),
            }
            if eval_now:
                metrics.update(evaluator.evaluate(ema, engine.module, state.step))
            if run_log is not None:
                run_log.write(metrics)
            _report(metrics, engine, ema, state, generator, rank, save_now)
            window_loss, window_n, window_start, window_terms = 0.0, 0, time.time(), {}
            if done:
                break
        else:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    if run_log is not None:
        run_log.close()


def _report(metrics, engine, ema, state, generator, rank, with_checkpoint: bool) -> None:
    if not with_checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="facediff-ckpt-") as folder:
        checkpoint.save(Path(folder), engine, ema, state, generator, rank)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=f"checkpoint_{state.step:09d}",
        )
