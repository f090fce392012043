"""SegFormer as `train-segformer` trains and scores it: the network over the face image, the labels, and IoU.

The network is transformers' `SegformerForSemanticSegmentation` over the face image (3 channels, normalised like
SegFormer's RGB input). Its encoder comes from `model` (a preset and/or pretrained weights, e.g. the ADE20k b0
checkpoint, through `build_from_ref`); the decode head is new, since its classifier must predict G+1 classes
(0 = background and every part outside the groups, g = the g-th configured group) and ADE's head was trained for
150 scene classes. Labels come from the stored 19-class label map: where custom groups share a part, the later
group wins; parts themselves never overlap there (the map was painted in PART_NAMES order, later parts on top).

IoU is per group over the whole split (intersection and union pixel counts summed over batches and ranks), never
a mean of per-batch IoUs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from facediff.config.schema import PretrainedRef
from facediff.data.celebamask import NUM_PART_CLASSES, PART_LABELS
from facediff.models.segformer import IMAGE_MEAN, IMAGE_STD, group_palette
from facediff.data.hashing import owned_by
from facediff.train.distributed import sum_across_ranks


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
