"""The `facediff` command line."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from facediff.config import ConfigError, dump_config, load_config

app = typer.Typer(help="Distributed training of face diffusion models on Ray.", no_args_is_help=True)
prepare_app = typer.Typer(help="Turn datasets into Parquet shards.", no_args_is_help=True)
app.add_typer(prepare_app, name="prepare")


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@prepare_app.command("celebamask")
def prepare_celebamask(
    root: Annotated[Path, typer.Argument(help="CelebAMask-HQ root (official release layout)")],
    out: Annotated[Path, typer.Argument(help="output folder for shards and manifest.json")],
    image_size: int = 256,
    mask_size: int = 256,
    rows_per_shard: int = 1000,
    test_size: Annotated[int, typer.Option(help="test images (scaled down to a tenth for tiny inputs)")] = 300,
    train_size: Annotated[Optional[int], typer.Option(help="2700 small regime, 27000 full; default all")] = None,
    seed: int = 0,
    image_format: Annotated[str, typer.Option(help="jpeg or png")] = "jpeg",
    workers: Annotated[Optional[int], typer.Option(help="processes; default one per core")] = None,
    overwrite: bool = False,
) -> None:
    """Read the official CelebAMask-HQ layout and write train/test Parquet shards."""
    from facediff.data.annotations import AnnotationError
    from facediff.data.prepare import prepare_celebamask as run

    if image_format not in ("jpeg", "png"):
        _fail(f"--image-format must be jpeg or png, got {image_format!r}")
    try:
        manifest = run(
            root, out, image_size=image_size, mask_size=mask_size, rows_per_shard=rows_per_shard,
            test_size=test_size, train_size=train_size, seed=seed, image_format=image_format,
            workers=workers, overwrite=overwrite,
        )
    except (AnnotationError, FileNotFoundError, FileExistsError, ValueError) as err:
        _fail(str(err))
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
    from facediff.data.synthetic import write_synthetic_celebamask

    write_synthetic_celebamask(out, n=n, size=size, seed=seed, with_partition=with_partition, workers=workers)
    typer.echo(f"wrote {n} synthetic faces to {out}")


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
    from facediff.data.annotations import AnnotationError
    from facediff.data.coco import prepare_coco as run

    try:
        manifest = run(
            root, out, splits=[s.strip() for s in splits.split(",") if s.strip()], image_size=image_size,
            min_person_area=min_person_area, face_threshold=face_threshold, detect_faces=faces,
            rows_per_shard=rows_per_shard, workers=workers, overwrite=overwrite,
        )
    except (AnnotationError, FileNotFoundError, FileExistsError, ValueError) as err:
        _fail(str(err))
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
    from facediff.data.synthetic_coco import write_synthetic_coco

    try:
        write_synthetic_coco(out, n=n, size=size, seed=seed, val_fraction=val_fraction, workers=workers)
    except ValueError as err:
        _fail(str(err))
    typer.echo(f"wrote {n} synthetic people scenes to {out}")


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
) -> None:
    """Encode every image once with the frozen autoencoder into shards with a `latents` column."""
    from pydantic import ValidationError

    from facediff.config.schema import AutoencoderConfig
    from facediff.data.latents import prepare_latents as run

    fields = {}
    if config is not None:
        from facediff.config.schema import model_autoencoder

        autoencoder = model_autoencoder(_load(config, []).model)
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


@app.command()
def preview(
    dataset: Annotated[Path, typer.Argument(help="a prepared dataset folder")],
    out: Annotated[Path, typer.Option(help="PNG to write")] = Path("outputs/preview.png"),
    split: str = "train",
    n: int = 16,
) -> None:
    """A PNG grid of faces beside their coloured part maps."""
    from facediff.viz import preview_dataset

    try:
        typer.echo(f"wrote {preview_dataset(dataset, out, split=split, n=n)}")
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))


@app.command()
def config(
    path: Annotated[Path, typer.Argument(help="experiment config YAML")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value overrides")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Validate a config (with overrides) and print it fully resolved."""
    try:
        cfg = load_config(path, overrides or [])
    except ConfigError as err:
        _fail(str(err))
    typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2) if as_json else dump_config(cfg))


def _load(path: Path, overrides: list[str] | None):
    try:
        return load_config(path, overrides or [])
    except ConfigError as err:
        _fail(str(err))


