"""Ray Data loader: Parquet shards (see `shards.py`) -> decoded, augmented tensors for Ray Train workers.

    ds = build_dataset(path, "train", image_size=64)
    TorchTrainer(loop, datasets={"train": ds}, ...)
    # inside the loop:
    for batch in iter_train_batches(ray.train.get_dataset_shard("train"), 32, part_groups=DEFAULT_PART_GROUPS): ...

Rows leave Ray Data compact: "id" int64 (B,), "epoch" int64 (B,) (the data epoch the row was drawn for), "flipped"
uint8 (B,), "image" uint8 (B,3,S,S), "parts" uint8 (B,S,S) label maps, "attributes" float32 (B,40) and, with
`use_latents`, "latents" float32 (B,C,h,w): the cached autoencoder latents (`facediff prepare latents`) of the
image as flipped. `iter_train_batches` finishes them on the worker's device (`batch.finish_batch`): "image"
float32 in [-1,1] and, with part groups, "part_masks" float32 (B,G,S,S).
COCO people shards (`prepare coco`) decode to their own columns: see `coco_stream.py`.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import ray
import ray.data
from PIL import Image
from ray.data import FileShuffleConfig
from ray.data.collate_fn import DefaultCollateFn

from facediff.data.stream.bad_records import bad_record, keep_rows, report
from facediff.data.celebamask import NUM_ATTRIBUTES, NUM_PART_CLASSES
from facediff.data.hashing import splitmix64
from facediff.data.stream.coco import COCO_KIND, decode_coco_batch
from facediff.data.stream.passes import EPOCH_COLUMN, ShardPasses
from facediff.data.shards import LATENTS, LATENTS_FLIPPED, SHARD_SCHEMA, read_manifest, shard_paths, split_rows

if TYPE_CHECKING:  # torch stays out of the decode tasks' imports (Ray Data workers start faster)
    import torch

    from facediff.data.stream.batch import PartGroups


# Rows per decode call: small enough that the first batch is ready after a few dozen images, large enough to
# amortise Ray's per-task overhead (~20 ms on 2 cores; 16-row tasks ran at half the speed of 64-128-row ones).
DECODE_BATCH_ROWS = 64
# Rows per block when choosing the default read parallelism: fewer for larger images, so every read+decode task
# has about the same work (~0.1-0.2 s here) to amortise Ray's per-task overhead. At 64 px, 8,192 rows of 256 px
# JPEGs on 2 cores: 128-row blocks streamed 1,710 img/s after a warm epoch's first batch and 512-row ones 2,271
# (the plain loop 2,380-2,450 for the whole epoch); that first batch took 0.34 s and 0.61 s.
MIN_ROWS_PER_BLOCK, MAX_ROWS_PER_BLOCK = 128, 512


def rows_per_block(image_size: int) -> int:
    """128 rows at 256 px and above, 256 at 128 px, 512 at 64 px and below."""
    return min(MAX_ROWS_PER_BLOCK, max(MIN_ROWS_PER_BLOCK, MIN_ROWS_PER_BLOCK * 256 // image_size))
# Batches Ray formats and moves ahead of the one being trained on (threads of the worker process).
PREFETCH_BATCHES = 2
# Columns that are not tensors and must not reach torch.
NON_TENSOR_COLUMNS = ("split",)


def flip_decisions(ids: np.ndarray, *, seed: int, epoch: int | np.ndarray) -> np.ndarray:
    """Whether each row is mirrored: a function of (seed, epoch, id) only, never of batching or order,
    so a resumed run repeats the augmentation and a test can predict it. `epoch`: one for all rows or each
    row's. One vectorised hash for the whole batch (a NumPy generator per row cost more than decoding a 64 px
    JPEG)."""
    key = splitmix64(splitmix64(seed) ^ np.asarray(epoch, dtype=np.int64).astype(np.uint64))
    return (splitmix64(key ^ np.asarray(ids, dtype=np.int64).astype(np.uint64)) >> np.uint64(63)).astype(bool)


def _column_2d(column: np.ndarray, width: int, name: str) -> np.ndarray:
    # Ray hands a fixed-size list column over as (B, width); pyarrow's to_numpy as an object array of rows.
    if column.dtype == object:
        array = np.stack(list(column)) if len(column) else np.empty((0, width), dtype=np.int8)
    else:
        array = np.asarray(column)
    if array.ndim != 2 or array.shape[1] != width:
        raise ValueError(f"column {name!r}: expected shape (B, {width}), got {array.shape}")
    return array


def _decode_image(data: bytes, size: int) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    if image.format == "JPEG" and image.width >= 2 * size:
        # DCT-domain downscaling (1/2, 1/4, 1/8) while decoding: a 256 px JPEG read for 64 px training decodes
        # a sixteenth of the pixels; the resize below then only finishes the job (or is not needed).
        image.draft("RGB", (size, size))
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        # LANCZOS anti-aliases when shrinking; bicubic is the usual choice when enlarging.
        resample = Image.Resampling.LANCZOS if image.width > size else Image.Resampling.BICUBIC
        image = image.resize((size, size), resample)
    return np.asarray(image)  # (S, S, 3) uint8


def _decode_parts(data: bytes, size: int) -> np.ndarray:
    parts = Image.open(io.BytesIO(data))
    if parts.mode not in ("L", "P"):  # "P" indices are the labels; converting it would map colours to grey
        raise ValueError(f"parts must be a single-channel label PNG, got mode {parts.mode!r}")
    if parts.size != (size, size):
        parts = parts.resize((size, size), Image.Resampling.NEAREST)  # never blend labels
    return np.asarray(parts)


def _decode_latents(batch: dict[str, np.ndarray], shape: tuple[int, int, int], flip: np.ndarray | None) -> np.ndarray:
    """The cached latents (B, C, h, w) float32; rows with `flip` take the latents of the mirrored image."""
    width = int(np.prod(shape))
    if LATENTS not in batch:
        raise ValueError(f"no {LATENTS!r} column in the shards: write them with `facediff prepare latents`")
    hint = f" (the manifest says latents are {'x'.join(map(str, shape))} = {width} values a row)"
    try:
        latents = _column_2d(batch[LATENTS], width, LATENTS)
        if flip is not None and flip.any():
            if LATENTS_FLIPPED not in batch:
                raise ValueError(f"no {LATENTS_FLIPPED!r} column for flipped rows")
            latents = np.where(flip[:, None], _column_2d(batch[LATENTS_FLIPPED], width, LATENTS_FLIPPED), latents)
    except ValueError as err:
        raise ValueError(f"{err}{hint}") from None
    return latents.astype(np.float32).reshape(len(latents), *shape)


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    image_size: int,
    hflip: bool,
    seed: int,
    epoch: int | None,
    latent_shape: tuple[int, int, int] | None = None,
    bad_records=None,
) -> dict[str, np.ndarray]:
    """Decode one batch of shard rows (numpy format); the function `map_batches` runs.

    A row whose image or label map does not decode is left out of the output, logged with its id and shard file
    and added to the run's `bad_records` tally (`bad_records.py`; None: logged only).

    `epoch=None` takes each row's data epoch from its "epoch" column (`passes.ShardPasses` writes it), so every
    epoch of a pass flips differently while flips stay a function of (seed, epoch, id).
    With `latent_shape` (C, h, w) the cached latents are returned too: a flipped row takes `latents_flipped`,
    the exact latents of the mirrored image, never a mirrored latent (only approximately the same).
    """
    ids = np.array(batch["id"], dtype=np.int64)  # a copy: the output must not alias read-only input buffers
    n, s = len(ids), image_size
    if epoch is None and EPOCH_COLUMN not in batch:
        raise ValueError(f"epoch=None needs an {EPOCH_COLUMN!r} column (rows read by passes.ShardPasses)")
    epochs = np.array(batch[EPOCH_COLUMN] if epoch is None else np.full(n, epoch), dtype=np.int64)
    if "persons" in batch:  # a COCO people dataset (`prepare coco`): its own columns
        latents = None
        if latent_shape is not None:  # the same flips as the images', a function of (seed, epoch, id)
            flip = flip_decisions(ids, seed=seed, epoch=epochs) if hflip else None
            latents = _decode_latents(batch, tuple(latent_shape), flip)
        return decode_coco_batch(batch, image_size=image_size, hflip=hflip, seed=seed, epochs=epochs,
                                 flip_decisions=flip_decisions, bad_records=bad_records, latents=latents)
    images = np.empty((n, s, s, 3), dtype=np.uint8)
    parts = np.zeros((n, s, s), dtype=np.uint8)  # zeros: a failed row's labels must not trip the check below
    keep, bad = np.ones(n, dtype=bool), []
    for row, (image_bytes, parts_bytes) in enumerate(zip(batch["image"], batch["parts"])):
        try:
            images[row] = _decode_image(image_bytes, s)
            parts[row] = _decode_parts(parts_bytes, s)
        except Exception as err:  # noqa: BLE001 - whatever a corrupt record raises, the record is skipped
            keep[row] = False
            bad.append(bad_record(batch, row, ids, err))
    report(bad, bad_records)
    if parts.max(initial=0) >= NUM_PART_CLASSES:
        raise ValueError(f"parts hold label {parts.max()}, the label map has {NUM_PART_CLASSES} classes")

    flip = np.zeros(n, dtype=bool)
    if hflip:
        # Image and label map are mirrored together so every label stays on its pixels. Side-specific labels
        # (l_/r_ eye, brow, ear) are deliberately NOT swapped: CelebAMask-HQ's l_/r_ names follow the annotators'
        # convention, which we do not second-guess; after a flip a "l_eye" region simply sits on the other side.
        # The default part groups merge each pair, so their masks are unaffected by this choice.
        flip = flip_decisions(ids, seed=seed, epoch=epochs)
        images[flip] = images[flip, :, ::-1]
        parts[flip] = parts[flip, :, ::-1]

    attributes = _column_2d(batch["attributes"], NUM_ATTRIBUTES, "attributes").astype(np.float32)
    if not np.isin(attributes, (0.0, 1.0)).all():
        raise ValueError("attributes must be 0 or 1")
    out = {
        "id": ids,
        "epoch": epochs,
        "flipped": flip.astype(np.uint8),
        "image": np.ascontiguousarray(images.transpose(0, 3, 1, 2)),  # uint8: `batch.finish_batch` makes floats
        "parts": parts,  # part masks are made from it on the device (`batch.finish_batch`)
        "attributes": attributes,
    }
    if latent_shape is not None:
        out["latents"] = _decode_latents(batch, tuple(latent_shape), flip if hflip else None)
    return keep_rows(out, keep)


def _default_read_parallelism(dataset: Path, split: str, num_files: int, per_cpu: bool = True,
                              image_size: int = 256) -> int:
    """Enough blocks (read tasks of whole row groups, `passes.ShardPasses`) to keep every CPU decoding and let
    the first batch arrive early: at least one per file, two per CPU, and `rows_per_block(image_size)` rows each
    at most. per_cpu=False leaves the CPUs out, so the blocks (and with them the rows each Train worker is dealt)
    are the same on any cluster (`data.deterministic_order`).
    """
    rows = split_rows(dataset, split)
    cpus = 0
    if per_cpu:
        cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else (os.cpu_count() or 1)
    return max(num_files, 2 * cpus, math.ceil(rows / rows_per_block(image_size)))


def _read_shards(
    paths: list[str],
    num_blocks: int,
    shuffle: FileShuffleConfig | None,
    columns: list[str] | None = None,
    include_paths: bool = False,
) -> ray.data.Dataset:
    """`read_parquet` through Ray's V1 Parquet datasource.

    Ray 2.60 routes `read_parquet` through DataSourceV2 by default, which (a) ignores `override_num_blocks`
    (it bin-packs row groups into 128 MiB read units, so a whole small dataset is one read task) and (b) starts
    32 footer-reading actors on every execution: measured on 2 cores, ~10 s of listing per epoch, and the
    first batch of a Train run came ~40 s later than with V1. `DataContext.use_datasource_v2` is the documented switch; the Dataset keeps its own
    copy of the context, so the global one is restored right away.
    """
    context = ray.data.DataContext.get_current()
    previous = getattr(context, "use_datasource_v2", False)
    context.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(paths, override_num_blocks=num_blocks, shuffle=shuffle, columns=columns,
                                     include_paths=include_paths)
    finally:
        context.use_datasource_v2 = previous


def build_dataset(
    dataset: str | Path,
    split: str,
    *,
    image_size: int,
    hflip: bool = True,
    seed: int = 0,
    epoch: int | None = 0,
    read_parallelism: int | None = None,
    blocks_per_cpu: bool = True,
    shuffle: bool = False,
    use_latents: bool = False,
    first_epoch: int = 0,
    epochs_per_pass: int = 1,
    skip_ids: dict[int, set[int]] | None = None,
    bad_records=None,
) -> ray.data.Dataset:
    """A lazy Ray Dataset of decoded rows of one split (see `decode_batch` for the columns).

    Flips depend on (seed, epoch, id). With a fixed `epoch` every iteration reads that epoch again (evaluation).
    With `epoch=None` (training) each iteration is a *pass* of `epochs_per_pass` epochs read one after the other
    (`passes.ShardPasses`): iteration x reads epochs `first_epoch + x * epochs_per_pass` onwards, every row
    tagged with its epoch. A resumed run passes the first epoch of the pass it resumes in and the ids it already
    consumed there per epoch (`skip_ids`, dropped from the first iteration only), so it continues the
    uninterrupted run's epochs.

    shuffle=True reads each epoch's shard files in an order seeded by (seed, epoch), so a resumed run reads
    them as the uninterrupted run did. It is deliberately not `random_shuffle` / `randomize_block_order`: both
    are all-to-all barriers that hold the first batch until the whole split has been read. Mix rows within and
    across files downstream with `iter_train_batches(local_shuffle_buffer_size=...)`; shards are bounded, so
    file order + a buffer of a few hundred rows is a good approximation of a full shuffle.

    blocks_per_cpu=False: the default block count ignores the cluster's CPUs (see `_default_read_parallelism`).

    use_latents=True adds the cached "latents" column (shards written by `facediff prepare latents`, encoded at
    `image_size`; with `hflip` they must hold the mirrored images' latents too). Without it the latent columns
    are not even read.

    `bad_records`: the run's tally of records that do not decode (`bad_records.start_tally`); they are skipped
    either way.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be > 0, got {image_size}")
    if seed < 0 or first_epoch < 0 or (epoch is not None and epoch < 0):
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}, first_epoch={first_epoch}")
    if read_parallelism is not None and read_parallelism < 1:
        raise ValueError(f"read_parallelism must be >= 1, got {read_parallelism}")
    if epoch is not None and skip_ids:  # epochs_per_pass is checked by ShardPasses
        raise ValueError(f"skip_ids are for training passes (epoch=None), not a fixed epoch ({epoch})")
    dataset = Path(dataset)
    paths = shard_paths(dataset, split)  # raises on a missing manifest, split or shard
    if not paths:
        raise ValueError(f"{dataset}: split {split!r} has no shards")

    latent_shape = _cached_latent_shape(dataset, image_size, hflip) if use_latents else None
    num_blocks = read_parallelism or _default_read_parallelism(dataset, split, len(paths), blocks_per_cpu, image_size)
    # Latent columns are large (12k values a row for 3x64x64); skip reading them when they are not used.
    coco = read_manifest(dataset).get("kind") == COCO_KIND
    columns = None if use_latents or coco else list(SHARD_SCHEMA.names)
    source = ShardPasses(paths, columns=columns, rows_per_task=math.ceil(split_rows(dataset, split) / num_blocks),
                         seed=seed, shuffle=shuffle, first_epoch=first_epoch if epoch is None else epoch,
                         epochs_per_pass=epochs_per_pass, advance=epoch is None, skip=skip_ids)
    # as many blocks as read tasks: more would make Ray split every task's output
    ds = ray.data.read_datasource(source, override_num_blocks=source.num_tasks())
    kwargs = dict(image_size=image_size, hflip=hflip, seed=seed, epoch=None, bad_records=bad_records)
    if latent_shape is not None:
        kwargs["latent_shape"] = latent_shape
    return ds.map_batches(decode_batch, batch_size=DECODE_BATCH_ROWS, batch_format="numpy", fn_kwargs=kwargs)


