"""`facediff prepare latents`: encode every image once with the frozen autoencoder into new shards.

    prepare_latents("data/celebamask-256", "data/celebamask-256-vq", AutoencoderConfig(preset=..., pretrained=...))

Each split is read with Ray Data (the V1 Parquet reader of `stream.py`), images are decoded exactly as training
decodes them (`stream.decode_batch`, no flips) and encoded in `map_batches` by a pool of actors that each hold
one `LatentCodec` (one GPU per actor when `use_gpu`, else a fraction of a CPU so Ray Data's read tasks always get
one). The driver writes the rows, in input order, into new shards with every original column (id, image, parts,
attributes, split) (or a COCO people dataset's: id, image, captions, persons, boxes, split) plus `latents` and, by default, `latents_flipped`: the latents of the mirrored image, so
training with `data.hflip` flips exactly (a mirrored latent is only approximately the mirrored image's latent).
See `shards.py` for the columns and the manifest's `latents` entry.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from tqdm import tqdm

from facediff.config.paths import resolve_reference
from facediff.config.schema import AutoencoderConfig
from facediff.data.shards import (
    LATENT_DTYPES, LATENTS, LATENTS_FLIPPED, MANIFEST, SHARD_SCHEMA, ShardWriter, latent_schema, read_manifest,
    shard_paths, write_manifest,
)
from facediff.data.staging import check_at_least, refuse_existing, staged_output
from facediff.data.stream.batch import images_to_float
from facediff.data.prepare.coco import COCO_SHARD_SCHEMA
from facediff.data.stream.coco import COCO_KIND
from facediff.data.stream.dataset import _read_shards, decode_batch

log = logging.getLogger("facediff.latents")


class EncodeLatents:
    """The `map_batches` callable class: Arrow rows in, the same rows plus latent columns out.

    Built once per actor (the autoencoder loads once), then called per batch."""

    def __init__(self, autoencoder: dict[str, Any], image_size: int, dtype: str, flipped: bool, use_gpu: bool):
        # lazily (here and below): diffusers only where latents are encoded or checked
        from facediff.models.autoencoder import LatentCodec

        self.codec = LatentCodec(AutoencoderConfig.model_validate(autoencoder), load_weights=True)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.codec.to(self.device)
        self.image_size, self.flipped = image_size, flipped
        self.dtype = LATENT_DTYPES[dtype].to_pandas_dtype()

    def _latent_column(self, images: torch.Tensor) -> pa.Array:
        z = self.codec.encode(images).float().cpu().numpy().astype(self.dtype)
        return pa.FixedSizeListArray.from_arrays(pa.array(z.reshape(-1)), int(np.prod(z.shape[1:])))

    def __call__(self, table: pa.Table) -> pa.Table:
        # every source column but Ray's "path": decode_batch tells CelebAMask and COCO people rows apart by them
        columns = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names if name != "path"}
        decoded = decode_batch(columns, image_size=self.image_size, hflip=False, seed=0, epoch=0)
        images = images_to_float(torch.from_numpy(decoded["image"]).to(self.device))
        table = table.append_column(LATENTS, self._latent_column(images))
        if self.flipped:
            table = table.append_column(LATENTS_FLIPPED, self._latent_column(images.flip(-1)))
        return table


def _ensure_ray(actors: int, cpus_per_actor: float) -> None:
    """Join a running cluster, or start a local one with a CPU for Ray Data's reads beside the actors."""
    from facediff.ray_start import start_ray

    start_ray(actors * cpus_per_actor + 1)


def _actors(use_gpu: bool, num_actors: int | None) -> int:
    if use_gpu:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus < 1:  # Ray would wait forever for a GPU actor that can never be placed
            raise ValueError("use_gpu: the Ray cluster has no GPU (run without --gpu to encode on CPUs)")
        return min(num_actors or gpus, gpus)
    return num_actors or 1


AUTOENCODER_IDENTITY = ("kind", "preset", "pretrained", "subfolder", "revision")


