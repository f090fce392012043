"""Mask adherence at demo scale: a part-mask latent model trained with its masks against the same model trained
ignoring them, both scored by one segmenter (`facediff evaluate --segmenter`, docs/evaluation.md).

    python benchmarks/mask_adherence.py [--quick] [--out DIR] [--faces N] [--kimg K] [--margin M]

Every step is the `facediff` command a user runs, on the demo's data and budget (facediff/demo.py):
  1. `prepare synthetic` + `prepare celebamask`: the demo's synthetic faces (64 px) -> 32 px shards, with masks;
  2. `fit-autoencoder`: the demo's tiny VQ, fitted for the demo's steps;
  3. `train-segformer configs/segformer/tiny.yaml`: the segmenter, on the same shards and the 10 default groups;
  4. `train configs/experiments/tiny/demo_lc_unet_seg.yaml` twice, the same seed and budget (the demo's latent
     kimg): "with masks" as configured (mask dropout 0.1, for guidance), and "ignores masks" with
     `model.mask_dropout=1.0`: every training sample's mask features are replaced by the learned null condition,
     so nothing of the masks reaches the UNet (the config's own key; the model is otherwise identical);
  5. `evaluate RUN --segmenter SEG` on each: "with masks" at its `eval.mask_guidance` (2.0), "ignores masks" at
     `eval.mask_guidance=0`, i.e. sampled from the attributes alone, exactly as it was trained (at 2.0 it would
     be fed mask features it never saw in training).
Prints mask_miou of both models and mask_miou_real (the same segmenter on the real test faces, the ceiling) and
the seconds of each step; exits 1 when the with-masks model does not beat the other by `--margin` (0.1) times
mask_miou_real.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from facediff.demo import (  # noqa: E402  (the demo's data and autoencoder budget, not a copy of it)
    AUTOENCODER_BATCH, AUTOENCODER_STEPS, DEFAULT_FACES, DEFAULT_KIMG, EXPERIMENTS, LATENT_KIMG_FACTOR, SHARD_ROWS,
)

REPO = Path(__file__).resolve().parents[1]
MODEL = EXPERIMENTS / "tiny" / "demo_lc_unet_seg.yaml"
SEGMENTER = REPO / "configs" / "segformer" / "tiny.yaml"
FACEDIFF = Path(sys.executable).parent / "facediff"
FULL = {"faces": DEFAULT_FACES, "kimg": DEFAULT_KIMG * LATENT_KIMG_FACTOR, "autoencoder_steps": AUTOENCODER_STEPS,
        "segmenter_steps": 2000}
QUICK = {"faces": 512, "kimg": 8.0, "autoencoder_steps": 400, "segmenter_steps": 2000}
VARIANTS = {  # name -> (training overrides, evaluation overrides)
    "with masks": ([], []),
    "ignores masks": (["model.mask_dropout=1.0"], ["eval.mask_guidance=0"]),
}


def facediff(*args: str, log: Path) -> tuple[str, float]:
    """Run one `facediff` command; its output goes to `log`, and its last line is returned with its seconds."""
    start = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ facediff {' '.join(args)}\n")
        f.flush()
        done = subprocess.run([str(FACEDIFF), *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        f.write(done.stdout)
    if done.returncode != 0:
        sys.exit(f"facediff {args[0]} failed (exit {done.returncode}); its output is in {log}")
    lines = done.stdout.strip().splitlines()
    return lines[-1] if lines else "", time.time() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"smaller sizes: {QUICK}")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "mask_adherence")
    parser.add_argument("--faces", type=int, help="synthetic faces (default: the demo's, 1,024)")
    parser.add_argument("--kimg", type=float, help="thousands of images each model trains on (default 24)")
    parser.add_argument("--autoencoder-steps", type=int, help="fit-autoencoder steps (default: the demo's, 1,000)")
    parser.add_argument("--segmenter-steps", type=int, help="train-segformer steps (default 2,000)")
    parser.add_argument("--margin", type=float, default=0.1,
                        help="how far the with-masks mask_miou must lie above the other's, as a fraction of "
                             "mask_miou_real (the ceiling)")
    args = parser.parse_args()
    sizes = dict(QUICK if args.quick else FULL)
    sizes.update({k: v for k in sizes if (v := getattr(args, k)) is not None})
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)  # start over: a re-used run name would resume the old run
    out.mkdir(parents=True)
    log, raw, shards, autoencoder = out / "commands.log", out / "faces", out / "shards", out / "autoencoder"
    seconds: dict[str, float] = {}
    total = time.time()

    _, seconds["data"] = facediff("prepare", "synthetic", str(raw), "--n", str(sizes["faces"]), "--size", "64",
                                  log=log)
    seconds["data"] += facediff("prepare", "celebamask", str(raw), str(shards), "--image-size", "32",
                                "--mask-size", "32", "--rows-per-shard", str(SHARD_ROWS), log=log)[1]
    data = [f"data.path={shards}"]
    _, seconds["autoencoder"] = facediff("fit-autoencoder", str(MODEL), str(autoencoder), *data,
                                         "--steps", str(sizes["autoencoder_steps"]),
                                         "--batch-size", str(AUTOENCODER_BATCH), log=log)
    line, seconds["segmenter"] = facediff("train-segformer", str(SEGMENTER), *data,
                                          f"trainer.storage_path={out / 'segformer'}", "trainer.run_name=default",
                                          f"trainer.steps={sizes['segmenter_steps']}", log=log)
    segmenter = out / "segformer" / "default"
    print(f"segmenter: {line}")

    kimg = sizes["kimg"]
    common = [*data, f"model.autoencoder.pretrained={autoencoder}", f"trainer.storage_path={out / 'runs'}",
              f"trainer.total_kimg={kimg}", f"trainer.checkpoint_every_kimg={kimg}", "eval.steps=20",
              "eval.sample_grid=0", "eval.bootstrap=0", "eval.attribute_accuracy=false"]
    results = {}
    for name, (train_overrides, eval_overrides) in VARIANTS.items():
        run_name = name.replace(" ", "_")
        _, seconds[f"train {name}"] = facediff("train", str(MODEL), *common, f"trainer.run_name={run_name}",
                                               *train_overrides, log=log)
        sets = [arg for key in eval_overrides for arg in ("--set", key)]
        line, seconds[f"evaluate {name}"] = facediff("evaluate", str(out / "runs" / run_name), "--segmenter",
                                                     str(segmenter), "--device", "cpu", *sets, log=log)
        results[name] = json.loads(line)

    with_masks, ignoring = results["with masks"]["mask_miou"], results["ignores masks"]["mask_miou"]
    real = results["with masks"]["mask_miou_real"]
    gap, required = with_masks - ignoring, args.margin * real
    print(f"{sizes['faces']} faces, each model {kimg:g} kimg; segmenter {sizes['segmenter_steps']} steps; "
          f"test faces: the shards' test split")
    print(f"mask_miou, trained with its masks   {with_masks:.3f}")
    print(f"mask_miou, ignores its masks        {ignoring:.3f}")
    print(f"mask_miou_real (segmenter ceiling)  {real:.3f}")
    print(f"gap {gap:.3f} (required > {required:.3f}: {args.margin:g} x the ceiling); per group, with / ignoring: "
          + ", ".join(
        f"{k.split('/')[1]} {v:.2f}/{results['ignores masks'].get(k, float('nan')):.2f}"
        for k, v in results["with masks"].items() if k.startswith("mask_iou/") and v is not None))
    distance = next((k for k in results["with masks"] if k.startswith(("fid", "fd_"))), None)
    if distance:
        print(f"{distance}: with masks {results['with masks'][distance]:.3f}, "
              f"ignores masks {results['ignores masks'][distance]:.3f}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
          + f"; total {time.time() - total:.0f} (commands' output in {log})")
    (out / "results.json").write_text(json.dumps({"sizes": sizes, "results": results, "seconds": seconds}, indent=2))
    if gap <= required:
        print(f"FAIL: the model trained with its masks is not clearly above the one that ignores them "
              f"({with_masks:.3f} vs {ignoring:.3f}, required gap {required:.3f})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
