"""Mask adherence of part-mask-conditioned models (`lc_unet` with `model.mask_encoder`, e.g. lc_unet_3_seg): do the
generated faces put their parts where the conditioning masks say?

A part segmenter (a SegFormer fine-tuned by `facediff train-segformer` on the same `data.part_groups`, named by
`eval.mask_segmenter` or `facediff evaluate --segmenter`) segments every generated face, and its prediction is
scored against the masks that face was conditioned on: `mask_miou`, the mean over the part groups of IoU pooled
over all samples (train-segformer's `IoUCounter`: background reported, not averaged; a group in neither
prediction nor mask left out). Beside it, the same segmenter on the real faces of the split against their own
masks: `mask_miou_real`, the ceiling, so a low number can be read as the model's fault or the segmenter's. It
rides on the evaluation's own samples (`evaluate_task`'s `mask_metric`): no image is drawn for it alone.

It lives in `runs/` because the segmenter code is the trainer's (`train/segmentation.py`), which `eval/` may not
import; so only `facediff evaluate` measures it, not the in-training evaluations.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from facediff.config.schema import ExperimentConfig
from facediff.models.segformer import masks_to_labels
from facediff.train.segmentation import IoUCounter, predict

KEY = "eval.mask_segmenter"
MODEL_DIR = "segformer"  # train-segformer's save_pretrained folder inside its run folder (train/segformer.py)
TRAIN_HINT = ("train one with `facediff train-segformer` (docs/families.md) on the model's data.part_groups and "
              "give its run folder")


def segmenter_folder(path: str) -> Path:
    """The `save_pretrained` folder: `path` itself, or `path/segformer` for a train-segformer run folder."""
    if "://" in path:
        raise ValueError(f"{KEY}: {path}: a remote run; copy its {MODEL_DIR}/ folder here and give that path")
    given = Path(path).expanduser()
    if not given.exists():
        raise ValueError(f"{KEY}: {given} does not exist; {TRAIN_HINT}")
    for folder in (given, given / MODEL_DIR):
        if (folder / "config.json").is_file():
            return folder
    raise ValueError(f"{KEY}: {given} is neither a train-segformer run folder ({MODEL_DIR}/config.json) nor a "
                     f"saved SegFormer (config.json); {TRAIN_HINT}")


def _trained_on(folder: Path) -> dict:
    """What the run folder recorded about the segmenter (groups, test mIoU, image size), where it has it."""
    run, found = folder.parent, {}
    if (run / "metrics.json").is_file():
        metrics = json.loads((run / "metrics.json").read_text())
        found = {"groups": metrics.get("groups"), "test_miou": metrics.get("miou")}
    if (run / "config.yaml").is_file():
        import yaml

        recorded = yaml.safe_load((run / "config.yaml").read_text()) or {}
        found["image_size"] = (recorded.get("data") or {}).get("image_size")
    return {k: v for k, v in found.items() if v is not None}


class MaskAdherence:
    """Segment images and count IoU against part-group masks, separately for real and generated images."""

    def __init__(self, segmenter, names: list[str], source: dict):
        self.segmenter, self.names, self.source = segmenter.eval().requires_grad_(False), names, source
        self.real, self.fake = IoUCounter(len(names)), IoUCounter(len(names))

    @torch.no_grad()
    def _count(self, counter: IoUCounter, images: Tensor, part_masks: Tensor) -> None:
        device = next(self.segmenter.parameters()).device
        target = masks_to_labels(part_masks.to(device))  # 0 background, g = the g-th group (the later one wins)
        images = images.to(device=device, dtype=torch.float32)
        if target.shape[-2:] != images.shape[-2:]:
            target = torch.nn.functional.interpolate(target[:, None].float(), size=images.shape[-2:],
                                                     mode="nearest")[:, 0].long()
        counter.update(predict(self.segmenter, images), target)

    def update_real(self, images: Tensor, part_masks: Tensor) -> None:
        self._count(self.real, images, part_masks)

    def update_fake(self, images: Tensor, part_masks: Tensor) -> None:
        """Generated images (B, 3, S, S) in [-1, 1] and the (B, G, S, S) masks they were conditioned on."""
        self._count(self.fake, images, part_masks)

    def compute(self) -> dict[str, float | None]:
        fake, real = self.fake.result(self.names), self.real.result(self.names)
        return {"mask_miou": fake["miou"], "mask_miou_real": real["miou"],
                **{f"mask_iou/{name}": v for name, v in fake["iou"].items() if name != self.names[0]}}

    def reset_fake(self) -> None:
        self.fake = IoUCounter(len(self.names))


def build_mask_adherence(cfg: ExperimentConfig, device: torch.device | str) -> MaskAdherence | None:
    """The metric when `eval.mask_segmenter` is set (None otherwise); one line naming the key when the model has no
    masks to adhere to, or the segmenter is missing or segments other groups than the model is conditioned on."""
    path = cfg.eval.mask_segmenter
    if path is None:
        return None
    if cfg.model.family != "lc_unet" or cfg.model.mask_encoder is None:
        raise ValueError(f"{KEY}: the model ({cfg.name}, family {cfg.model.family}) is not conditioned on part "
                         "masks (model.mask_encoder); mask adherence applies to mask models such as lc_unet_3_seg: "
                         f"remove {KEY} / --segmenter")
    folder = segmenter_folder(path)
    groups = cfg.data.resolved_part_groups()
    names = ["background", *groups]
    from transformers import SegformerForSemanticSegmentation

    try:
        segmenter = SegformerForSemanticSegmentation.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ValueError(f"{KEY}: {folder} could not be loaded as a SegFormer ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); {TRAIN_HINT}") from None
    labels = [segmenter.config.id2label[i] for i in range(segmenter.config.num_labels)]
    recorded = _trained_on(folder)
    parts = {k: list(v) for k, v in groups.items()}
    if labels != names or recorded.get("groups", parts) != parts:
        theirs = recorded.get("groups") or labels[1:]
        raise ValueError(f"{KEY}: {folder} segments {theirs}, but the model is conditioned on data.part_groups "
                         f"{parts}; {TRAIN_HINT}")
    source = {"path": str(folder), **recorded}
    return MaskAdherence(segmenter.to(device), names, source)

