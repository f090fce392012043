"""`facediff demo`: the whole pipeline on the embedded synthetic faces, offline, in minutes on 2 CPU cores."""

from __future__ import annotations

import shutil
from pathlib import Path

from facediff.config import load_config
from facediff.data.prepare import prepare_celebamask
from facediff.data.synthetic import write_synthetic_celebamask
from facediff.sampling import generate, load_model, save_samples
from facediff.train.progress import read_metrics
from facediff.train.run import train
from facediff.viz import plot_curves, preview_dataset

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "tiny_unet.yaml"


def run_demo(out: str | Path, n: int = 256, kimg: float = 4.0) -> str:
    out = Path(out).resolve()
    raw, shards = out / "synthetic-celebamask", out / "shards"
    write_synthetic_celebamask(raw, n=n, size=64, seed=0)
    manifest = prepare_celebamask(raw, shards, image_size=32, mask_size=32, rows_per_shard=32, overwrite=True)
    preview = preview_dataset(shards, out / "preview.png")
    cfg = load_config(CONFIG, [
        f"data.path={shards}", f"trainer.storage_path={out / 'runs'}", f"trainer.total_kimg={kimg}",
        f"trainer.checkpoint_every_kimg={kimg / 2}", f"eval.every_kimg={kimg}", "eval.steps=20",
    ])
    shutil.rmtree(out / "runs", ignore_errors=True)  # the demo starts over rather than resuming a finished run
    run = train(cfg)
    rows = read_metrics(run)
    curves = plot_curves(rows, out / "curves.png")
    _, task = load_model(run)
    grid = save_samples(generate(task, 16, "ddim", 50, seed=0), out / "samples.png")
    last = rows[-1]
    distance = ", ".join(f"{k} {v:.2f}" for k, v in last.items() if k == "fid" or k.startswith("fd_"))
    return "\n".join([
        "facediff demo finished:",
        f"  synthetic CelebAMask-HQ tree   {raw}",
        f"  Parquet shards + manifest      {shards}  {manifest['counts']}",
        f"  dataset preview                {preview}",
        f"  run (checkpoints, TensorBoard) {run}",
        f"  trained {last['step']} steps / {last['kimg']:.2f} kimg, final loss {last['loss']:.4f}; {distance}",
        f"  exported diffusers model       {run / 'export'}",
        f"  sample grid                    {grid}",
        f"  loss / metric curves           {curves}",
    ])
