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
    from facediff.train.run import train as run

    typer.echo(f"run folder: {run(_load(path, overrides))}")


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
) -> None:
    """Draw samples from a trained model into a PNG grid."""
    from facediff.sampling import generate, load_model, save_samples

    try:
        _, task = load_model(model)
        images = generate(task, n, sampler, steps, seed, batch_size)
    except (FileNotFoundError, ValueError, ConfigError) as err:
        _fail(str(err))
    typer.echo(f"wrote {save_samples(images, out, individual)}")


@app.command()
def evaluate(
    model: Annotated[Path, typer.Argument(help="a run folder or an exported model folder")],
    split: Annotated[str, typer.Option(help="the prepared split to compare against")] = "test",
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="key=value config overrides")] = None,
) -> None:
    """FID (or the labelled fallback distance) of a model's samples against a held-out split."""
    from facediff.eval.evaluate import evaluate_run

    try:
        result = evaluate_run(model, split, overrides or [])
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


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="where the demo writes everything")] = Path("outputs/demo"),
    n: Annotated[int, typer.Option(help="synthetic faces to generate")] = 256,
    kimg: Annotated[float, typer.Option(help="thousands of images to train on")] = 4.0,
) -> None:
    """End to end, offline: synthetic faces -> shards -> tiny UNet on 2 DeepSpeed workers -> samples, curves."""
    from facediff.demo import run_demo

    typer.echo(run_demo(out, n=n, kimg=kimg))


def main() -> None:  # pragma: no cover
    sys.exit(app())