def check_cached_latents(dataset: str | Path, autoencoder: AutoencoderConfig) -> None:
    """The cached latents must come from the model's autoencoder, scaled by the factor the model decodes with:
    latents of another autoencoder (or scale) train a model whose samples decode to nonsense."""
    from facediff.models.autoencoder import scaling_factor

    where = Path(dataset) / MANIFEST
    info = read_manifest(dataset).get("latents")
    if info is None:
        raise ValueError(f"{where}: no cached latents; write them with `facediff prepare latents` "
                         "or set data.use_latents=false")
    cached = AutoencoderConfig.model_validate(info["autoencoder"])
    cached = cached.model_copy(update={"pretrained": resolve_reference(cached.pretrained)})
    ours = autoencoder.model_copy(update={"pretrained": resolve_reference(autoencoder.pretrained)})
    for key in AUTOENCODER_IDENTITY:
        if getattr(cached, key) != getattr(ours, key):
            raise ValueError(f"{where}: the cached latents were encoded with autoencoder {key}={getattr(cached, key)!r}, "
                             f"but model.autoencoder.{key} is {getattr(ours, key)!r}; prepare the latents again with "
                             "this model's autoencoder (`facediff prepare latents --config ...`) or set "
                             "data.use_latents=false")
    want = scaling_factor(ours)
    if abs(float(info["scaling_factor"]) - want) > 1e-6 * max(1.0, abs(want)):
        raise ValueError(f"{where}: the cached latents are scaled by {info['scaling_factor']}, but the model's "
                         f"autoencoder decodes with model.autoencoder.scaling_factor={want}; prepare them again "
                         "or set the same scaling_factor")


def check_cached_inputs(dataset: str | Path, model) -> None:
    """What `data.use_latents` reads, checked before a run: the latents (made with the model's autoencoder) and,
    for sd_lora, the cached prompt embeddings if the dataset has them (made with its pipeline and wording)."""
    from facediff.config.schema import model_autoencoder
    from facediff.data.prompt_embeddings import check_prompt_embeddings

    check_cached_latents(dataset, model_autoencoder(model))
    if model.family == "sd_lora":
        check_prompt_embeddings(dataset, model)


