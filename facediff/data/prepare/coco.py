"""`facediff prepare coco`: the official COCO 2017 release -> people-centred Parquet shards + manifest.json.

Reads `ROOT/{split}2017/{id:012d}.jpg`, `ROOT/annotations/instances_{split}2017.json` and
`captions_{split}2017.json` for each split asked for (train and val by default). Person keypoint files are not
read: face boxes come from MTCNN alone. An image is kept when the union of its person masks (crowd regions
included) covers at least `min_person_area` of the source image; the others are counted, never written.

Shards `OUT/{split}/part-*.parquet` (COCO_SHARD_SCHEMA), all in the stored S x S square:

    id            int64                       the COCO image id
    image         binary                      JPEG, S x S RGB: shorter side resized to S, centre square cropped
    captions      list<string>                every caption of the image, ordered by caption annotation id
    persons       binary                      PNG uint8 S x S label map: 0 background, k the k-th person listed
                                              in person_boxes, 255 crowd regions (and persons beyond 254)
    person_boxes  list<fixed list<float32>[4]> [x0, y0, x1, y1] per non-crowd person, annotation-id order
    face_boxes    list<fixed list<float32>[4]> [x0, y0, x1, y1] per MTCNN face, best score first
    face_scores   list<float32>               MTCNN's score of each face box
    split         string                      "train" | "val"

Person rule and geometry: see `facediff/data/prepare/coco_faces.py`, which does the per-image work in the workers.
Output is written to a hidden sibling folder and moved into OUT only when every split is done, so a failed
run leaves an earlier dataset in OUT as it was.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from facediff.data.prepare import coco_faces
from facediff.data.prepare.annotations import AnnotationError
from facediff.data.prepare.coco_faces import CROWD_LABEL, ImageJob, Options, PersonAnnotation
from facediff.data.prepare.celebamask import DatasetLayoutError
from facediff.data.shards import MANIFEST, SCHEMA_VERSION, ShardWriter, write_manifest
from facediff.data.staging import check_at_least, refuse_existing, require_records, staged_output

log = logging.getLogger(__name__)

KIND = "coco_people"
SPLIT_NAMES = ("train", "val")
PERSON_CATEGORY_ID = 1
DEFAULT_MIN_PERSON_AREA = 0.1
DEFAULT_FACE_THRESHOLD = 0.9
AREA_STEPS = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
BOX = pa.list_(pa.float32(), 4)
COCO_SHARD_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("image", pa.binary()),
        ("captions", pa.list_(pa.string())),
        ("persons", pa.binary()),
        ("person_boxes", pa.list_(BOX)),
        ("face_boxes", pa.list_(BOX)),
        ("face_scores", pa.list_(pa.float32())),
        ("split", pa.string()),
    ]
)


class CocoAnnotationError(AnnotationError):
    """A malformed COCO annotation file; the message names the file (and the entry)."""


def image_path(root: Path, split: str, image_id: int) -> Path:
    return Path(root) / f"{split}2017" / f"{image_id:012d}.jpg"


def instances_path(root: Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}2017.json"


def captions_path(root: Path, split: str) -> Path:
    return Path(root) / "annotations" / f"captions_{split}2017.json"


# ------------------------------------------------------------------------------------------ annotations
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: required annotation file not found")
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as err:
        raise CocoAnnotationError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    except UnicodeDecodeError as err:
        raise CocoAnnotationError(f"{path}: not a text file ({err})") from None
    if not isinstance(data, dict):
        raise CocoAnnotationError(f"{path}: expected a JSON object at the top, got {type(data).__name__}")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise CocoAnnotationError(f"{path}: no {key!r} list")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_images(path: Path, data: dict[str, Any]) -> dict[int, dict[str, Any]]:
    images = {}
    for i, entry in enumerate(data["images"]):
        ok = isinstance(entry, dict) and _is_int(entry.get("id")) and isinstance(entry.get("file_name"), str)
        if not ok or not all(_is_int(entry.get(k)) and entry[k] > 0 for k in ("width", "height")):
            raise CocoAnnotationError(f"{path}: images[{i}] needs an integer id, file_name, width and height")
        if entry["id"] in images:
            raise CocoAnnotationError(f"{path}: images[{i}]: image id {entry['id']} listed twice")
        images[entry["id"]] = entry
    return images


def _person(path: Path, i: int, ann: dict[str, Any], image: dict[str, Any] | None) -> PersonAnnotation:
    where = f"{path}: annotations[{i}] (id {ann.get('id')!r})"
    if image is None:
        raise CocoAnnotationError(f"{where}: image_id {ann.get('image_id')!r} is not in the file's images")
    if not _is_int(ann.get("id")) or ann.get("iscrowd", 0) not in (0, 1):
        raise CocoAnnotationError(f"{where}: needs an integer id and iscrowd 0 or 1")
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox)) and min(bbox[2:]) >= 0):
        raise CocoAnnotationError(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        if not all(isinstance(p, list) and len(p) % 2 == 0 and all(map(_is_number, p)) for p in seg):
            raise CocoAnnotationError(f"{where}: polygons must be lists of x, y numbers")
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), (list, str)):
        if seg.get("size") != [image["height"], image["width"]]:
            raise CocoAnnotationError(f"{where}: RLE size {seg.get('size')!r} is not the image's "
                                      f"[{image['height']}, {image['width']}]")
        if isinstance(seg["counts"], list) and (not all(map(_is_int, seg["counts"]))
                                                or sum(seg["counts"]) != image["height"] * image["width"]):
            raise CocoAnnotationError(f"{where}: RLE counts must be integers summing to height x width")
    else:
        raise CocoAnnotationError(f"{where}: segmentation must be polygons or RLE, got {type(seg).__name__}")
    return PersonAnnotation(ann["id"], bool(ann.get("iscrowd", 0)), tuple(float(v) for v in bbox), seg)


def load_split(root: Path, split: str) -> tuple[list[ImageJob], dict[int, list[str]], int]:
    """A split's images with person annotations (as jobs, by image id), captions by image, and images without."""
    folder = Path(root) / f"{split}2017"
    path, caption_file = instances_path(root, split), captions_path(root, split)
    for required in (path, caption_file):
        if not required.is_file():
            raise DatasetLayoutError(f"{required}: required annotation file for split {split!r} not found")
    if not folder.is_dir():
        raise DatasetLayoutError(f"{folder}: image folder for split {split!r} not found")
    data = _read_json(path)
    images = _read_images(path, data)
    categories = data.get("categories") if isinstance(data.get("categories"), list) else []
    if not any(isinstance(c, dict) and c.get("name") == "person" and c.get("id") == PERSON_CATEGORY_ID
               for c in categories):
        raise CocoAnnotationError(f"{path}: no category 'person' with id {PERSON_CATEGORY_ID} in 'categories'")
    persons: dict[int, list[PersonAnnotation]] = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise CocoAnnotationError(f"{path}: annotations[{i}] is not an object")
        if ann.get("category_id") == PERSON_CATEGORY_ID:
            person = _person(path, i, ann, images.get(ann.get("image_id")))
            persons.setdefault(ann["image_id"], []).append(person)
    del data  # the full instances file is large; keep only the people

    captions: dict[int, list[tuple[int, str]]] = {}
    for i, ann in enumerate(_read_json(caption_file)["annotations"]):
        if not (isinstance(ann, dict) and _is_int(ann.get("id")) and isinstance(ann.get("caption"), str)):
            raise CocoAnnotationError(f"{caption_file}: annotations[{i}] needs an integer id and a caption string")
        if ann.get("image_id") not in images:
            raise CocoAnnotationError(f"{caption_file}: annotations[{i}]: image_id {ann.get('image_id')!r} "
                                      f"is not in {path.name}")
        captions.setdefault(ann["image_id"], []).append((ann["id"], ann["caption"].strip()))
    jobs = [
        ImageJob(split, image_id, str(folder / images[image_id]["file_name"]), images[image_id]["width"],
                 images[image_id]["height"], tuple(sorted(persons[image_id], key=lambda p: p.id)))
        for image_id in sorted(persons)
    ]
    ordered = {i: [text for _, text in sorted(c)] for i, c in captions.items()}
    return jobs, ordered, len(images) - len(persons)


