"""One image of `prepare coco`, run in the worker processes: person masks, the centre crop, MTCNN face boxes.

Person rule: non-crowd persons are taken in annotation-id order; a person whose COCO box lies entirely outside
the centre square is dropped and the rest are renumbered 1..K, so label k always belongs to `person_boxes[k-1]`
and every listed box has positive area in the square. A listed person may still have no pixel in the map (a
sliver that nearest resampling misses); the manifest counts those. Masks are painted at the source resolution,
crowd first, then persons in order (a later person covers an earlier one where they overlap; persons beyond
254 are painted as crowd), then resized with nearest resampling and cropped like the image. Boxes (COCO's
`bbox` for persons, MTCNN's at the source resolution for faces) are mapped the same way and clipped to the
square; a face box left with no area in it is dropped.

MTCNN's three small networks ship inside the facenet-pytorch package, so nothing is downloaded. Importing it
pulls in torchvision (seconds), so the driver imports it once before the worker pool forks (`preload`) and each
worker builds its own detector once, with one torch thread, in the pool's initializer.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from facediff.data.prepare.celebamask import Skip

CROWD_LABEL = 255
MAX_PERSONS = 254


@dataclass(frozen=True)
class PersonAnnotation:
    id: int
    iscrowd: bool
    bbox: tuple[float, float, float, float]  # COCO's x, y, width, height
    segmentation: Any  # polygons, uncompressed RLE or compressed RLE, as in the file


@dataclass(frozen=True)
class ImageJob:
    split: str
    image_id: int
    file: str
    width: int
    height: int
    persons: tuple[PersonAnnotation, ...]  # annotation-id order


@dataclass(frozen=True)
class Options:
    image_size: int
    min_person_area: float
    face_threshold: float
    detect_faces: bool


@dataclass
class Outcome:
    image_id: int
    split: str
    person_area: float
    record: dict[str, Any] | None = None  # None with skip None: excluded by the area threshold
    skip: Skip | None = None
    stats: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class CenterCrop:
    """Resize the shorter side to `size`, keep the centre `size` square."""

    width: int
    height: int
    size: int

    @property
    def resized(self) -> tuple[int, int]:
        short = min(self.width, self.height)
        return (max(self.size, round(self.width * self.size / short)),
                max(self.size, round(self.height * self.size / short)))

    @property
    def offset(self) -> tuple[int, int]:
        (w, h), s = self.resized, self.size
        return (w - s) // 2, (h - s) // 2

    def image(self, image: Image.Image, resample: Image.Resampling) -> Image.Image:
        left, top = self.offset
        return image.resize(self.resized, resample).crop((left, top, left + self.size, top + self.size))

    def boxes(self, xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Source [x0, y0, x1, y1] boxes -> clipped boxes in the square, and whether each keeps a positive area."""
        (w, h), (left, top) = self.resized, self.offset
        scale = np.array([w / self.width, h / self.height] * 2, np.float64)
        shift = np.array([left, top] * 2, np.float64)
        out = np.clip(np.asarray(xyxy, np.float64).reshape(-1, 4) * scale - shift, 0, self.size)
        keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
        return out.astype(np.float32), keep


# ---------------------------------------------------------------------------------------------- faces
def preload() -> None:
    """Import MTCNN's modules in this process, so workers forked from it start without importing them again."""
    import facenet_pytorch  # noqa: F401


def build_face_detector() -> Any:
    import torch
    from facenet_pytorch import MTCNN

    torch.set_num_threads(1)  # one process per core already; more threads per process only contend
    return MTCNN(keep_all=True, device="cpu")


