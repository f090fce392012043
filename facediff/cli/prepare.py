"""`facediff prepare ...`: the dataset subcommands (registered on `facediff` by cli/main.py).

Each checks its options before touching OUT; the writers stage their output beside OUT and swap it in only
when it is complete (`facediff.data.staging`), so a failed run, `--overwrite` included, leaves OUT as it was.
Each command imports its writer inside the function, as cli.py does: start-up stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from facediff.cli.errors import fail as _fail
from facediff.cli.errors import load_or_fail as _load
from facediff.cli.errors import user_errors

prepare_app = typer.Typer(help="Turn datasets into Parquet shards.", no_args_is_help=True)


def _write_tree(write, out: Path, n: int, what: str, **options) -> None:
    """A generated source tree (`synthetic`, `synthetic-coco`): its writers check options and stage the tree."""
    with user_errors(ValueError, FileNotFoundError, FileExistsError):  # FileExistsError: OUT or a parent is a file
        write(out, n=n, **options)
    typer.echo(f"wrote {n} {what} to {out}")


@prepare_app.command("celebamask")
def prepare_celebamask(
    root: Annotated[Path, typer.Argument(help="CelebAMask-HQ root (official release layout)")],
    out: Annotated[Path, typer.Argument(help="output folder for shards and manifest.json")],
    image_size: int = 256,
    mask_size: int = 256,
    rows_per_shard: int = 1000,
    test_size: Annotated[int, typer.Option(help="test images, at least 1: 0 is an error, since evaluation and "
                                                "`sample --from-test` read the test split (scaled down to a "
                                                "tenth for tiny inputs)")] = 300,
    train_size: Annotated[Optional[int], typer.Option(help="2700 small regime, 27000 full; default all")] = None,
    seed: int = 0,
    image_format: Annotated[str, typer.Option(help="jpeg or png")] = "jpeg",
    workers: Annotated[Optional[int], typer.Option(help="processes; default one per core")] = None,
    overwrite: bool = False,
) -> None:
    """Read the official CelebAMask-HQ layout and write train/test Parquet shards."""
    from facediff.data.prepare.celebamask import prepare_celebamask as run

    with user_errors(FileNotFoundError, FileExistsError, ValueError):  # AnnotationError is a ValueError
        manifest = run(
            root, out, image_size=image_size, mask_size=mask_size, rows_per_shard=rows_per_shard,
            test_size=test_size, train_size=train_size, seed=seed, image_format=image_format,
            workers=workers, overwrite=overwrite,
        )
    typer.echo(
        f"wrote {manifest['counts']} records to {out} ({manifest['split_method']} split), "
        f"skipped {len(manifest['skipped'])}"
    )


@prepare_app.command("synthetic")
def prepare_synthetic(
    out: Annotated[Path, typer.Argument(help="folder to write the CelebAMask-HQ-layout tree into")],
    n: Annotated[int, typer.Option(help="number of faces")] = 256,
    size: Annotated[int, typer.Option(help="image side in pixels (masks are half)")] = 256,
    seed: int = 0,
    with_partition: Annotated[bool, typer.Option(help="also write a CelebA list_eval_partition.txt")] = False,
    workers: Optional[int] = None,
) -> None:
    """Write procedural faces in the official CelebAMask-HQ layout (the embedded default dataset)."""
    from facediff.data.synthetic.celebamask import write_synthetic_celebamask

    _write_tree(write_synthetic_celebamask, out, n, "synthetic faces", size=size, seed=seed,
                with_partition=with_partition, workers=workers)


@prepare_app.command("coco")
def prepare_coco(
    root: Annotated[Path, typer.Argument(help="COCO 2017 root (train2017/, val2017/, annotations/)")],
    out: Annotated[Path, typer.Argument(help="output folder for shards and manifest.json")],
    splits: Annotated[str, typer.Option(help="comma-separated: train, val or both")] = "train,val",
    image_size: Annotated[int, typer.Option(help="stored square side: shorter side resized, centre crop")] = 512,
    min_person_area: Annotated[float, typer.Option(
        help="keep images whose person masks cover at least this share of the image")] = 0.1,
    face_threshold: Annotated[float, typer.Option(help="lowest MTCNN score kept as a face box")] = 0.9,
    faces: Annotated[bool, typer.Option(help="detect face boxes with MTCNN (else the face columns are empty)")] = True,
    rows_per_shard: int = 1000,
    workers: Annotated[Optional[int], typer.Option(help="processes; default one per core")] = None,
    overwrite: bool = False,
) -> None:
    """Select the COCO images with people and write them as Parquet shards with captions, masks and boxes."""
    from facediff.data.prepare.coco import prepare_coco as run

    with user_errors(FileNotFoundError, FileExistsError, ValueError):
        manifest = run(
            root, out, splits=[s.strip() for s in splits.split(",") if s.strip()], image_size=image_size,
            min_person_area=min_person_area, face_threshold=face_threshold, detect_faces=faces,
            rows_per_shard=rows_per_shard, workers=workers, overwrite=overwrite,
        )
    typer.echo(f"wrote {manifest['counts']} records to {out} ({manifest['images_per_second']} images/s), "
               f"excluded {manifest['excluded']}, skipped {len(manifest['skipped'])}")


@prepare_app.command("synthetic-coco")
def prepare_synthetic_coco(
    out: Annotated[Path, typer.Argument(help="folder to write the COCO-layout tree into")],
    n: Annotated[int, typer.Option(help="number of scenes")] = 64,
    size: Annotated[int, typer.Option(help="longer image side in pixels (640 x 480 and the like)")] = 640,
    seed: int = 0,
    val_fraction: Annotated[float, typer.Option(help="share of the scenes in val2017")] = 0.2,
    workers: Optional[int] = None,
) -> None:
    """Write simple people scenes in the official COCO 2017 layout (plus truth.json), for `prepare coco`."""
    from facediff.data.synthetic.coco import write_synthetic_coco

    _write_tree(write_synthetic_coco, out, n, "synthetic people scenes", size=size, seed=seed,
                val_fraction=val_fraction, workers=workers)


@prepare_app.command("latents")
def prepare_latents(
    shards: Annotated[Path, typer.Argument(help="a prepared dataset folder (holds manifest.json)")],
    out: Annotated[Path, typer.Argument(help="new folder for the shards with cached latents")],
    config: Annotated[Optional[Path], typer.Option(help="take the autoencoder of this experiment config's model "
                                                       "(lc_unet: model.autoencoder; sd_lora/controlnet: the "
                                                       "pipeline's VAE)")] = None,
    preset: Annotated[Optional[str], typer.Option(help="architecture preset, e.g. tiny_vq or sd2_vae")] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="weights: hub id or local folder")] = None,
    subfolder: Annotated[Optional[str], typer.Option(help="e.g. vqvae (LDM) or vae (Stable Diffusion)")] = None,
    revision: Optional[str] = None,
    kind: Annotated[Optional[str], typer.Option(help="vq or kl")] = None,
    scaling_factor: Annotated[Optional[float], typer.Option(help="default: from the autoencoder's config")] = None,
    batch_size: int = 32,
    gpu: Annotated[bool, typer.Option("--gpu", help="one GPU per encoding actor")] = False,
    actors: Annotated[Optional[int], typer.Option(help="encoding actors; default one per GPU, or 1 on CPU")] = None,
    cpus_per_actor: float = 1.0,
    image_size: Annotated[Optional[int], typer.Option(help="encode at this size; default the stored size")] = None,
    dtype: Annotated[str, typer.Option(help="float16 or float32")] = "float16",
    flipped: Annotated[bool, typer.Option(help="also cache the latents of mirrored images (for data.hflip)")] = True,
    rows_per_shard: Annotated[Optional[int], typer.Option(help="default: the largest input shard")] = None,
    overwrite: bool = False,
    prompt_embeddings: Annotated[bool, typer.Option(help="with an sd_lora --config: also cache its prompts' text "
                                                          "embeddings (see `prepare prompt-embeddings`)")] = True,
) -> None:
    """Encode every image once with the frozen autoencoder into shards with a `latents` column."""
    from pydantic import ValidationError

    from facediff.config.schema import AutoencoderConfig
    from facediff.data.prepare.latents import prepare_latents as run

    fields, model = {}, None
    if config is not None:
        from facediff.config.schema import model_autoencoder

        model = _load(config, []).model
        autoencoder = model_autoencoder(model)
        if autoencoder is None:
            _fail(f"{config}: its model denoises pixels and has no autoencoder (latent families: lc_unet, sd_lora, "
                  "controlnet)")
        fields = autoencoder.model_dump(exclude_unset=False)
    given = dict(preset=preset, pretrained=pretrained, subfolder=subfolder, revision=revision, kind=kind,
                 scaling_factor=scaling_factor)
    fields.update({k: v for k, v in given.items() if v is not None})  # options override the config's values
    try:
        autoencoder = AutoencoderConfig(**fields)
        manifest = run(
            shards, out, autoencoder, batch_size=batch_size, use_gpu=gpu, num_actors=actors,
            cpus_per_actor=cpus_per_actor, image_size=image_size, dtype=dtype, flipped=flipped,
            rows_per_shard=rows_per_shard, overwrite=overwrite,
        )
    except ValidationError as err:
        _fail(f"autoencoder (give --config, or --preset and/or --pretrained): {err}")
    except (FileNotFoundError, FileExistsError, ValueError) as err:  # WeightsNotFound is a FileNotFoundError
        _fail(str(err))
    info = manifest["latents"]
    typer.echo(f"wrote {manifest['counts']} records with {'x'.join(map(str, info['shape']))} {info['dtype']} "
               f"latents to {out} in {info['seconds']} s")
    if model is not None and model.family == "sd_lora" and prompt_embeddings:
        _write_prompt_embeddings(out, model, dtype, batch_size, gpu)


def _write_prompt_embeddings(dataset: Path, model, dtype: str, batch_size: int, gpu: bool) -> None:
    from facediff.data.prompt_embeddings import write_prompt_embeddings

    try:
        info = write_prompt_embeddings(dataset, model, dtype=dtype, batch_size=batch_size, use_gpu=gpu)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    entry = info["prompt_embeddings"]
    typer.echo(f"wrote the text embeddings of {entry['prompts']} prompts to {dataset / entry['file']}")


@prepare_app.command("prompt-embeddings")
def prepare_prompt_embeddings(
    dataset: Annotated[Path, typer.Argument(help="a prepared dataset folder (holds manifest.json); the file is "
                                                 "written into it")],
    config: Annotated[Path, typer.Option(help="an sd_lora experiment config: its pipeline's text encoder and "
                                              "prompt wording")],
    dtype: Annotated[str, typer.Option(help="float16 or float32")] = "float16",
    batch_size: int = 64,
    gpu: Annotated[bool, typer.Option("--gpu", help="encode on this machine's GPU")] = False,
) -> None:
    """Encode the dataset's finite set of sd_lora prompts once into prompt_embeddings.safetensors, read by
    training with data.use_latents instead of running the text encoder."""
    _write_prompt_embeddings(dataset, _load(config, []).model, dtype, batch_size, gpu)