@app.command()
def info(
    path: Annotated[Path, typer.Argument(help="experiment config YAML")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value overrides")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Every network the config builds, with trainable and frozen parameter counts (no training)."""
    from facediff.models.info import describe

    rows = describe(_load(path, overrides))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(f"{'network':<12} {'class':<28} {'trainable':>14} {'frozen':>14}")
    for r in rows:
        typer.echo(f"{r['name']:<12} {r['class']:<28} {r['trainable']:>14,} {r['frozen']:>14,}")


@app.command()
def train(
    path: Annotated[Path, typer.Argument(help="experiment config YAML")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value overrides")] = None,
) -> None:
    """Train with Ray Train + DeepSpeed; re-running the same run name resumes it."""
    from facediff.config import resolve_paths
    from facediff.train.run import check_inputs, train as run

    cfg = _load(path, overrides)
    try:
        check_inputs(resolve_paths(cfg))
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    typer.echo(f"run folder: {run(cfg)}")


@app.command("train-segformer")
def train_segformer(
    path: Annotated[Path, typer.Argument(help="SegFormer fine-tuning config YAML (configs/segformer/)")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value overrides")] = None,
) -> None:
    """Fine-tune SegFormer to segment the part groups (Ray Train, DDP); report test mIoU, save the checkpoint."""
    from facediff.train.segformer import load_segformer_config, train_segformer as run

    try:
        cfg = load_segformer_config(path, overrides or [])
        out = run(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        _fail(str(err))
    metrics = json.loads((out / "metrics.json").read_text())
    typer.echo(f"test mIoU {metrics['miou']:.4f}; wrote {out} (load it as a mask encoder with "
               f"pretrained: {out / 'segformer'})")


@app.command()
def sample(
    model: Annotated[Path, typer.Argument(help="a run folder or an exported model folder")],
    n: int = 16,
    out: Annotated[Path, typer.Option(help="PNG grid to write")] = Path("outputs/samples.png"),
    sampler: Annotated[str, typer.Option(help="ddpm, ddim or dpm++")] = "ddim",
    steps: int = 50,
    seed: int = 0,
    batch_size: int = 32,
    individual: Annotated[Optional[Path], typer.Option(help="also write each image into this folder")] = None,
    attributes: Annotated[Optional[str], typer.Option(
        help="conditional models: comma-separated attribute names set to 1 (all others 0), e.g. Smiling,Male")] = None,
    from_test: Annotated[bool, typer.Option(
        help="conditional models: condition sample k on test record k (attributes and part masks)")] = False,
    prompt: Annotated[Optional[str], typer.Option(help="sd_lora models: a free text prompt for every sample")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="key=value config overrides, "
                                                           "e.g. eval.attribute_guidance=3")] = None,
    device: Annotated[str, typer.Option(help="auto (a CUDA GPU when present), cpu, cuda or cuda:N")] = "auto",
) -> None:
    """Draw samples from a trained model into a PNG grid."""
    from facediff.sampling import (attribute_vector, generate, load_model, record_conditions, resolve_device,
                                   save_samples)

    try:
        target = resolve_device(device)
        cfg, task = load_model(model, overrides or [])
        task = task.to(target)
        family = cfg.model.family
        conditional = family == "lc_unet" or (family == "sd_lora" and cfg.model.conditional)
        if prompt is not None and family != "sd_lora":
            raise ValueError(f"{model}: --prompt is for sd_lora models, not {family!r}; use --attributes")
        if (attributes is not None or from_test) and not conditional:
            raise ValueError(f"{model}: a {family!r} model is unconditional; drop --attributes/--from-test")
        given = (attributes is not None) + from_test + (prompt is not None)
        if conditional and given != 1:
            raise ValueError("a conditional model needs exactly one of --attributes NAMES, --from-test"
                             + (" or --prompt TEXT" if family == "sd_lora" else ""))
        conditions = None
        if prompt is not None:
            conditions = {"prompts": [prompt] * n}
        elif from_test:
            conditions = record_conditions(cfg, n)
        elif attributes is not None:
            conditions = {"attributes": attribute_vector(attributes).expand(n, -1)}
        images = generate(task, n, sampler, steps, seed, batch_size, conditions)
    except (FileNotFoundError, ValueError, ConfigError) as err:
        _fail(str(err))
    typer.echo(f"wrote {save_samples(images, out, individual)}")


@app.command()
def evaluate(
    model: Annotated[Path, typer.Argument(help="a run folder, an exported model folder, or an experiment config "
                                               "(the model untrained, e.g. plain SD under a fresh ControlNet)")],
    split: Annotated[Optional[str], typer.Option(help="the prepared split to compare against; default the "
                                                      "config's data.eval_split")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="key=value config overrides")] = None,
    device: Annotated[str, typer.Option(help="auto (a CUDA GPU when present), cpu, cuda or cuda:N")] = "auto",
) -> None:
    """FID (or the labelled fallback distance) of a model's samples against a held-out split."""
    from facediff.eval.evaluate import evaluate_run

    try:
        result = evaluate_run(model, split, overrides or [], device)
    except (FileNotFoundError, ValueError, ConfigError) as err:
        _fail(str(err))
    typer.echo(json.dumps(result))


@app.command()
def tune(
    grid: Annotated[Path, typer.Argument(help="Tune grid file (configs/tune/*.yaml)")],
    overrides: Annotated[Optional[list[str]], typer.Argument(
        help="key=value: grid fields (num_samples=2) or training keys for every trial (data.path=...)")] = None,
) -> None:
    """Run an ablation grid on Ray Tune with ASHA; re-running the same command resumes the experiment."""
    from facediff.tune import run_tune

    try:
        summary = run_tune(grid, overrides or [])
    except ConfigError as err:
        _fail(str(err))
    typer.echo(json.dumps(summary, indent=2, default=str))
    if summary["errors"] or not summary["reported_metric"]:
        typer.secho(f"error: {summary['errors']} of {summary['trials']} trials failed, "
                    f"{summary['reported_metric']} reported {summary['metric']}"
                    + (f"; first error: {summary['first_error']}" if summary["first_error"] else "")
                    + f" (see {summary['markdown']})", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="where the demo writes everything")] = Path("outputs/demo"),
    n: Annotated[int, typer.Option(help="synthetic faces to generate")] = 256,
    kimg: Annotated[float, typer.Option(help="thousands of images to train each model on")] = 4.0,
    stages: Annotated[str, typer.Option(help="comma-separated: pixel, conditional, sd_lora, controlnet")] =
    "pixel,conditional",
    conditional: Annotated[bool, typer.Option(help="--no-conditional leaves the conditional stage out")] = True,
) -> None:
    """End to end, offline: synthetic faces -> shards -> tiny pixel UNet and tiny latent conditional UNet, each on
    2 DeepSpeed workers -> samples, an attribute sweep, curves; `--stages` adds the SD LoRA and ControlNet ones."""
    from facediff.demo import run_demo

    chosen = tuple(s.strip() for s in stages.split(",") if s.strip() and (conditional or s.strip() != "conditional"))
    try:
        summary = run_demo(out, n=n, kimg=kimg, stages=chosen)
    except ValueError as err:
        if "--stages" not in str(err):
            raise
        _fail(str(err))
    typer.echo(summary)


@app.command("fit-autoencoder")
def fit_autoencoder(
    path: Annotated[Path, typer.Argument(help="experiment config whose model.autoencoder is fitted (a tiny preset)")],
    out: Annotated[Path, typer.Argument(help="folder for the fitted autoencoder (diffusers format)")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value overrides, e.g. data.path=...")] = None,
    steps: int = 400,
    batch_size: int = 32,
    lr: float = 2e-3,
) -> None:
    """Fit a small autoencoder for reconstruction on the shards; name it with model.autoencoder.pretrained=OUT."""
    from facediff.train.autoencoder import fit_autoencoder as run

    cfg = _load(path, overrides)
    if cfg.model.family != "lc_unet":
        _fail(f"{path}: model family {cfg.model.family!r} has no autoencoder")
    try:
        result = run(cfg, out, steps=steps, batch_size=batch_size, lr=lr, seed=cfg.trainer.seed)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    typer.echo(f"wrote {out}: reconstruction MSE {result['mse_before']:.4f} -> {result['mse_after']:.4f}")


def main() -> None:  # pragma: no cover
    sys.exit(app())
