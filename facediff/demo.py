"""`facediff demo`: the whole pipeline on the embedded synthetic faces, offline, on 2 CPU cores.

Stage 1, pixel space: synthetic faces -> shards -> a small fast UNet trained by Ray Train on 2 DeepSpeed workers ->
samples and curves. Stage 2, latent conditional: a tiny VQ autoencoder fitted on the same shards -> a tiny
attribute-conditioned UNet over its latents -> an attribute sweep (each row one test face's attributes, each
column one attribute switched, the same noise along a row). Opt-in stages (`--stages`): `sd_lora`, the tiny SD
pipeline + LoRA prompted with the attributes (the same sweep, as prompts), and `controlnet`, embedded people
scenes in the COCO layout -> `prepare coco` -> the tiny ControlNet with the mask-aware perceptual loss -> samples
of validation captions and the people measure. Each face stage (pixel, conditional, sd_lora) ends with the
memorisation audit of its run (`runs/memorisation.py`); the first pays for embedding the training faces, the
others read the cached embeddings.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

from facediff.config import load_config
from facediff.ray_start import ray_logs_dir
from facediff.data.prepare.celebamask import prepare_celebamask
from facediff.data.shards import atomic_write_text
from facediff.data.synthetic.celebamask import write_synthetic_celebamask
from facediff.eval.attributes import edit_rate, load_or_train_attribute_reader
from facediff.rng import batch_generator
from facediff.runs.load import load_model
from facediff.runs.memorisation import audit_run, summary_line
from facediff.sampling import attribute_sweep, generate, record_conditions, save_samples, with_edits
from facediff.threads import busy_cores_note
from facediff.train.autoencoder import fit_autoencoder
from facediff.train.run_log import read_metrics
from facediff.train.sample_grid import SAMPLES_DIR
from facediff.train.run import train
from facediff.viz import labelled_grid, plot_curves, preview_dataset

EXPERIMENTS = Path(__file__).resolve().parents[1] / "configs" / "experiments"
CONFIG = EXPERIMENTS / "tiny" / "demo_unet.yaml"  # the tiny UNet made fast on a CPU; x0 prediction (see the file)
CONDITIONAL_CONFIG = EXPERIMENTS / "tiny" / "demo_lc_unet.yaml"  # the tiny one predicting x0 (see the file)
LORA_CONFIG = EXPERIMENTS / "tiny" / "tiny_sd_lora.yaml"
CONTROLNET_CONFIG = EXPERIMENTS / "tiny" / "tiny_controlnet.yaml"
log = logging.getLogger("facediff.demo")
# The demo's budget, measured on 2 cores (docs/demo.md, "Why the demo is set up this way"):
# - 1,024 faces (922 train, 102 test): with 25 test faces real vs real reads 0.55 in fd_mtcnn_onet (0.15 with
#   102), so the old demo's distance could not tell good samples from real ones;
# - shards of 512 rows: Ray Data started a new streaming execution every epoch (every 28 steps of the latent
#   model; now every pass of 8 epochs), one read task per shard; with 32-row shards (29 tasks) that start cost
#   ~1.0 s an epoch under training, with 512-row ones ~0.35 s (6 kimg of the latent model: 26.4-27.2 s vs 20.8 s);
# - the pixel UNet trains on 16 kimg (1,000 steps of 16, ~0.15 s a step through Ray Train): fd_mtcnn_onet 0.43,
#   where 12 kimg gave 0.57-0.66;
# - the latent model on 24 kimg, 750 steps of 32: on the same faces and VQ (plain loop, 102 test faces) 750 steps
#   of 16 read glasses at 0.55 and drew them on 0.18-0.39 of the faces that lacked them when asked; 750 of 32 at
#   0.79 and 0.64, 1,500 of 16 at 0.89 and 0.79. A step of 32 costs 1.4x one of 16 (the tiny model is bound by
#   per-step overhead), so the larger batch is the cheaper way there;
# - the tiny VQ autoencoder is fitted for 1,000 steps of 16 faces: at 400 steps of 32 its decoder loses glasses
#   and hair outlines (train MSE 0.035, 51 s); 1,000 of 16 keep the hair (0.015, 75 s; 1,000 of 32: 0.0096, 115 s).
#   Clear-lens glasses survived in neither: the reader read them at 0.53 on its reconstructions (1.0 on the faces).
#   A factor-2 VQ (3x16x16) kept them (0.73), but the latent model over it costs 1.9x a step and had not learnt
#   to draw them after 2,535 steps, so the demo keeps the 3x8x8 one; with the synthetic glasses' lenses tinted
#   dark, the reconstructions read 0.94 and the samples 0.69 (docs/demo.md).
DEFAULT_FACES, DEFAULT_KIMG = 1024, 16.0
LATENT_KIMG_FACTOR = 1.5
SHARD_ROWS = 512
AUTOENCODER_STEPS, AUTOENCODER_BATCH = 1000, 16
SUMMARY = "summary.json"
STAGES = ("pixel", "conditional", "sd_lora", "controlnet")
DEFAULT_STAGES = ("pixel", "conditional")
HAIR_COLOURS = ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")
EDIT_RECORDS = 32  # test faces each sweep column is measured on (the picture shows 4 of them)
# Column label -> attribute edits; all are visible on the synthetic faces (see facediff/data/synthetic/celebamask.py).
# A hair colour needs hair: the colour edits clear Bald (bald men were a fifth of the men asked to turn blond).
# Earrings are not a column: 1-2 px discs at 32 px that the synthetic data gives to 5% of men, so the edit mostly
# asks for a combination training rarely shows (read back on 0.32-0.46 of the faces; docs/demo.md).
SWEEP = {
    "as is": {},
    "glasses": {"Eyeglasses": 1.0},
    "hat": {"Wearing_Hat": 1.0},
    "blond": {**{h: 0.0 for h in HAIR_COLOURS}, "Blond_Hair": 1.0, "Bald": 0.0},
    "black": {**{h: 0.0 for h in HAIR_COLOURS}, "Black_Hair": 1.0, "Bald": 0.0},
    "pale": {"Pale_Skin": 1.0},
}


def _distances(row: dict) -> dict[str, float]:
    """The image and kernel distances with their intervals and the mean attribute accuracy (per-attribute values
    stay in metrics.jsonl)."""
    return {k: float(v) for k, v in row.items()
            if k in ("fid", "kid", "attr_acc") or k.startswith(("fd_", "kd_", "fid_", "kid_"))}


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())


def _run_overrides(shards: Path, runs: Path, kimg: float) -> list[str]:
    return [f"data.path={shards}", f"trainer.storage_path={runs}", f"trainer.total_kimg={kimg}",
            f"trainer.checkpoint_every_kimg={kimg / 2}", f"eval.every_kimg={kimg}", "eval.steps=20",
            f"eval.log_images_every_kimg={kimg / 4}"]  # the training-time grids: the same faces sharpening


def _training_grids(result: dict) -> list[str]:
    """The line naming a run's training-time sample grids (`train/sample_grid.py`), also in its TensorBoard."""
    run = result.get("paths", {}).get("run")
    grids = sorted((Path(run) / SAMPLES_DIR).glob("*.png")) if run else []
    if not grids:
        return []
    result["paths"]["training_grids"] = grids[0].parent
    return [f"  training-time sample grids     {grids[0].parent}  ({len(grids)}, also in TensorBoard: "
            f"tensorboard --logdir {run}/tensorboard)"]


