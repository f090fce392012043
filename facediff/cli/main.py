"""The `facediff` command line.

Each command imports what it runs inside its function: `facediff --help` and a mistyped option answer without
loading torch, Ray or diffusers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from facediff.cli.errors import fail as _fail
from facediff.cli.errors import job_failures, user_errors
from facediff.cli.errors import load_or_fail as _load
from facediff.cli.prepare import prepare_app
from facediff.config import ConfigError, dump_config, load_config

app = typer.Typer(help="Distributed training of face diffusion models on Ray.", no_args_is_help=True)
app.add_typer(prepare_app, name="prepare")


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="also show Ray's, Ray Data's and DeepSpeed's own logs, and tracebacks")] = False) -> None:
    from facediff.console import setup_logging

    setup_logging(verbose)


def _cpu_threads(device: str = "cpu") -> None:
    """Work this process does on the CPU: torch threads for the idle cores only, said on stderr when lowered
    (`facediff.threads`: on a busy machine 2 stalled OpenMP threads ran 3x behind 1)."""
    from facediff.runs.load import resolve_device
    from facediff.threads import busy_cores_note

    if resolve_device(device).type == "cpu" and (note := busy_cores_note()):
        typer.echo(f"facediff: {note}", err=True)


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
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="no Ray, nothing kept: build every network at its real size, one optimizer step, one "
                          "evaluation batch, a checkpoint, a resume and an export on this device, then print the "
                          "parameters, s/step, memory and the projected wall time (docs/dry-run.md)")] = False,
    random_weights: Annotated[bool, typer.Option(
        "--random-weights", help="with --dry-run: build pretrained networks from their shipped presets, randomly "
                                 "initialised (no weights read)")] = False,
    resume_with_changes: Annotated[bool, typer.Option(
        "--resume-with-changes", help="resume the run although this config differs from the one it recorded in keys "
                                      "that define the run; the changes are recorded in its config-history.jsonl "
                                      "(docs/resuming.md)")] = False,
) -> None:
    """Train with Ray Train + DeepSpeed; re-running the same run name resumes it (docs/resuming.md)."""
    from facediff.config import resolve_paths
    from facediff.data.staging import refuse_file_on_path
    from facediff.train.identity import check_resume
    from facediff.train.run import check_inputs, run_storage, train as run

    cfg = _load(path, overrides)
    if random_weights and not dry_run:
        _fail("--random-weights is for --dry-run (a real run trains on the pretrained weights)")
    if dry_run:
        _dry_run(cfg, path, random_weights)
        return
    try:  # both again in `run`, here for one error line and exit code 2 before Ray starts
        resolved = resolve_paths(cfg)
        check_inputs(resolved)
        storage = run_storage(resolved)
        if not storage.remote:  # a run folder under a file: one line now, not NotADirectoryError from Ray later
            refuse_file_on_path(storage.local)
        check_resume(resolved, storage, resume_with_changes)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        _fail(str(err))
    from facediff.train.placement import PlacementError

    with job_failures("training"), user_errors(PlacementError):  # workers the cluster cannot hold: exit 2
        folder = run(cfg, resume_with_changes=resume_with_changes)
    typer.echo(f"run folder: {folder}")


def _dry_run(cfg, path: Path, random_weights: bool) -> None:
    """`train --dry-run`: a progress line per stage, then the table; exit 1 naming the stage that failed."""
    from facediff.config import resolve_paths
    from facediff.console import verbose
    from facediff.models.pretrained import WeightsNotFound
    from facediff.train.dry_run import StageFailed, check_data, dry_run, format_table

    with user_errors():  # missing shards: one line, before the note on busy cores and any build
        check_data(resolve_paths(cfg))
    _cpu_threads()
    try:
        report = dry_run(cfg, path.stem, random_weights, echo=typer.echo)
    except WeightsNotFound as err:
        _fail(f"{err} (--random-weights builds them from their presets instead)")
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    except StageFailed as failed:
        typer.echo(format_table([failed.report]))
        first = next((line.strip() for line in str(failed.error).splitlines() if line.strip()), "")
        typer.secho(f"error: dry run failed at stage {failed.stage!r}: {type(failed.error).__name__}: {first} "
                    "(--verbose for the traceback)", fg=typer.colors.RED, err=True)
        if verbose():
            raise
        raise typer.Exit(code=1) from None
    for note in report.notes:
        typer.echo(f"note: {note}")
    typer.echo(format_table([report]))


@app.command("train-segformer")
def train_segformer(
    path: Annotated[Path, typer.Argument(help="SegFormer fine-tuning config YAML (configs/segformer/)")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value overrides")] = None,
) -> None:
    """Fine-tune SegFormer to segment the part groups (Ray Train, DDP); report test mIoU, save the checkpoint."""
    from facediff.train.placement import PlacementTimeout
    from facediff.storage import is_remote
    from facediff.train.segformer import train_segformer as run
    from facediff.train.segformer_config import load_segformer_config

    try:
        cfg = load_segformer_config(path, overrides or [])
        out = run(cfg)
    except (ConfigError, FileNotFoundError, ValueError, PlacementTimeout) as err:
        _fail(str(err))
    metrics = json.loads((out / "metrics.json").read_text())
    store = cfg.trainer.storage_path
    uri = f"{store.rstrip('/')}/{cfg.run_name()}" if is_remote(store) else str(out)  # out: the local mirror
    typer.echo(f"test mIoU {metrics['miou']:.4f}; wrote {uri} (load it as a mask encoder with "
               f"pretrained: {uri}/segformer)")


@app.command()
def sample(
    model: Annotated[str, typer.Argument(help="a run folder (local or s3://...) or an exported model folder")],
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
    from facediff.data.staging import check_at_least
    from facediff.diffusion import SAMPLERS
    from facediff.runs.load import load_model, resolve_device
    from facediff.sampling import attribute_vector, check_outputs, generate, record_conditions, save_samples

    try:  # options and output paths first: a bad one must not cost the samples (sampling can take hours)
        check_at_least(("--n", n, 1), ("--steps", steps, 1), ("--batch-size", batch_size, 1))
        if sampler not in SAMPLERS:
            raise ValueError(f"--sampler {sampler!r}: choose one of {', '.join(sorted(SAMPLERS))}")
        check_outputs(out, individual)
        if attributes is not None:
            attribute_vector(attributes)
        target = resolve_device(device)
        _cpu_threads(device)
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
    model: Annotated[str, typer.Argument(help="a run folder (local or s3://...), an exported model folder, or an "
                                              "experiment config (the model untrained, e.g. plain SD under a fresh "
                                              "ControlNet)")],
    split: Annotated[Optional[str], typer.Option(help="the prepared split to compare against; default the "
                                                      "config's data.eval_split")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="key=value config overrides")] = None,
    device: Annotated[str, typer.Option(help="auto (a CUDA GPU when present), cpu, cuda or cuda:N")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="where to write the evaluation JSON; default "
                                                     "MODEL/evaluation.json (a run or export folder)")] = None,
    memorisation: Annotated[bool, typer.Option(help="also the memorisation audit: the share of samples closer to "
                                                    "a training face than held-out faces are "
                                                    "(docs/evaluation.md#memorisation)")] = False,
    segmenter: Annotated[Optional[str], typer.Option(help="mask models: a `facediff train-segformer` run folder; "
                                                          "adds mask_miou (sets eval.mask_segmenter)")] = None,
) -> None:
    """FID (or the labelled fallback distance) of a model's samples against a held-out split: the protocol, then
    the value; both saved in evaluation.json. The last line is the results as JSON."""
    from facediff.eval import protocol
    from facediff.eval.memorisation import memorisation_line
    from facediff.runs.evaluate import evaluate_run

    def announce(described: dict, metric: str) -> None:
        for line in protocol.protocol_lines(described, metric):
            typer.echo(line)

    try:
        protocol.check_out(out)
        _cpu_threads(device)
        overrides = [*(overrides or []), *([f"eval.mask_segmenter={segmenter}"] if segmenter else [])]
        evaluation = evaluate_run(model, split, overrides, device, announce=announce,
                                  memorisation=memorisation, out=out)
    except (FileNotFoundError, ValueError, ConfigError) as err:
        _fail(str(err))
    for line in protocol.result_lines(evaluation):  # before the save: hours of samples
        typer.echo(line)
    if "memorisation" in evaluation:
        typer.echo(memorisation_line(evaluation))
    try:
        saved = protocol.save(evaluation, out)
    except OSError as err:
        _fail(f"the evaluation could not be saved ({err}); give --out PATH")
    typer.echo(f"saved in {saved}" if saved else "not saved: an untrained config has no run folder; give --out")
    typer.echo(json.dumps(evaluation["results"]))


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
    n: Annotated[int, typer.Option(help="synthetic faces to generate")] = 1024,
    kimg: Annotated[float, typer.Option(
        help="thousands of images to train the pixel model on (the latent model: 1.5 times it)")] = 16.0,
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
    _cpu_threads()
    try:
        result = run(cfg, out, steps=steps, batch_size=batch_size, lr=lr, seed=cfg.trainer.seed)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    typer.echo(f"wrote {out}: reconstruction MSE {result['mse_before']:.4f} -> {result['mse_after']:.4f}, "
               f"latent scaling factor {result['scaling_factor']:.3f} (unit-variance latents)")


def main() -> None:  # pragma: no cover
    sys.exit(app())
