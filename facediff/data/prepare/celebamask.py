"""`facediff prepare celebamask`: the official CelebAMask-HQ release -> Parquet shards + manifest.json.

Work is split by image over a process pool; each worker decodes one image and its part masks, paints the
19-class label map, resizes and re-encodes, or reports why the record must be skipped. Nothing bad is dropped
silently: every skip is logged, counted and listed in the manifest with its file and reason.
"""

from __future__ import annotations

import io
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from facediff.data import celebamask
from facediff.data.prepare import annotations
from facediff.data.shards import MANIFEST, SCHEMA_VERSION, SPLITS, ShardWriter, write_manifest
from facediff.data.staging import check_at_least, refuse_existing, require_records, staged_output

log = logging.getLogger(__name__)
SOURCE_SIZES = "source_sizes"


class DatasetLayoutError(FileNotFoundError):
    """A required folder or file of the release is missing; the message names it."""


@dataclass(frozen=True)
class Skip:
    image_id: int
    file: str
    reason: str


# ------------------------------------------------------------------------------------------------ splits
def default_test_size(num_images: int, requested: int) -> int:
    """The requested test size, scaled down to a tenth of the data for tiny inputs (at least 1)."""
    return max(1, min(requested, num_images // 10))


def assign_splits(
    ids: list[int], test_pool: list[int] | None, test_size: int, train_size: int | None, seed: int
) -> dict[str, list[int]]:
    """A fixed test set and a training set drawn from the rest, both deterministic in `seed`.

    The test set does not depend on `train_size`, and a smaller training regime is a prefix of a larger one,
    so 2.7k and 27k runs are evaluated on the same faces and the small set is a subset of the large one.
    When the official partition is known, `test_pool` is its test images and none of them is ever trained on.
    """
    ids = sorted(ids)
    pool = sorted(test_pool) if test_pool is not None else ids
    k = default_test_size(len(ids), test_size)
    if k > len(pool):
        raise ValueError(f"test set of {k} images requested but only {len(pool)} candidates")
    test = sorted(np.random.default_rng([seed, 0]).permutation(pool)[:k].tolist())
    excluded = set(pool) if test_pool is not None else set(test)
    rest = [i for i in ids if i not in excluded]
    order = np.random.default_rng([seed, 1]).permutation(rest).tolist()
    if train_size is not None and train_size > len(order):
        raise ValueError(f"--train-size {train_size} but only {len(order)} images remain after the test split")
    train = sorted(order[:train_size] if train_size is not None else order)
    return {"train": train, "test": test}


# ------------------------------------------------------------------------------------------- one record
def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.save(buf, format="JPEG", quality=95)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def load_label_map(root: Path, image_id: int) -> np.ndarray | Skip:
    """Paint the per-part binary masks of one image into a 19-class map at the masks' own resolution."""
    masks: dict[str, np.ndarray] = {}
    shape = None
    for part in celebamask.PART_NAMES:
        path = celebamask.mask_path(root, image_id, part)
        if not path.is_file():
            continue  # a part may be absent
        try:
            with Image.open(path) as im:
                mask = np.asarray(im.convert("L")) > 127  # masks come 1- or 3-channel
        except (OSError, ValueError) as err:
            return Skip(image_id, str(path), f"unreadable mask: {err}")
        if shape is not None and mask.shape != shape:
            return Skip(image_id, str(path), f"mask size {mask.shape} differs from the other parts' {shape}")
        shape = mask.shape
        masks[part] = mask
    if not masks:
        folder = celebamask.mask_path(root, image_id, "x").parent
        return Skip(image_id, str(folder / f"{image_id:05d}_*.png"), "no part mask files found")
    return celebamask.paint_label_map(masks, shape)


def process_record(
    root: Path, image_id: int, attributes: np.ndarray, split: str, image_size: int, mask_size: int, image_format: str
) -> dict[str, Any] | Skip:
    path = celebamask.image_path(root, image_id)
    if not path.is_file():
        return Skip(image_id, str(path), "image file missing")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later in training
            image = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return Skip(image_id, str(path), f"corrupt or truncated image: {err}")
    label_map = load_label_map(root, image_id)
    if isinstance(label_map, Skip):
        return label_map
    source_sizes = {"image": image.size, "mask": (label_map.shape[1], label_map.shape[0])}  # (width, height)
    image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
    parts = Image.fromarray(label_map).resize((mask_size, mask_size), Image.Resampling.NEAREST)
    return {
        "id": image_id,
        "image": _encode(image, image_format),
        "parts": _encode(parts, "png"),
        "attributes": attributes.tolist(),
        "split": split,
        SOURCE_SIZES: source_sizes,  # for the manifest; not a shard column (the driver pops it)
    }


class SourceSizes:
    """The release's image and mask sizes as read, and how many records `prepare` stored larger than that.

    A 64 px release prepared at the default `--image-size 256` holds no more detail than at 64 px, yet costs 16x
    the pixels to decode and looks like a 256 px dataset: the manifest says so and the driver warns once."""

    def __init__(self, image_size: int, mask_size: int):
        self.target = {"image": image_size, "mask": mask_size}
        self.counts: dict[str, Counter[tuple[int, int]]] = {"image": Counter(), "mask": Counter()}

    def add(self, sizes: dict[str, tuple[int, int]]) -> None:
        for kind, size in sizes.items():
            self.counts[kind][size] += 1

    def smaller(self, kind: str) -> dict[tuple[int, int], int]:
        """Source sizes with a side short of the stored square: their pixels were interpolated."""
        return {size: n for size, n in sorted(self.counts[kind].items()) if min(size) < self.target[kind]}

    def manifest_entry(self) -> dict[str, Any]:
        name = lambda size: f"{size[0]}x{size[1]}"  # noqa: E731
        return {
            "source_sizes": {kind: {name(s): n for s, n in sorted(c.items())} for kind, c in self.counts.items()},
            "upsampled": {"images": sum(self.smaller("image").values()),
                          "masks": sum(self.smaller("mask").values())},
        }

    def warning(self) -> str | None:
        """One line when images were enlarged (masks are often stored larger on purpose, by nearest neighbour)."""
        smaller = self.smaller("image")
        if not smaller:
            return None
        size, total = self.target["image"], sum(self.counts["image"].values())
        return (f"{sum(smaller.values())} of {total} images were upsampled from "
                f"{', '.join(f'{w}x{h}' for w, h in smaller)} to {size}x{size}: the source is smaller than "
                f"--image-size {size}, so the shards hold no more detail than it (manifest.json: 'upsampled', "
                "'source_sizes')")


def _process_star(args: tuple) -> dict[str, Any] | Skip:
    return process_record(*args)


# ------------------------------------------------------------------------------------------------ driver
def check_options(*, image_size: int, mask_size: int, rows_per_shard: int, test_size: int,
                  train_size: int | None, image_format: str, workers: int | None) -> None:
    """Every option of `prepare celebamask`, before anything is read or written (names as on the CLI)."""
    # --test-size 0 is refused rather than read as "no test split": evaluation and `sample --from-test` need one
    check_at_least(("--image-size", image_size, 8), ("--mask-size", mask_size, 8), ("--test-size", test_size, 1),
                   ("--train-size", train_size, 1), ("--rows-per-shard", rows_per_shard, 1), ("--workers", workers, 1))
    if image_format not in ("jpeg", "png"):
        raise ValueError(f"--image-format must be jpeg or png, got {image_format!r}")


def check_layout(root: Path) -> None:
    for name in (celebamask.IMAGE_DIR, celebamask.MASK_DIR):
        if not (root / name).is_dir():
            raise DatasetLayoutError(f"{root / name}: required folder not found (is {root} a CelebAMask-HQ root?)")
    if not (root / celebamask.ATTRIBUTE_FILE).is_file():
        raise DatasetLayoutError(f"{root / celebamask.ATTRIBUTE_FILE}: required attribute file not found")


def official_test_pool(root: Path, ids: list[int]) -> list[int] | None:
    """CelebA-HQ ids in CelebA's official test partition, if the user added list_eval_partition.txt."""
    partition_file = root / celebamask.PARTITION_FILE
    if not partition_file.is_file():
        return None
    mapping_file = root / celebamask.MAPPING_FILE
    if not mapping_file.is_file():
        raise DatasetLayoutError(f"{mapping_file}: needed to use {partition_file}, not found")
    mapping = annotations.read_mapping(mapping_file)
    partition = annotations.read_partition(partition_file)
    unmapped = [i for i in ids if i not in mapping or mapping[i] not in partition]
    if unmapped:
        raise annotations.AnnotationError(
            f"{mapping_file} / {partition_file}: {len(unmapped)} images cannot be placed, e.g. id {unmapped[0]}"
        )
    return [i for i in ids if partition[mapping[i]] == 2]


def prepare_celebamask(
    root: str | Path,
    out: str | Path,
    *,
    image_size: int = 256,
    mask_size: int = 256,
    rows_per_shard: int = 1000,
    test_size: int = 300,
    train_size: int | None = None,
    seed: int = 0,
    image_format: Literal["jpeg", "png"] = "jpeg",
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write train/test shards and the manifest; returns the manifest.

    Every option is checked before OUT is touched; the shards and the manifest are written beside OUT and
    swapped in only when both splits hold records (`staging.staged_output`)."""
    root, out = Path(root), Path(out)
    start = time.time()
    check_options(image_size=image_size, mask_size=mask_size, rows_per_shard=rows_per_shard, test_size=test_size,
                  train_size=train_size, image_format=image_format, workers=workers)
    check_layout(root)
    refuse_existing(out, overwrite)
    attributes = annotations.read_attributes(root / celebamask.ATTRIBUTE_FILE)
    ids = sorted(attributes)
    test_pool = official_test_pool(root, ids)
    splits = assign_splits(ids, test_pool, test_size, train_size, seed)
    jobs = [
        (root, i, attributes[i], split, image_size, mask_size, image_format)
        for split in SPLITS
        for i in splits[split]
    ]
    workers = workers or os.cpu_count() or 1
    skipped: list[Skip] = []
    sizes = SourceSizes(image_size, mask_size)
    with staged_output(out, (*SPLITS, MANIFEST)) as staging:
        writers = {split: ShardWriter(staging, split, rows_per_shard) for split in SPLITS}
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = pool.map(_process_star, jobs, chunksize=max(1, min(64, len(jobs) // (8 * workers))))
            for result in tqdm(results, total=len(jobs), desc="prepare celebamask", unit="img",
                               disable=not progress):
                if isinstance(result, Skip):
                    log.warning("skipping image %d: %s (%s)", result.image_id, result.reason, result.file)
                    skipped.append(result)
                else:
                    sizes.add(result.pop(SOURCE_SIZES))
                    writers[result["split"]].write(result)
        shards = {split: writer.close() for split, writer in writers.items()}
        counts = {split: sum(f["rows"] for f in shards[split]) for split in SPLITS}
        require_records(counts, str(root), f"{len(skipped)} of {len(jobs)} images were skipped"
                        + (f" (first: {skipped[0].file}: {skipped[0].reason})" if skipped else "")
                        + "; check the release, or change --test-size/--train-size")
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "source": str(root.resolve()),
            "image_size": image_size,
            "mask_size": mask_size,
            "image_format": image_format,
            "attribute_names": list(celebamask.ATTRIBUTE_NAMES),
            "part_names": ["background", *celebamask.PART_NAMES],
            "split_method": "official" if test_pool is not None else "seeded",
            "split_seed": seed,
            "requested": {"test_size": test_size, "train_size": train_size},
            "counts": counts,
            "unused_images": len(ids) - sum(len(v) for v in splits.values()),
            **sizes.manifest_entry(),
            "shards": shards,
            "skipped": [{"id": s.image_id, "file": s.file, "reason": s.reason} for s in skipped],
            "seconds": round(time.time() - start, 1),
        }
        write_manifest(staging, manifest)
    if (upsampled := sizes.warning()) is not None:
        log.warning("%s", upsampled)
    if skipped:
        log.warning("skipped %d of %d images; listed in %s", len(skipped), len(jobs), out / MANIFEST)
    return manifest
