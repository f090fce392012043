"""Decoding COCO people shards (`facediff prepare coco`) for the Ray Data loader; `stream.build_dataset` uses it
for every dataset whose manifest says `kind: coco_people`.

Batches hold "id" int64 (B,), "epoch" int64 (B,), "flipped" uint8 (B,), "image" uint8 (B,3,S,S) (float32 in
[-1,1] once finished on the device, see `batch.py`), "persons" uint8 (B,S,S) (0 background, k person k, 255 crowd), "person_boxes" float32 (B,P,4) with
"person_valid" uint8 (B,P), "face_boxes" float32 (B,F,4) with "face_valid" uint8 (B,F) and "face_scores"
float32 (B,F) (boxes [x0, y0, x1, y1] in pixels of the decoded image, padded to the fixed P = MAX_PERSON_BOXES and
F = MAX_FACES so blocks concatenate), and "caption" uint8 (B, CAPTION_BYTES): one caption, UTF-8, zero-padded
(torch holds no strings; `decode_captions` turns it back). The caption is drawn per example per epoch from
(seed, epoch, id), like the flip, so a resumed run draws the same; evaluation (a fixed epoch) always draws the
same one per record. A flip mirrors image, person map and boxes together. The loss builds per-person masks on
the GPU from the person map (`losses.person_masks`): no per-sample work there.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from facediff.data.stream.bad_records import bad_record, keep_rows, report

MAX_FACES = 8
MAX_PERSON_BOXES = 16
CAPTION_BYTES = 256
COCO_KIND = "coco_people"


def _boxes(rows, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Padded (B, limit, 4) float32 boxes and a (B, limit) validity mask from a column of box lists."""
    out = np.zeros((len(rows), limit, 4), dtype=np.float32)
    valid = np.zeros((len(rows), limit), dtype=np.uint8)
    for i, row in enumerate(rows):
        boxes = np.asarray([np.asarray(b, dtype=np.float32) for b in row] if row is not None and len(row) else
                           np.zeros((0, 4)), dtype=np.float32).reshape(-1, 4)[:limit]
        out[i, : len(boxes)] = boxes
        valid[i, : len(boxes)] = 1
    return out, valid


def _scores(rows, limit: int) -> np.ndarray:
    out = np.zeros((len(rows), limit), dtype=np.float32)
    for i, row in enumerate(rows):
        values = np.asarray(row if row is not None else [], dtype=np.float32)[:limit]
        out[i, : len(values)] = values
    return out


def encode_captions(captions: list[str]) -> np.ndarray:
    out = np.zeros((len(captions), CAPTION_BYTES), dtype=np.uint8)
    for i, text in enumerate(captions):
        data = text.encode("utf-8")[:CAPTION_BYTES]
        out[i, : len(data)] = np.frombuffer(data, dtype=np.uint8)
    return out


def decode_captions(encoded) -> list[str]:
    """The captions of a batch's "caption" column (tensor or array); a cut multi-byte character is dropped."""
    array = np.asarray(encoded.cpu() if hasattr(encoded, "cpu") else encoded, dtype=np.uint8)
    return [bytes(row).rstrip(b"\0").decode("utf-8", errors="ignore") for row in array]


def draw_captions(ids: np.ndarray, captions, *, seed: int, epochs: np.ndarray) -> list[str]:
    """One caption per record, a function of (seed, epoch, id) only (`epochs`: each record's data epoch)."""
    drawn = []
    for i, epoch, options in zip(ids, epochs, captions):
        options = list(options) if options is not None else []
        if not options:
            drawn.append("")
            continue
        drawn.append(str(options[np.random.default_rng([seed, int(epoch), int(i), 1]).integers(len(options))]))
    return drawn


def decode_coco_batch(batch: dict[str, np.ndarray], *, image_size: int, hflip: bool, seed: int, epochs: np.ndarray,
                      flip_decisions, bad_records=None, latents: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Decode one batch of COCO people rows at `image_size` (see the module docstring for the columns);
    `epochs` (B,) int64: each row's data epoch. A row that does not decode is left out, logged and counted
    (`bad_records.py`). `latents` (B, C, h, w): the rows' cached latents (flipped rows' already the mirrored
    image's), returned as "latents" beside the pixels (`data.use_latents`)."""
    ids = np.array(batch["id"], dtype=np.int64)
    n, s = len(ids), image_size
    images = np.empty((n, s, s, 3), dtype=np.uint8)
    persons = np.empty((n, s, s), dtype=np.uint8)
    scale = np.ones(n, dtype=np.float32)
    keep, bad = np.ones(n, dtype=bool), []
    for row, (image_bytes, persons_bytes) in enumerate(zip(batch["image"], batch["persons"])):
        try:
            image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
            label = Image.open(io.BytesIO(persons_bytes))
            if label.mode not in ("L", "P"):
                raise ValueError(f"persons must be a single-channel label PNG, got mode {label.mode!r}")
            scale[row] = s / image.width
            if image.size != (s, s):
                resample = Image.Resampling.LANCZOS if image.width > s else Image.Resampling.BICUBIC
                image = image.resize((s, s), resample)
            if label.size != (s, s):
                label = label.resize((s, s), Image.Resampling.NEAREST)  # never blend labels
            images[row], persons[row] = np.asarray(image), np.asarray(label)
        except Exception as err:  # noqa: BLE001 - whatever a corrupt record raises, the record is skipped
            keep[row] = False
            bad.append(bad_record(batch, row, ids, err))
    report(bad, bad_records)
    person_boxes, person_valid = _boxes(batch["person_boxes"], MAX_PERSON_BOXES)
    face_boxes, face_valid = _boxes(batch["face_boxes"], MAX_FACES)
    face_scores = _scores(batch["face_scores"], MAX_FACES)
    person_boxes *= scale[:, None, None]
    face_boxes *= scale[:, None, None]

    flip = flip_decisions(ids, seed=seed, epoch=epochs) if hflip else np.zeros(n, dtype=bool)
    if flip.any():
        images[flip] = images[flip, :, ::-1]
        persons[flip] = persons[flip, :, ::-1]
        for boxes, valid in ((person_boxes, person_valid), (face_boxes, face_valid)):
            mirrored = boxes[flip].copy()
            mirrored[..., 0], mirrored[..., 2] = s - boxes[flip][..., 2], s - boxes[flip][..., 0]
            boxes[flip] = mirrored * valid[flip][..., None]  # padding stays all-zero
    out = {
        "id": ids,
        "epoch": epochs,
        "flipped": flip.astype(np.uint8),
        "image": np.ascontiguousarray(images.transpose(0, 3, 1, 2)),  # uint8, made float on the device
        "persons": persons,
        "person_boxes": person_boxes,
        "person_valid": person_valid,
        "face_boxes": face_boxes,
        "face_valid": face_valid,
        "face_scores": face_scores,
        "caption": encode_captions(draw_captions(ids, batch["captions"], seed=seed, epochs=epochs)),
    }
    if latents is not None:
        out["latents"] = latents
    return keep_rows(out, keep)
