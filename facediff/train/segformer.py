"""`facediff train-segformer`: fine-tune SegFormer to segment the face-part groups; report mean IoU on the test split.

    cfg = load_segformer_config("configs/segformer/tiny.yaml", ["trainer.steps=40"])
    out = train_segformer(cfg)  # out/segformer (save_pretrained), out/metrics.json, out/preview.png, metrics.jsonl

It runs on the training harness of `facediff train` (`driver.py`, `harness.py`): a TorchTrainer with DDP
(`prepare_model`) in the run folder `trainer.storage_path`/`trainer.run_name` (local or s3://), the train split
streamed by Ray Data and split between workers, resumable passes, checkpoints every `trainer.checkpoint_every_steps`,
rank 0's `metrics.jsonl`/TensorBoard (`progress.RunLog`) and the console's progress line. Re-running the same
config resumes the run from its last checkpoint (a finished run: nothing to do, its outputs are copied again).
The network, the labels and IoU are `segmentation.py`; SegFormer has no sampling, EMA or diffusers export, so it is
no `DiffusionTask`.

Every worker reads the whole test split and evaluates the records dealt to it; the intersection and union counts
are summed over ranks. Rank 0 puts the `save_pretrained` folder, metrics.json and a preview PNG into the final
checkpoint; the driver copies them into the run folder. `PartMaskEncoder` loads `<run>/segformer` with
`pretrained: <run>/segformer`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from facediff.config.load import dump_config
from facediff.console import RunProgressLine, hold_log
from facediff.data.shards import split_rows
from facediff.data.stream.dataset import build_dataset, iter_train_batches
from facediff.rng import seeded_build
from facediff.storage import RunStorage
from facediff.train import checkpoint, identity
from facediff.train.checkpoint import TrainState
from facediff.train.distributed import mean_across_ranks, seed_worker_rng
from facediff.train.driver import fit, resumable_dataset, start_workers_ray
from facediff.train.harness import ResumablePasses, maybe_crash, report
from facediff.train.placement import WorkerRequest
from facediff.train.run_log import METRICS_FILE, RunLog, epochs_seen
from facediff.train.segformer_config import SegformerTrainConfig
from facediff.train.segmentation import build_segmenter, evaluate_segmenter, group_lookup, normalize_images, \
    preview_png

log = logging.getLogger("facediff.train")
MODEL_DIR = "segformer"
OUTPUTS = (MODEL_DIR, "metrics.json", "preview.png")  # copied from the final checkpoint into the run folder
PROGRESS_WEIGHTS, PROGRESS_OPTIMIZER = "progress.safetensors", "optimizer.pt"


def run_storage(cfg: SegformerTrainConfig) -> RunStorage:
    return RunStorage(cfg.trainer.storage_path, cfg.run_name())


# ----------------------------------------------------------------------------------------- checkpoints
def save_progress(folder: Path, model, optimizer, schedule, state: TrainState, rank: int,
                  consumed: set[tuple[int, int]]) -> None:
    """A resumable checkpoint: every rank its data position (the records it consumed in the epoch in progress; rank
    0 the step and epoch), rank 0 also the weights as safetensors and the optimizer and schedule as tensors-only
    state dicts (DDP keeps them identical on every rank)."""
    from safetensors.torch import save_file

    if rank == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / PROGRESS_WEIGHTS))
        torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()},
                   folder / PROGRESS_OPTIMIZER)
    checkpoint.save_position(folder, state, rank, consumed)


def load_progress(folder: Path, model, optimizer, schedule) -> tuple[TrainState, set[tuple[int, int]]]:
    """Restore what `save_progress` wrote (safely: safetensors, and `weights_only` for the optimizer state)."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(folder / PROGRESS_WEIGHTS)))
    states = torch.load(folder / PROGRESS_OPTIMIZER, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    schedule.load_state_dict(states["schedule"])
    return checkpoint.read_state(folder), checkpoint.consumed_records(folder)


# ----------------------------------------------------------------------------------------- the worker loop
def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = SegformerTrainConfig.model_validate(loop_config["config"])
    t, storage = cfg.trainer, loop_config["storage"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    rank_log = f"logs/rank{rank}.log"
    open_log = hold_log(storage.local / rank_log)
    groups = cfg.data.groups()
    names, lut = ["background", *groups], group_lookup(groups).to(device)

    with seeded_build(t.seed):  # identical initial decode heads on every rank (DDP broadcasts rank 0's anyway)
        segmenter = build_segmenter(cfg.model, groups, load_weights=True)
    seed_worker_rng(t.seed, rank)  # but each rank its own dropout / drop-path stream
    model = ray.train.torch.prepare_model(segmenter)
    module = getattr(model, "module", model)  # DDP wraps it
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / t.steps)

    state, consumed, resumed_from = TrainState(), set(), None
    if (resume := ray.train.get_checkpoint()) is not None:
        with checkpoint.local_folder(resume) as folder:
            state, consumed = load_progress(folder, module, optimizer, schedule)
        resumed_from = state.step
        log.info("resumed from the checkpoint of step %d (epoch %d)", state.step, state.epoch)
    open_log()
    if resumed_from is not None and resumed_from >= t.steps:
        return  # a finished run: its final checkpoint holds the outputs
    passes = ResumablePasses(state, consumed)  # one epoch a pass: segmenter runs are short
    ips = t.batch_size * world
    run_log = RunLog(storage, t.steps, t.steps * ips / 1000, state.step) if rank == 0 else None

    def row(**values) -> dict[str, Any]:
        return {"step": state.step, "time": time.time(), "kimg": state.step * ips / 1000,
                "epoch": epochs_seen(state.step * ips, loop_config["train_rows"]), **values}

    def save(folder: Path) -> None:
        save_progress(folder, module, optimizer, schedule, state, rank, passes.consumed)

    window_loss, window_n, window_start, last_loss = 0.0, 0, time.time(), float("nan")
    shard = ray.train.get_dataset_shard("train")
    for batch in passes.batches(shard, t.steps, batch_size=t.batch_size, device=device, seed=t.seed):
        target = lut[batch["parts"].long()]
        loss = model(pixel_values=normalize_images(batch["image"]), labels=target).loss  # CE at full size
        lr = schedule.get_last_lr()[0]  # the rate this step uses
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        state.step += 1
        window_loss, window_n = window_loss + loss.detach().float(), window_n + 1
        maybe_crash(state.step, loop_config.get("fault"))
        done = state.step >= t.steps
        save_now = not done and state.step % t.checkpoint_every_steps == 0  # the final checkpoint comes below
        if not (done or save_now or state.step % t.log_every_steps == 0):
            continue
        means = mean_across_ranks({"loss": float(window_loss) / window_n}, device)  # a collective: every rank
        last_loss = means["loss"]
        metrics = row(**means, lr=lr, images_per_s=window_n * ips / (time.time() - window_start))
        if run_log is not None and not done:  # the last step's row comes with the test IoU
            run_log.write(metrics, sync=save_now)
        if save_now:  # not every log: a Ray report waits for the controller's 2 s poll (see train/loop.py)
            report(metrics, state.step, save)
            storage.push(rank_log)
        window_loss, window_n, window_start = 0.0, 0, time.time()

    test = iter_train_batches(ray.train.get_dataset_shard("test"), cfg.eval.batch_size, device=device,
                              drop_last=False)
    result, kept = evaluate_segmenter(module, test, lut, names, rank, world,
                                      keep=cfg.eval.num_preview if rank == 0 else 0)
    epoch = state.epoch + (state.batches_in_epoch > 0)  # epochs begun
    metrics = row(loss=last_loss, miou=result["miou"], **{f"iou/{k}": v for k, v in result["iou"].items()})
    if run_log is None:
        report(metrics, state.step)
        storage.push(rank_log)
        return
    log.info("step %d: test mIoU %.4f", state.step, result["miou"])
    run_log.write(metrics, sync=True)
    run_log.close()

    def save_outputs(folder: Path) -> None:
        module.save_pretrained(folder / MODEL_DIR)  # config.json + model.safetensors
        (folder / "metrics.json").write_text(json.dumps(
            {"miou": result["miou"], "iou": result["iou"], "steps": state.step, "epochs": epoch,
             "resumed_from_step": resumed_from, "final_train_loss": last_loss,
             "groups": {k: list(v) for k, v in groups.items()}}, indent=2))
        if kept:
            preview_png(kept, len(groups), folder / "preview.png")
        save(folder)  # a re-run of the finished run resumes here, with nothing left to do

    report(metrics, state.step, save_outputs)
    storage.push(rank_log)


# ---------------------------------------------------------------------------------------------- the driver
def check_recorded_config(cfg: SegformerTrainConfig, storage: RunStorage) -> None:
    """A re-run resumes the run in its folder: only with the config the run was started with (keys that change
    no result, e.g. logging cadence or placement, aside: `identity.may_change`)."""
    import yaml

    if not storage.exists(identity.CONFIG_FILE):
        return
    recorded = yaml.safe_load(storage.read_bytes(identity.CONFIG_FILE).decode("utf-8")) or {}
    changes = {k: v for k, v in identity.config_changes(recorded, cfg.model_dump(mode="json")).items()
               if not identity.may_change(k, *v)}
    if changes:
        raise ValueError(f"{storage.uri}: a train-segformer run of another config ({identity.describe(changes)}); "
                         f"re-run it with the config in {storage.uri}/{identity.CONFIG_FILE}, or start a new run "
                         "with trainer.run_name=<another name>")


def _copy_outputs(result_checkpoint, storage: RunStorage) -> None:
    """The final checkpoint's outputs into the run folder, each replaced only once its new copy is whole."""
    with result_checkpoint.as_directory() as folder:
        for name in OUTPUTS:
            source, target = Path(folder) / name, storage.local / name
            if not source.exists():
                continue
            staging = storage.local / f".{name}.{uuid.uuid4().hex}.partial"
            (shutil.copytree if source.is_dir() else shutil.copyfile)(source, staging)
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(staging, target)
            storage.push(name)


def train_segformer(cfg: SegformerTrainConfig, fault: dict | None = None, progress: bool = True) -> Path:
    """Fine-tune (or resume), evaluate and write the run folder (segformer/, metrics.json, preview.png,
    config.yaml, metrics.jsonl, checkpoints); returns its local side (the folder itself for local storage).
    `fault` (tests) crashes a worker once at a step."""
    from ray.train import DataConfig as RayDataConfig

    t, d = cfg.trainer, cfg.data
    storage = run_storage(cfg)
    check_recorded_config(cfg, storage)  # before anything is written
    start_workers_ray(t.num_workers, t.resources_per_worker)
    request = WorkerRequest.of(t.num_workers, t.use_gpu, t.resources_per_worker, t.placement,
                               timeout_s=t.placement_timeout_s)
    split = functools.partial(build_dataset, d.path, d.train_split, image_size=d.image_size, hflip=d.hflip,
                              shuffle=True, seed=t.seed, epoch=None)
    datasets = {"train": resumable_dataset(split, storage),  # checks the shards now, before anything is written
                "test": build_dataset(d.path, d.eval_split, image_size=d.image_size, hflip=False)}
    storage.local.mkdir(parents=True, exist_ok=True)
    (storage.local / identity.CONFIG_FILE).write_text(dump_config(cfg))
    storage.push(identity.CONFIG_FILE)
    kimg = t.steps * t.batch_size * t.num_workers / 1000
    result = fit(
        train_loop_per_worker,
        {"config": cfg.model_dump(mode="json"), "storage": storage, "fault": fault,
         "train_rows": split_rows(Path(d.path), d.train_split)},
        request=request, use_gpu=t.use_gpu, resources_per_worker=t.resources_per_worker, storage=storage,
        datasets=datasets, dataset_config=RayDataConfig(datasets_to_split=["train"]),  # all test on every worker
        max_failures=t.max_failures, keep=1,
        progress=(lambda: RunProgressLine(f"train-segformer {cfg.run_name()}", storage.file(METRICS_FILE), kimg))
        if progress else None)
    if result.checkpoint is None:
        raise RuntimeError(f"train-segformer {cfg.run_name()}: the run ended without a final checkpoint")
    _copy_outputs(result.checkpoint, storage)
    for written_by_rank0 in (METRICS_FILE, "tensorboard"):  # into the driver's mirror (rank 0 may be elsewhere)
        storage.pull(written_by_rank0)
    miou = json.loads((storage.local / "metrics.json").read_text())["miou"]
    log.info("train-segformer %s: test mIoU %.4f; wrote %s", cfg.run_name(), miou, storage.uri)
    return storage.local
