"""`facediff train-segformer`: fine-tune SegFormer to segment the face-part groups; report mean IoU on the test split.

    cfg = load_segformer_config("configs/segformer/tiny.yaml", ["steps=40"])
    out = train_segformer(cfg)  # out/segformer (save_pretrained), out/metrics.json, out/preview.png

The network is transformers' `SegformerForSemanticSegmentation` over the face image (3 channels, normalised like
SegFormer's RGB input). Its encoder comes from `model` (a preset and/or pretrained weights, e.g. the ADE20k b0
checkpoint, through `build_from_ref`); the decode head is new, since its classifier must predict G+1 classes
(0 = background and every part outside the groups, g = the g-th configured group) and ADE's head was trained for
150 scene classes. Labels come from the stored 19-class label map: where custom groups share a part, the later
group wins; parts themselves never overlap there (the map was painted in PART_NAMES order, later parts on top).

Ray Train runs it like `facediff train`: a TorchTrainer with DDP (`prepare_model`), the train split streamed by
Ray Data and split between workers. Every worker reads the whole test split and evaluates every world-th batch;
intersection and union pixel counts are summed over ranks, so IoU is per group over the whole split (never a
mean of per-batch IoUs). Rank 0 puts the `save_pretrained` folder, metrics.json and a preview PNG into the final
Ray checkpoint; the driver copies it to `output_dir` (atomically: a temporary folder, then a rename).
`PartMaskEncoder` loads `output_dir/segformer` with `pretrained: <output_dir>/segformer`.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from facediff.config.load import apply_overrides, dump_config, load_raw, validate
from facediff.config.schema import DataConfig, PositiveFloat, PositiveInt, PretrainedRef, Strict
from facediff.config.trainer_checks import refuse_misspelt_resources
from facediff.data.celebamask import NUM_PART_CLASSES, PART_LABELS
from facediff.data.hashing import owned_by
from facediff.models.segformer import IMAGE_MEAN, IMAGE_STD, group_palette
from facediff.train import checkpoint
from facediff.train.checkpoint import TrainState
from facediff.rng import seeded_build
from facediff.train.distributed import seed_worker_rng, sum_across_ranks

log = logging.getLogger("facediff.segformer")
MODEL_DIR = "segformer"
PROGRESS_WEIGHTS, PROGRESS_OPTIMIZER = "progress.safetensors", "optimizer.pt"
SHUFFLE_BUFFER = 256


class SegformerTrainConfig(Strict):
    """Everything `train-segformer` reads; unknown keys are errors."""

    name: str = "segformer"
    data: str = "data/synthetic/shards"  # a folder written by `facediff prepare`
    train_split: str = "train"
    eval_split: str = "test"
    image_size: PositiveInt = 256
    part_groups: Literal["default", "full"] | dict[str, list[str]] = "default"
    hflip: bool = True
    model: PretrainedRef = PretrainedRef(preset="segformer_b0_ade512",
                                         pretrained="nvidia/segformer-b0-finetuned-ade-512-512")
    lr: PositiveFloat = 6e-5
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    batch_size: PositiveInt = 8  # per worker
    eval_batch_size: PositiveInt = 16
    steps: PositiveInt = 4000  # optimizer steps; the learning rate decays linearly to 0 over them (SegFormer's poly)
    seed: int = 0
    num_workers: PositiveInt = 2
    use_gpu: bool = False
    resources_per_worker: dict[str, PositiveFloat] = {"CPU": 1.0}
    placement_timeout_s: PositiveFloat | None = 600.0  # as trainer.placement_timeout_s of training configs
    log_every_steps: PositiveInt = 20
    checkpoint_every_steps: PositiveInt = 500  # a re-run of an interrupted run resumes from the last of these
    max_failures: Annotated[int, Field(ge=-1)] = 0  # worker-group restarts Ray makes from it (-1: without end)
    num_preview: Annotated[int, Field(ge=0)] = 8
    output_dir: str = "runs/segformer"

    @field_validator("part_groups")
    @classmethod
    def _known_parts(cls, value):
        DataConfig(part_groups=value)  # the same checks as training configs
        return value

    @model_validator(mode="after")
    def _ray_resource_names(self):
        refuse_misspelt_resources(self.resources_per_worker)
        return self

    def groups(self) -> dict[str, tuple[str, ...]]:
        return DataConfig(part_groups=self.part_groups).resolved_part_groups()


def load_segformer_config(path: str | Path, overrides: list[str] | None = None) -> SegformerTrainConfig:
    """A YAML config (with `base:` inheritance) plus dotted `key=value` overrides; errors name the file and key."""
    origins: dict[tuple, str] = {}
    raw = apply_overrides(load_raw(path, origins), list(overrides or []), origins)
    raw.setdefault("name", Path(path).stem)
    return validate(SegformerTrainConfig, raw, origins, str(Path(path).resolve()))


# ------------------------------------------------------------------------------------------ model and data
def group_lookup(groups: dict[str, tuple[str, ...]]) -> Tensor:
    """(19,) int64: part label -> group index (0 = no group); a later group wins where groups share a part."""
    lut = torch.zeros(NUM_PART_CLASSES, dtype=torch.long)
    for index, parts in enumerate(groups.values(), start=1):
        for part in parts:
            lut[PART_LABELS[part]] = index
    return lut


def normalize_images(images: Tensor) -> Tensor:
    """[-1, 1] RGB (the stream's format) -> SegFormer's input: ImageNet mean/std over [0, 1]."""
    mean = torch.tensor(IMAGE_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, device=images.device).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


def build_segmenter(ref: PretrainedRef, groups: dict[str, tuple[str, ...]], load_weights: bool):
    """`SegformerForSemanticSegmentation` for G+1 classes: the encoder `ref` names, a new decode head."""
    from transformers import SegformerForSemanticSegmentation, SegformerModel

    from facediff.models.pretrained import build_from_ref

    encoder = build_from_ref(SegformerModel, ref, load_weights)
    config = copy.deepcopy(encoder.config)
    names = ["background", *groups]
    config.id2label = dict(enumerate(names))
    config.label2id = {name: i for i, name in enumerate(names)}
    config.num_labels = len(names)
    model = SegformerForSemanticSegmentation(config)
    model.segformer.load_state_dict(encoder.state_dict())
    return model


def predict(model, images: Tensor) -> Tensor:
    """(B, 3, S, S) images in [-1, 1] -> (B, S, S) group indices (logits come at S/4, upsampled bilinearly)."""
    logits = model(pixel_values=normalize_images(images)).logits
    logits = torch.nn.functional.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return logits.argmax(dim=1)


class IoUCounter:
    """Intersection and union pixel counts per class, summed over batches (and ranks with `all_reduce`)."""

    def __init__(self, num_classes: int):
        self.intersection = torch.zeros(num_classes, dtype=torch.float64)
        self.union = torch.zeros(num_classes, dtype=torch.float64)

    def update(self, pred: Tensor, target: Tensor) -> None:
        n = len(self.intersection)
        pred, target = pred.reshape(-1).cpu(), target.reshape(-1).cpu()
        both = torch.bincount(target[pred == target], minlength=n).double()
        self.intersection += both
        self.union += torch.bincount(pred, minlength=n).double() + torch.bincount(target, minlength=n).double() - both

    def all_reduce(self, device: torch.device | str = "cpu") -> None:
        """Sum the counts over ranks, on `device` (the worker's: an NCCL group reduces GPU tensors only)."""
        self.intersection, self.union = sum_across_ranks([self.intersection, self.union], device)

    def result(self, names: list[str]) -> dict[str, Any]:
        """Per-class IoU (None where a class is in neither prediction nor truth) and `miou` over the part groups
        (class 0, background, is reported but not averaged: it dominates every face image)."""
        iou = {name: (float(i / u) if u > 0 else None) for name, i, u in zip(names, self.intersection, self.union)}
        parts = [v for name, v in iou.items() if name != names[0] and v is not None]
        return {"iou": iou, "miou": float(np.mean(parts)) if parts else float("nan")}


def evaluate_segmenter(model, batches, lut: Tensor, names: list[str], rank: int = 0, world: int = 1,
                       keep: int = 0) -> tuple[dict[str, Any], list[tuple[Tensor, Tensor, Tensor]]]:
    """IoU over `batches` (every rank sees all of them and takes the records dealt to it by id, so each record
    counts once whatever order each rank reads them in); also returns up to `keep` (image, predicted, true)
    triples for a preview. The counts are summed over ranks on the batches' device."""
    counter, kept, device = IoUCounter(len(names)), [], "cpu"
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            mine = owned_by(batch["id"], rank, world).to(batch["image"].device)
            if not mine.any():
                continue
            device = batch["image"].device
            target = lut.to(device)[batch["parts"][mine].long()]
            pred = predict(model, batch["image"][mine])
            counter.update(pred, target)
            for k in range(min(keep - len(kept), len(pred))):
                kept.append((batch["image"][mine][k].cpu(), pred[k].cpu(), target[k].cpu()))
    counter.all_reduce(device)
    model.train(was_training)
    return counter.result(names), kept


def preview_png(triples: list[tuple[Tensor, Tensor, Tensor]], num_groups: int, out: Path) -> Path:
    """Rows of [face | predicted groups | true groups]."""
    from facediff.viz import image_grid

    palette = group_palette(num_groups)
    tiles = []
    for image, pred, target in triples:
        face = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
        tiles.append(np.concatenate([face, palette[pred.numpy()], palette[target.numpy()]], axis=1))
    image_grid(tiles, ncols=1 if len(tiles) < 4 else 2).save(out)
    return out


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

    from facediff.data.stream.dataset import iter_train_batches
    from facediff.train.loop import maybe_crash

    cfg = SegformerTrainConfig.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    groups = cfg.groups()
    names, lut = ["background", *groups], group_lookup(groups).to(device)

    with seeded_build(cfg.seed):  # identical initial decode heads on every rank (DDP broadcasts rank 0's anyway)
        segmenter = build_segmenter(cfg.model, groups, load_weights=True)
    seed_worker_rng(cfg.seed, rank)  # but each rank its own dropout / drop-path stream
    model = ray.train.torch.prepare_model(segmenter)
    module = getattr(model, "module", model)  # DDP wraps it
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / cfg.steps)

    # consumed: (epoch, id) used in the epoch in progress (one epoch a pass here: segmenter runs are short)
    state, consumed, resumed_from = TrainState(), set(), None
    if (resume := ray.train.get_checkpoint()) is not None:
        with checkpoint.local_folder(resume) as folder:
            state, consumed = load_progress(folder, module, optimizer, schedule)
        resumed_from = state.step
        if rank == 0:
            print(f"[train-segformer] resumed from the checkpoint of step {state.step} (epoch {state.epoch})",
                  flush=True)
    skipped = set(consumed)  # the dataset factory leaves these out of the resumed epoch (`_train_dataset`)
    shard = ray.train.get_dataset_shard("train")
    window, start = [], time.time()
    while state.step < cfg.steps:
        batches = iter_train_batches(shard, cfg.batch_size, device=device, local_shuffle_buffer_size=SHUFFLE_BUFFER,
                                     local_shuffle_seed=cfg.seed * 10_007 + state.epoch)
        for index, batch in enumerate(batches):
            if index == 0:
                checkpoint.check_resumed_data(batch, state, skipped)
            consumed.update(zip(batch["epoch"].tolist(), batch["id"].tolist()))
            target = lut[batch["parts"].long()]
            loss = model(pixel_values=normalize_images(batch["image"]), labels=target).loss  # CE at full size
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            state.step, state.batches_in_epoch = state.step + 1, state.batches_in_epoch + 1
            window.append(loss.item())
            maybe_crash(state.step, loop_config.get("fault"))
            if state.step % cfg.checkpoint_every_steps == 0 and state.step < cfg.steps:
                with tempfile.TemporaryDirectory(prefix="facediff-segformer-") as folder:
                    save_progress(Path(folder), module, optimizer, schedule, state, rank, consumed)
                    ray.train.report({"step": state.step, "epoch": state.epoch},
                                     checkpoint=ray.train.Checkpoint.from_directory(folder))
            elif state.step % cfg.log_every_steps == 0 and state.step < cfg.steps:
                if rank == 0:  # not a Ray report: those wait for the controller's 2 s poll (see train/loop.py)
                    rate = len(window) * cfg.batch_size * world / (time.time() - start)
                    print(f"[train-segformer] step {state.step}/{cfg.steps} loss {np.mean(window):.4f} "
                          f"({rate:.1f} img/s)", flush=True)
                window, start = [], time.time()
            if state.step >= cfg.steps:
                break
        else:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            consumed, skipped = set(), set()
    step, epoch = state.step, state.epoch + (state.batches_in_epoch > 0)  # epochs begun

    test = iter_train_batches(ray.train.get_dataset_shard("test"), cfg.eval_batch_size, device=device,
                              drop_last=False)
    result, kept = evaluate_segmenter(module, test, lut, names, rank, world, keep=cfg.num_preview if rank == 0 else 0)
    metrics = {"step": step, "epoch": epoch, "loss": float(np.mean(window)) if window else float("nan"),
               "miou": result["miou"], **{f"iou/{k}": v for k, v in result["iou"].items()}}
    if rank != 0:
        ray.train.report(metrics)
        return
    print(f"[train-segformer] step {step}: test mIoU {result['miou']:.4f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="facediff-segformer-") as folder:
        module.save_pretrained(Path(folder) / MODEL_DIR)  # config.json + model.safetensors
        (Path(folder) / "metrics.json").write_text(json.dumps(
            {"miou": result["miou"], "iou": result["iou"], "steps": step, "epochs": epoch,
             "resumed_from_step": resumed_from,
             "final_train_loss": metrics["loss"], "groups": {k: list(v) for k, v in groups.items()}}, indent=2))
        if kept:
            preview_png(kept, len(groups), Path(folder) / "preview.png")
        save_progress(Path(folder), module, optimizer, schedule, state, rank, consumed)  # a re-run: evaluation only
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


# ---------------------------------------------------------------------------------------------- the driver
def _train_dataset(config: dict, ray_run: str):
    """The training split as the run continues from its last registered checkpoint (a factory Ray Train calls at
    every worker start): epochs counted from the checkpoint's, its epoch's consumed records left out."""
    from facediff.data.stream.dataset import build_dataset
    from facediff.train.run import resume_point

    cfg = SegformerTrainConfig.model_validate(config)
    point = resume_point(Path(ray_run))
    return build_dataset(cfg.data, cfg.train_split, image_size=cfg.image_size, hflip=cfg.hflip, shuffle=True,
                         seed=cfg.seed, epoch=None, first_epoch=point.epoch,
                         skip_ids=checkpoint.by_epoch(point.consumed))


def _init_ray(cfg: SegformerTrainConfig) -> None:
    """Join a running cluster, or start a local one with a CPU left for Ray Data beside the workers (without
    it, workers holding every CPU starve Ray Data and training waits forever without an error)."""
    from facediff.ray_start import start_ray

    start_ray(cfg.num_workers * cfg.resources_per_worker.get("CPU", 1.0) + 1)


def train_segformer(cfg: SegformerTrainConfig, fault: dict | None = None) -> Path:
    """Fine-tune, evaluate and write `output_dir` (segformer/, metrics.json, preview.png, config.yaml).

    Ray Train's run lives beside the output (`.<output name>-ray/<name>`) until the output is written: re-running
    an interrupted run (the same config) resumes from its last checkpoint; a finished run's is removed, so the
    next run of the config starts afresh. `fault` (tests) crashes a worker once at a step."""
    from ray.train import DataConfig as RayDataConfig
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from facediff.data.stream.dataset import build_dataset
    from facediff.train.placement import WorkerRequest, check_cluster, failure_config, placement_timeout

    if "://" in cfg.output_dir:
        raise ValueError(f"output_dir {cfg.output_dir!r}: train-segformer writes to a filesystem path")
    out = Path(cfg.output_dir).resolve()
    ray_run = out.parent / f".{out.name}-ray" / cfg.name
    recorded = ray_run / "facediff-config.yaml"
    if recorded.is_file() and recorded.read_text() != dump_config(cfg):
        raise ValueError(f"{ray_run}: an interrupted train-segformer run of another config; re-run it with the config "
                         f"in {recorded}, or delete {ray_run} to start this one afresh")
    _init_ray(cfg)
    request = WorkerRequest.of(cfg.num_workers, cfg.use_gpu, cfg.resources_per_worker, key="",
                               timeout_s=cfg.placement_timeout_s)
    check_cluster(request)  # a request no node can hold would wait forever
    train = functools.partial(_train_dataset, cfg.model_dump(mode="json"), str(ray_run))
    train()  # checks the shards now, in the driver, with a readable error (before anything is written)
    ray_run.mkdir(parents=True, exist_ok=True)
    recorded.write_text(dump_config(cfg))
    datasets = {
        "train": train,
        "test": build_dataset(cfg.data, cfg.eval_split, image_size=cfg.image_size, hflip=False),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "fault": fault},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=dict(cfg.resources_per_worker)),
        # the same name and path again: Ray Train V2 restores the run's last checkpoint
        run_config=RunConfig(name=cfg.name, storage_path=str(ray_run.parent),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=failure_config(request, cfg.max_failures)),
        datasets=datasets,
        dataset_config=RayDataConfig(datasets_to_split=["train"]),  # every worker reads the whole test split
    )
    with placement_timeout(request):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"train-segformer {cfg.name}: the run ended without a final checkpoint")
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex}.partial"
    with result.checkpoint.as_directory() as folder:
        shutil.copytree(folder, staging, ignore=shutil.ignore_patterns(
            PROGRESS_WEIGHTS, PROGRESS_OPTIMIZER, checkpoint.STATE_FILE, checkpoint.DATA_FILE.format(rank="*")))
    (staging / "config.yaml").write_text(dump_config(cfg))
    if out.exists():  # replace an earlier output only once the new one is complete
        shutil.rmtree(out)
    os.replace(staging, out)
    shutil.rmtree(ray_run)  # the output is whole: the next run of this config starts afresh
    log.info("train-segformer %s: test mIoU %.4f; wrote %s", cfg.name, result.metrics["miou"], out)
    return out