def _cached_latent_shape(dataset: Path, image_size: int, hflip: bool) -> tuple[int, int, int]:
    """(C, h, w) of the dataset's cached latents, checked against how they will be used."""
    where = dataset / "manifest.json"
    info = read_manifest(dataset).get("latents")
    if info is None:
        raise ValueError(f"{where}: no cached latents; write them with `facediff prepare latents {dataset} OUT` "
                         "or set data.use_latents=false")
    if int(info["image_size"]) != image_size:
        raise ValueError(f"{where}: latents were encoded at {info['image_size']} px, but image_size is {image_size}")
    if hflip and not info.get("flipped", False):
        raise ValueError(f"{where}: latents of mirrored images were not cached (prepared with --no-flipped), "
                         "so flips cannot be applied; set data.hflip=false or prepare them again")
    shape = tuple(int(v) for v in info["shape"])
    if len(shape) != 3:
        raise ValueError(f"{where}: latents shape {info['shape']} is not [C, h, w]")
    return shape


class _DropNonTensorColumns(DefaultCollateFn):
    """Ray's default Arrow->torch collation, minus string columns such as "split" that torch cannot hold."""

    def __call__(self, batch):
        present = [c for c in NON_TENSOR_COLUMNS if c in batch.column_names]
        return super().__call__(batch.drop_columns(present) if present else batch)