def detect_faces(detector: Any, image: Image.Image, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Face boxes (N, 4) [x0, y0, x1, y1] in `image` pixels and scores (N,), best first, score >= threshold."""
    boxes, scores = detector.detect(image)
    if boxes is None:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    boxes, scores = np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32).reshape(-1)
    keep = scores >= threshold
    order = np.argsort(-scores[keep], kind="stable")
    return boxes[keep][order], scores[keep][order]


# ------------------------------------------------------------------------------------------- one image
def _rle(segmentation: Any, height: int, width: int) -> dict[str, Any] | None:
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6]  # fewer than 3 points enclose nothing
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width)) if polygons else None
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}


def decode_person_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A polygon or RLE segmentation -> (height, width) bool mask."""
    rle = _rle(segmentation, height, width)
    return mask_utils.decode(rle).astype(bool) if rle is not None else np.zeros((height, width), bool)


def person_area(job: ImageJob) -> float:
    """Share of the image covered by the union of all person masks, crowd regions included."""
    rles = [r for r in (_rle(p.segmentation, job.height, job.width) for p in job.persons) if r is not None]
    if not rles:
        return 0.0
    return float(mask_utils.area(mask_utils.merge(rles, intersect=0))) / (job.width * job.height)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def paint_persons(job: ImageJob, crop: CenterCrop) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """The S x S label map and the kept persons' boxes (K, 4), by the module's person rule."""
    individuals = [p for p in job.persons if not p.iscrowd]
    xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in (p.bbox for p in individuals)]).reshape(-1, 4)
    boxes, inside = crop.boxes(xyxy)
    kept = [p for p, keep in zip(individuals, inside) if keep]
    labels = np.zeros((job.height, job.width), np.uint8)
    for crowd in (p for p in job.persons if p.iscrowd):
        labels[decode_person_mask(crowd.segmentation, job.height, job.width)] = CROWD_LABEL
    for k, person in enumerate(kept, 1):  # beyond the cap a person is still a person: crowd, not background
        labels[decode_person_mask(person.segmentation, job.height, job.width)] = min(k, CROWD_LABEL)
    square = np.asarray(crop.image(Image.fromarray(labels), Image.Resampling.NEAREST))
    listed = min(len(kept), MAX_PERSONS)
    present = set(np.unique(square).tolist())
    stats = {
        "persons_written": listed,
        "persons_outside_crop": len(individuals) - len(kept),
        "persons_over_cap": len(kept) - listed,
        "persons_without_pixels": sum(k not in present for k in range(1, listed + 1)),
        "crowd_regions": len(job.persons) - len(individuals),
    }
    return square, boxes[inside][:listed], stats


def process_image(job: ImageJob, options: Options, detector: Any = None) -> Outcome:
    area = person_area(job)
    outcome = Outcome(job.image_id, job.split, area)
    if area < options.min_person_area:
        return outcome
    if not Path(job.file).is_file():
        outcome.skip = Skip(job.image_id, job.file, "image file missing")
        return outcome
    try:
        with Image.open(job.file) as im:
            im.load()  # decode now: a truncated file fails here, not in training
            image = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        outcome.skip = Skip(job.image_id, job.file, f"corrupt or truncated image: {err}")
        return outcome
    if image.size != (job.width, job.height):
        outcome.skip = Skip(job.image_id, job.file, f"image is {image.size[0]}x{image.size[1]}, the annotation "
                                                    f"says {job.width}x{job.height}")
        return outcome
    crop = CenterCrop(job.width, job.height, options.image_size)
    labels, person_boxes, stats = paint_persons(job, crop)
    faces, scores = np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    if detector is not None:
        faces, scores = detect_faces(detector, image, options.face_threshold)  # at the source size
    face_boxes, inside = crop.boxes(faces)
    stats |= {"face_boxes": int(inside.sum()), "faces_outside_crop": int((~inside).sum()),
              "images_with_faces": int(inside.any())}
    outcome.stats = stats
    outcome.record = {
        "id": job.image_id,
        "image": _encode(crop.image(image, Image.Resampling.LANCZOS), "JPEG"),
        "captions": [],  # filled in by the driver, which holds the captions
        "persons": _encode(Image.fromarray(labels), "PNG"),
        "person_boxes": person_boxes.tolist(),
        "face_boxes": face_boxes[inside].tolist(),
        "face_scores": scores[inside].tolist(),
        "split": job.split,
    }
    return outcome


_WORKER: dict[str, Any] = {}


def init_worker(options: Options) -> None:
    _WORKER["options"] = options
    _WORKER["detector"] = build_face_detector() if options.detect_faces else None


def process_in_worker(job: ImageJob) -> Outcome:
    return process_image(job, _WORKER["options"], _WORKER["detector"])

