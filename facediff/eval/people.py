"""A people-specific measure beside FID (paper 2 notes FID misses faces): how often MTCNN finds a face in the
generated images, its mean confidence, and a Fréchet distance on face crops, generated vs real.

    people = PeopleMetric(ImageDistance(...))   # the same feature choice as the image distance (FID or ONet)
    people.update_real(images, face_boxes, face_valid)   # real crops at the dataset's face boxes
    people.update_fake(generated)                         # MTCNN on each image; its best face is cropped
    people.compute() -> {"face_rate", "face_confidence", "face_<fid|fd_mtcnn_onet>"}

Counts are torchmetrics states summed across ranks and the crop distance is an `ImageDistance`, so `compute()`
is a collective under torch.distributed, like the image distance. The face distance is NaN until both sides
have at least two crops (over all ranks).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from facediff.eval.metrics import ImageDistance, to_uint8
from facediff.losses import face_crops

CROP_SIZE = 96  # face crops are resized to this before the feature network (which resizes again as it needs)


class PeopleMetric(Metric):
    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, crop_distance: ImageDistance, threshold: float = 0.9, **kwargs):
        super().__init__(**kwargs)
        from facenet_pytorch import MTCNN

        self.detector = MTCNN(keep_all=True, device="cpu")  # moved with the metric's device in `_detector`
        self.threshold = threshold
        self.crop_distance = crop_distance
        for name in ("images", "with_face", "confidence"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _detect(self, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Per image the best face box (4,) and its score (0 and a zero box when none passes the threshold)."""
        if self.detector.device != self.device:
            self.detector = self.detector.to(self.device)
            self.detector.device = self.device
        pixels = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
        boxes = np.zeros((len(pixels), 4), np.float32)
        scores = np.zeros(len(pixels), np.float32)
        for i, image in enumerate(pixels):  # MTCNN batches only images of one size; one call per image is clear
            found, probs = self.detector.detect(image)
            if found is None:
                continue
            best = int(np.argmax(probs))
            if probs[best] >= self.threshold:
                boxes[i], scores[i] = found[best], probs[best]
        return boxes, scores

    @torch.no_grad()
    def update_real(self, images: Tensor, face_boxes: Tensor, face_valid: Tensor) -> None:
        valid = face_valid.bool().to(images.device)
        if valid.any():
            crops = face_crops(images.float(), face_boxes.float().to(images.device), valid, CROP_SIZE)
            self.crop_distance.update_real(crops.clamp(-1, 1))

    def update_fake(self, images: Tensor) -> None:
        self.update(images)

    @torch.no_grad()
    def update(self, images: Tensor) -> None:
        """The generated side (torchmetrics' update, which counts the calls)."""
        boxes, scores = self._detect(images)
        found = scores > 0
        self.images += len(images)
        self.with_face += float(found.sum())
        self.confidence += float(scores[found].sum())
        if found.any():
            rows = torch.from_numpy(np.nonzero(found)[0])
            crops = face_crops(images.float()[rows.to(images.device)],
                               torch.from_numpy(boxes[found]).unsqueeze(1).to(images.device),
                               torch.ones(int(found.sum()), 1, dtype=torch.bool, device=images.device), CROP_SIZE)
            self.crop_distance.update_fake(crops.clamp(-1, 1))

    def compute(self) -> dict[str, float]:
        images, with_face = float(self.images), float(self.with_face)
        try:  # every rank calls it (a collective); torchmetrics checks the gathered counts, so all ranks agree
            with warnings.catch_warnings():  # "compute before update" when no generated image had a face
                warnings.simplefilter("ignore", UserWarning)
                distance = self.crop_distance.compute()
        except RuntimeError:  # fewer than two crops on a side, summed over ranks
            distance = math.nan
        return {"face_rate": with_face / images if images else math.nan,
                "face_confidence": float(self.confidence) / with_face if with_face else math.nan,
                f"face_{self.crop_distance.name}": distance}

    def reset_fake(self) -> None:
        self.reset()
        self.crop_distance.reset_fake()