def iter_train_batches(
    shard,
    batch_size: int,
    *,
    device=None,
    part_groups: PartGroups | None = None,
    local_shuffle_buffer_size: int | None = None,
    local_shuffle_seed: int | None = None,
    drop_last: bool = True,
    prefetch_batches: int = PREFETCH_BATCHES,
) -> Iterator[dict[str, torch.Tensor]]:
    """Finished torch batches (`batch.finish_batch`: float images, part masks for `part_groups`) from a Dataset
    or a Ray Train shard (`ray.train.get_dataset_shard("train")`).

    device=None lets Ray pick: the worker's device inside Ray Train, else CPU. With a device, Ray collates on the
    CPU (into pinned memory for a GPU) and the compact batch is copied there without blocking, bookkeeping columns
    ("id", "epoch", "flipped") staying on the host; it is finished on the device. Arguments are checked here, not
    at the first `next()`.
    """
    # lazily: torch only for the trainer's iterator (Ray Data's read and map tasks import this module without it)
    import torch

    from facediff.data.stream.batch import finish_batch, part_group_table

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if local_shuffle_buffer_size is not None and local_shuffle_buffer_size < batch_size:
        raise ValueError(f"local_shuffle_buffer_size ({local_shuffle_buffer_size}) must be >= batch_size ({batch_size})")
    target = None if device is None else torch.device(device)
    # built once (unknown part names fail now), on the device the batches are finished on
    table = None if part_groups is None else part_group_table(part_groups, target)
    batches = shard.iter_torch_batches(
        batch_size=batch_size,
        device="auto" if target is None else "cpu",
        pin_memory=target is not None and target.type == "cuda",
        collate_fn=_DropNonTensorColumns(combine_chunks=True),
        drop_last=drop_last,
        local_shuffle_buffer_size=local_shuffle_buffer_size,
        local_shuffle_seed=local_shuffle_seed,
        prefetch_batches=prefetch_batches,
    )
    return (finish_batch(batch, part_groups, target, table) for batch in batches)