def prepare_latents(
    shards_in: str | Path,
    out: str | Path,
    autoencoder: AutoencoderConfig,
    *,
    batch_size: int = 32,
    use_gpu: bool = False,
    num_actors: int | None = None,
    cpus_per_actor: float = 1.0,
    image_size: int | None = None,
    dtype: str = "float16",
    flipped: bool = True,
    rows_per_shard: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write `out`: the shards of `shards_in` with cached latents, and its manifest; returns the manifest.

    image_size: the size images are decoded to before encoding (default: the size they are stored at); training
    must use the same `data.image_size`. dtype: float16 (default; half the bytes, ~1e-3 relative error, far below
    the diffusion noise) or float32. rows_per_shard: default the largest input shard.
    """
    shards_in, out = Path(shards_in), Path(out)
    # the manifest names the autoencoder; a local folder is recorded absolute so training can compare it
    autoencoder = autoencoder.model_copy(update={"pretrained": resolve_reference(autoencoder.pretrained)})
    if batch_size < 1 or cpus_per_actor <= 0:
        raise ValueError(f"batch_size must be >= 1 and cpus_per_actor > 0, got {batch_size}, {cpus_per_actor}")
    if dtype not in LATENT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(LATENT_DTYPES)}, got {dtype!r}")
    if out.resolve() == shards_in.resolve():
        raise ValueError(f"{out}: write the latent shards to a new folder, not over their source")
    manifest_in = read_manifest(shards_in)
    refuse_existing(out, overwrite)
    from facediff.models.autoencoder import latent_shape

    image_size = manifest_in.get("image_size") if image_size is None else image_size  # 0 is an error, not "unset"
    if image_size is None:
        raise ValueError(f"{shards_in / MANIFEST}: records no image_size; give the size to encode at")
    image_size = int(image_size)
    check_at_least(("--image-size", image_size, 8), ("--rows-per-shard", rows_per_shard, 1),
                   ("--actors", num_actors, 1), ("--batch-size", batch_size, 1))
    shape = latent_shape(autoencoder, image_size)  # checks the architecture and the size before Ray starts
    splits = list(manifest_in["shards"])
    rows_per_shard = rows_per_shard or max(
        [int(e["rows"]) for split in splits for e in manifest_in["shards"][split]] or [1]
    )
    start = time.time()
    actors = num_actors or 1
    _ensure_ray(actors, cpus_per_actor)
    actors = _actors(use_gpu, num_actors)

    base = COCO_SHARD_SCHEMA if manifest_in.get("kind") == COCO_KIND else SHARD_SCHEMA
    schema = latent_schema(int(np.prod(shape)), dtype, flipped, base)
    with staged_output(out, (*splits, MANIFEST)) as staging:  # `out` keeps its old dataset until this is done
        shards = _encode(
            shards_in, staging, splits, schema, rows_per_shard, progress,
            udf_args=dict(autoencoder=autoencoder.model_dump(mode="json"), image_size=image_size, dtype=dtype,
                          flipped=flipped, use_gpu=use_gpu),
            map_args=dict(batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
                          **({"num_gpus": 1} if use_gpu else {"num_cpus": cpus_per_actor})),
        )
        manifest = _manifest(manifest_in, shards, shape, dtype, image_size, flipped, autoencoder, shards_in, start)
        write_manifest(staging, manifest)
    return manifest


def _manifest(manifest_in, shards, shape, dtype, image_size, flipped, autoencoder, shards_in, start) -> dict:
    from facediff.models.autoencoder import scaling_factor

    counts = {split: sum(e["rows"] for e in files) for split, files in shards.items()}
    return {
        **manifest_in,
        "shards": shards,
        "counts": counts,
        "latents": {
            "shape": list(shape),
            "dtype": dtype,
            "image_size": image_size,
            "flipped": flipped,
            "autoencoder": autoencoder.model_dump(mode="json"),
            "scaling_factor": scaling_factor(autoencoder),  # already applied to the stored latents
            "source_dataset": str(shards_in.resolve()),
            "seconds": round(time.time() - start, 1),
        },
    }


def _encode(shards_in: Path, out: Path, splits: list[str], schema: pa.Schema, rows_per_shard: int, progress: bool,
            udf_args: dict, map_args: dict) -> dict[str, list[dict[str, Any]]]:
    """All splits through one Dataset, so the actors (and the autoencoder's weights) load once.

    Rows go to their split's writer by the shard file they came from (`include_paths`), as the manifest lists it.
    """
    split_of = {str(Path(p).resolve()): split for split in splits for p in shard_paths(shards_in, split)}
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in split_of)
    writers = {split: ShardWriter(out, split, rows_per_shard, schema=schema) for split in splits}
    start = time.time()
    if split_of:
        source_columns = [name for name in schema.names if name not in (LATENTS, LATENTS_FLIPPED)]
        ds = _read_shards(list(split_of), len(split_of), None, columns=source_columns, include_paths=True)
        ds = ds.map_batches(EncodeLatents, batch_format="pyarrow", fn_constructor_kwargs=udf_args, **map_args)
        ds.context.execution_options.preserve_order = True  # shards keep the source's row order
        with tqdm(total=total, desc="prepare latents", unit="img", disable=not progress) as bar:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                paths = batch["path"].to_numpy(zero_copy_only=False)
                for path in dict.fromkeys(paths):  # each source file, in order of appearance
                    split = split_of.get(str(Path(path).resolve()))
                    if split is None:
                        raise RuntimeError(f"Ray Data returned rows of {path}, which is not a shard of {shards_in}")
                    writers[split].write_table(batch.filter(pa.array(paths == path)))
                bar.update(batch.num_rows)
    files = {split: writer.close() for split, writer in writers.items()}
    seconds = time.time() - start
    log.info("prepare latents: %d images in %.1f s (%.1f img/s)", total, seconds, total / max(seconds, 1e-9))
    return files