def sweep_edit_rates(task, cfg, before: torch.Tensor) -> dict[str, float]:
    """What the sweep shows, measured: per column, of the test faces `before` (B, 40) that lacked the attributes
    the column switches on, the fraction the attribute reader reads them on after the edit (same sampler as the
    picture)."""
    reader = load_or_train_attribute_reader(cfg.data.path, cfg.data.image_size, progress=False)
    rates = {}
    for k, (label, edits) in enumerate(SWEEP.items()):
        if not edits:
            continue
        images = task.sample(len(before), batch_generator(1, k), "ddim", 50,
                             {"attributes": with_edits(before, edits)})
        rate = edit_rate(reader, images, before, edits)
        if rate is not None:
            rates[label] = round(rate, 3)
    return rates


def _trained(last: dict) -> dict:
    return {"steps": last["step"], "kimg": round(last["kimg"], 3), "final_loss": last["loss"]}


def pixel_stage(out: Path, shards: Path, kimg: float) -> dict:
    run = train(load_config(CONFIG, _run_overrides(shards, out / "runs", kimg)))
    rows = read_metrics(run)
    curves = plot_curves(rows, out / "curves.png")
    _, task = load_model(run)
    grid = save_samples(generate(task, 16, "ddim", 50, seed=0), out / "samples.png")
    audit = audit_run(run)
    last = rows[-1]
    metrics = _distances(last)
    return {
        "metrics": metrics, **_trained(last), "memorisation": audit,
        "paths": {"run": run, "export": run / "export", "samples": grid, "curves": curves},
        "lines": [
            f"  pixel UNet run                 {run}",
            f"  trained {last['step']} steps / {last['kimg']:.2f} kimg, final loss {last['loss']:.4f}; {_fmt(metrics)}",
            f"  exported diffusers model       {run / 'export'}",
            f"  sample grid                    {grid}",
            summary_line(audit),
            f"  loss / metric curves           {curves}",
        ],
    }