# ----------------------------------------------------------------------------------------------- driver
class _Tally:
    """One split's outcomes, summed for the manifest."""

    def __init__(self) -> None:
        self.below = 0
        self.skipped: list[dict[str, Any]] = []
        self.areas: list[float] = []
        self.stats: dict[str, int] = {}

    def add(self, r: coco_faces.Outcome) -> None:
        self.areas.append(r.person_area)
        if r.skip is not None:
            log.warning("skipping %s image %d: %s (%s)", r.split, r.image_id, r.skip.reason, r.skip.file)
            self.skipped.append({"id": r.image_id, "split": r.split, "file": r.skip.file, "reason": r.skip.reason})
        elif r.record is None:
            self.below += 1
        for key, value in r.stats.items():
            self.stats[key] = self.stats.get(key, 0) + value

    def area_table(self) -> dict[str, int]:
        """How many images with people would pass each threshold: pick one for a wanted count in one run."""
        areas = np.asarray(self.areas)
        return {str(t): int((areas >= t).sum()) for t in AREA_STEPS}


def prepare_coco(
    root: str | Path,
    out: str | Path,
    *,
    splits: tuple[str, ...] | list[str] = SPLIT_NAMES,
    image_size: int = 512,
    min_person_area: float = DEFAULT_MIN_PERSON_AREA,
    face_threshold: float = DEFAULT_FACE_THRESHOLD,
    detect_faces: bool = True,
    rows_per_shard: int = 1000,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the selected people images of each split as shards plus the manifest; returns the manifest."""
    root, out = Path(root), Path(out)
    start = time.time()
    splits = list(dict.fromkeys(splits))
    unknown = [s for s in splits if s not in SPLIT_NAMES]
    if not splits or unknown:
        raise ValueError(f"splits must be a non-empty subset of {list(SPLIT_NAMES)}, got {splits}")
    check_at_least(("--image-size", image_size, 8), ("--rows-per-shard", rows_per_shard, 1),
                   ("--workers", workers, 1))
    for option, value in (("--min-person-area", min_person_area), ("--face-threshold", face_threshold)):
        if not 0 <= value <= 1:
            raise ValueError(f"{option} {value}: must be in [0, 1]")
    refuse_existing(out, overwrite)
    loaded = {split: load_split(root, split) for split in splits}
    annotations_s = time.time() - start

    options = Options(image_size, min_person_area, face_threshold, detect_faces)
    if detect_faces:
        coco_faces.preload()
    jobs = [job for split in splits for job in loaded[split][0]]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    tallies = {split: _Tally() for split in splits}
    images_start = time.time()
    with staged_output(out, (*SPLIT_NAMES, MANIFEST)) as staging:
        writers = {split: ShardWriter(staging, split, rows_per_shard, schema=COCO_SHARD_SCHEMA) for split in splits}
        with ProcessPoolExecutor(workers, initializer=coco_faces.init_worker, initargs=(options,)) as pool:
            try:
                chunk = max(1, min(16, len(jobs) // (8 * workers)))
                results = pool.map(coco_faces.process_in_worker, jobs, chunksize=chunk)
                for r in tqdm(results, total=len(jobs), desc="prepare coco", unit="img", disable=not progress):
                    if r.record is not None:
                        r.record["captions"] = loaded[r.split][1].get(r.image_id, [])
                        writers[r.split].write(r.record)
                    tallies[r.split].add(r)
            except BaseException:
                pool.shutdown(cancel_futures=True)  # do not finish thousands of queued images first
                raise
        shards = {split: writer.close() for split, writer in writers.items()}
        images_s = time.time() - images_start
        counts = {split: sum(f["rows"] for f in shards[split]) for split in splits}
        if min_person_area < 1:  # 1 is the calibration pass: an empty dataset is what it asks for
            require_records(counts, str(root), "images with people per --min-person-area: " + "; ".join(
                f"{s} {tallies[s].area_table()}" for s in splits) + "; lower --min-person-area or check --splits")
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "kind": KIND,
            "source": str(root.resolve()),
            "image_size": image_size,
            "image_format": "jpeg",
            "splits": splits,
            "counts": counts,
            "images_listed": {s: len(loaded[s][0]) + loaded[s][2] for s in splits},
            "excluded": {s: {"no_person": loaded[s][2], "below_min_person_area": tallies[s].below,
                             "skipped": len(tallies[s].skipped)} for s in splits},
            "person_area_at_least": {s: tallies[s].area_table() for s in splits},
            "stats": {s: tallies[s].stats for s in splits},
            "label_map": {"0": "background", "1..254": "k-th entry of person_boxes", str(CROWD_LABEL): "crowd"},
            "options": {"splits": splits, "image_size": image_size, "min_person_area": min_person_area,
                        "face_threshold": face_threshold, "detect_faces": detect_faces, "face_detector": "MTCNN",
                        "rows_per_shard": rows_per_shard, "workers": workers},
            "shards": shards,
            "skipped": [entry for s in splits for entry in tallies[s].skipped],
            "timing": {"annotations_s": round(annotations_s, 2), "images_s": round(images_s, 2)},
            "seconds": round(time.time() - start, 1),
            "images_per_second": round(sum(counts.values()) / max(images_s, 1e-9), 2),
        }
        write_manifest(staging, manifest)
    if manifest["skipped"]:
        log.warning("skipped %d images; listed in %s", len(manifest["skipped"]), out / MANIFEST)
    return manifest