def conditional_stage(out: Path, shards: Path, kimg: float) -> dict:
    overrides = _run_overrides(shards, out / "runs", kimg)
    log.info("conditional: fitting the tiny VQ autoencoder on the shards")
    fitted = fit_autoencoder(load_config(CONDITIONAL_CONFIG, overrides), out / "autoencoder",
                             steps=AUTOENCODER_STEPS, batch_size=AUTOENCODER_BATCH)
    cfg = load_config(CONDITIONAL_CONFIG, overrides + [f"model.autoencoder.pretrained={out / 'autoencoder'}"])
    run = train(cfg)
    rows = read_metrics(run)
    curves = plot_curves(rows, out / "conditional_curves.png", keys=("loss", "loss_mse", "loss_infonce"))
    _, task = load_model(run)
    conditions = record_conditions(cfg, EDIT_RECORDS)  # the picture shows the first 4 of the measured faces
    images = attribute_sweep(task, {k: v[:4] for k, v in conditions.items()}, list(SWEEP.values()), "ddim", 50,
                             seed=0)
    sweep = out / "attribute_sweep.png"
    labelled_grid(images, ncols=len(SWEEP), column_labels=list(SWEEP)).save(sweep)
    edits = sweep_edit_rates(task, cfg, conditions["attributes"])
    audit = audit_run(run)
    last = rows[-1]
    metrics = _distances(last)
    return {
        "metrics": metrics, **_trained(last), "sweep_edit_rates": edits, "memorisation": audit,
        "autoencoder_mse": [fitted["mse_before"], fitted["mse_after"]],
        "autoencoder_scaling_factor": fitted["scaling_factor"],
        "paths": {"autoencoder": out / "autoencoder", "run": run, "attribute_sweep": sweep, "curves": curves},
        "lines": [
            f"  fitted tiny VQ autoencoder     {out / 'autoencoder'}  (reconstruction MSE "
            f"{fitted['mse_before']:.3f} -> {fitted['mse_after']:.3f}, "
            f"latent scaling factor {fitted['scaling_factor']:.3f})",
            f"  conditional UNet run           {run}",
            f"  trained {last['step']} steps / {last['kimg']:.2f} kimg, final loss {last['loss']:.4f} "
            f"(InfoNCE {last.get('loss_infonce', float('nan')):.3f}); {_fmt(metrics)}",
            f"  attribute sweep                {sweep}  (columns: {', '.join(SWEEP)})",
            "  sweep edits read back          " + ", ".join(f"{label} {rate:.2f}" for label, rate in edits.items())
            + f"  (of {EDIT_RECORDS} test faces, those that lacked the attribute)",
            summary_line(audit),
            f"  loss curves                    {curves}",
        ],
    }


def sd_lora_stage(out: Path, shards: Path, kimg: float) -> dict:
    cfg = load_config(LORA_CONFIG, _run_overrides(shards, out / "runs", kimg))
    run = train(cfg)
    rows = read_metrics(run)
    _, task = load_model(run)
    images = attribute_sweep(task, record_conditions(cfg, 4), list(SWEEP.values()), "ddim", 50, seed=0)
    sweep = out / "lora_attribute_sweep.png"
    labelled_grid(images, ncols=len(SWEEP), column_labels=list(SWEEP)).save(sweep)
    audit = audit_run(run)  # the same faces: the embeddings come from the cache the pixel stage wrote
    last = rows[-1]
    metrics = _distances(last)
    return {
        "metrics": metrics, **_trained(last), "memorisation": audit,
        "paths": {"run": run, "export": run / "export", "attribute_sweep": sweep},
        "lines": [
            f"  SD + LoRA run                  {run}",
            f"  trained {last['step']} steps / {last['kimg']:.2f} kimg, final loss {last['loss']:.4f}; {_fmt(metrics)}",
            f"  diffusers LoRA export          {run / 'export'}",
            f"  attribute sweep (prompts)      {sweep}",
            summary_line(audit),
        ],
    }


def controlnet_stage(out: Path, kimg: float) -> dict:
    # no memorisation audit: the ControlNet draws COCO people scenes, not the face crops the audit embeds
    # lazily: the COCO modules need pycocotools, which only this stage uses
    from facediff.data.prepare.coco import prepare_coco
    from facediff.data.synthetic.coco import write_synthetic_coco

    raw, shards = out / "synthetic-coco", out / "coco-shards"
    write_synthetic_coco(raw, n=64, size=320, seed=0)
    manifest = prepare_coco(raw, shards, image_size=64, rows_per_shard=16, overwrite=True)
    cfg = load_config(CONTROLNET_CONFIG, _run_overrides(shards, out / "runs", kimg) + ["eval.steps=10"])
    run = train(cfg)
    rows = read_metrics(run)
    _, task = load_model(run)
    captions = ["two people standing in front of a blue wall", "a person standing on a beach",
                "three people in a park", "a woman standing in front of a building"]
    grid = save_samples(generate(task, 8, "dpm++", 20, seed=0, conditions={"prompts": captions * 2}),
                        out / "controlnet_samples.png")
    last = rows[-1]
    metrics = {**_distances(last), **{k: float(last[k]) for k in last if k.startswith("face_")}}
    return {
        "metrics": metrics, **_trained(last),
        "paths": {"coco_layout": raw, "shards": shards, "run": run, "export": run / "export" / "controlnet",
                  "samples": grid},
        "lines": [
            f"  COCO-layout people scenes      {raw}",
            f"  people shards + manifest       {shards}  {manifest['counts']}",
            f"  ControlNet run                 {run}",
            f"  trained {last['step']} steps / {last['kimg']:.2f} kimg, final loss {last['loss']:.4f} "
            f"(LDM {last.get('loss_ldm', float('nan')):.3f}, LPIPS {last.get('loss_lpips', float('nan')):.3f}, "
            f"face {last.get('loss_face', float('nan')):.4f}); {_fmt(metrics)}",
            f"  ControlNet export (diffusers)  {run / 'export' / 'controlnet'}",
            f"  samples of captions            {grid}",
        ],
    }


def _stage(name: str, description: str, run, results: dict) -> list[str]:
    note = busy_cores_note()  # the driver's own torch work: fewer threads where other work holds cores
    log.info("stage %s: %s%s", name, description, f" ({note})" if note else "")
    start = time.time()
    result = run()
    result["seconds"] = round(time.time() - start, 1)
    results[name] = result
    log.info("stage %s done in %.0f s", name, result["seconds"])
    return [f"{name} stage ({result['seconds']:.0f} s):", *result.pop("lines"), *_training_grids(result)]


def run_demo(out: str | Path, n: int = DEFAULT_FACES, kimg: float = DEFAULT_KIMG,
             stages: tuple[str, ...] = DEFAULT_STAGES) -> str:
    """Run the chosen stages; write `OUT/summary.json` (metrics, seconds and paths per stage) and return the
    summary table the command prints."""
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown or not stages:
        raise ValueError(f"--stages: unknown or no stages {unknown}; choose from {', '.join(STAGES)}")
    out = Path(out).resolve()
    start = time.time()
    raw, shards = out / "synthetic-celebamask", out / "shards"
    results: dict[str, dict] = {}

    def data() -> dict:
        write_synthetic_celebamask(raw, n=n, size=64, seed=0)
        manifest = prepare_celebamask(raw, shards, image_size=32, mask_size=32, rows_per_shard=SHARD_ROWS,
                                      overwrite=True)
        preview = preview_dataset(shards, out / "preview.png")
        shutil.rmtree(out / "runs", ignore_errors=True)  # the demo starts over rather than resuming a finished run
        return {"counts": manifest["counts"], "paths": {"faces": raw, "shards": shards, "preview": preview},
                "lines": [f"  synthetic CelebAMask-HQ tree   {raw}",
                          f"  Parquet shards + manifest      {shards}  {manifest['counts']}",
                          f"  dataset preview                {preview}"]}

    lines = ["facediff demo finished:"]
    lines += _stage("data", f"{n} synthetic faces -> CelebAMask-HQ layout -> Parquet shards", data, results)
    if "pixel" in stages:
        lines += _stage("pixel", f"demo UNet, 2 DeepSpeed workers, {kimg:g} kimg",
                        lambda: pixel_stage(out, shards, kimg), results)
    if "conditional" in stages:
        latent_kimg = kimg * LATENT_KIMG_FACTOR
        lines += _stage("conditional", f"tiny VQ autoencoder + attribute-conditioned UNet, {latent_kimg:g} kimg",
                        lambda: conditional_stage(out, shards, latent_kimg), results)
    if "sd_lora" in stages:
        lines += _stage("sd_lora", "tiny SD pipeline + LoRA, attribute prompts",
                        lambda: sd_lora_stage(out, shards, min(kimg, 1.0)), results)
    if "controlnet" in stages:
        lines += _stage("controlnet", "people scenes -> prepare coco -> tiny ControlNet, mask-aware loss",
                        lambda: controlnet_stage(out, min(kimg, 0.2)), results)
    total = round(time.time() - start, 1)
    logs = ray_logs_dir()
    summary = {"stages": results, "total_seconds": total, "ray_logs": logs}
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2, default=str) + "\n")
    lines += [f"total {total:.0f} s; numbers in {out / SUMMARY}; worker logs in each run's logs/"
              + (f", Ray's in {logs}" if logs else "")]
    return "\n".join(lines)
