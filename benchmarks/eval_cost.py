"""Cost of one evaluation: DPM-Solver++ at 25 steps against the paper's 1000-step DDPM, on the same model.

    uv run python benchmarks/eval_cost.py [--model RUN_OR_EXPORT] [--data SHARDS] [--num-samples 16] [--threads 1]

Both protocols run `evaluate_task` (what training and `facediff evaluate` run) on the same model with the same
seeds (eval.seed), against the same real statistics and with the same metric: FID when the Inception weights can
be had, else the named fallback distance (e.g. fd_mtcnn_onet). The real test images are fed once before timing,
as the in-training Evaluator keeps them between evaluations; a protocol's time is generating `--num-samples`
images, their features and `compute()`.

--model is a run folder or an export (or an experiment config, untrained), loaded as `facediff evaluate` loads
it; without it the tiny UNet preset is built with random weights, so the distances compare the samplers, not a
trained model. Without --data a temporary synthetic dataset (procedural faces, `prepare celebamask`) is written
at the model's image size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from facediff.data.stream.local_batches import local_test_batches  # noqa: E402
from facediff.eval.evaluate import evaluate_task  # noqa: E402
from facediff.eval.metrics import build_image_distance  # noqa: E402
from facediff.rng import batch_generator  # noqa: E402
from facediff.runs.load import load_model, resolve_device  # noqa: E402

TINY_PRESET = REPO / "configs" / "experiments" / "tiny" / "tiny_unet.yaml"
# (sampler, steps): the cheap protocol, then the paper's (its own suggestion is to replace the second by the first)
PROTOCOLS = (("dpm++", 25), ("ddpm", 1000))


def temporary_dataset(root: Path, image_size: int, test_records: int) -> Path:
    """Synthetic faces prepared into shards whose test split holds `test_records` records."""
    from facediff.data.prepare.celebamask import prepare_celebamask
    from facediff.data.synthetic.celebamask import write_synthetic_celebamask

    # prepare keeps at most a tenth of the faces for the test split, so write ten times as many
    write_synthetic_celebamask(root / "raw", n=10 * test_records, size=max(64, image_size), seed=0, progress=False)
    prepare_celebamask(root / "raw", root / "shards", image_size=image_size, mask_size=image_size,
                       test_size=test_records, progress=False)
    return root / "shards"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_evaluation(task, cfg, batches, metric, sampler: str, steps: int, device) -> tuple[float, float]:
    """Seconds and metric value of one evaluation with `sampler` at `steps` (the real statistics already fed)."""
    cfg.eval.sampler, cfg.eval.steps = sampler, steps  # validated assignment: a name the config accepts
    sync(device)
    start = time.perf_counter()
    result = evaluate_task(task, cfg, batches, metric, feed_real=False)  # also resets the generated statistics
    sync(device)
    return time.perf_counter() - start, result[metric.name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="run folder or export (default: the tiny UNet, random weights)")
    parser.add_argument("--data", type=Path, help="prepared dataset folder (default: a temporary synthetic one)")
    parser.add_argument("--split", help="split holding the real images (default: the config's data.eval_split)")
    parser.add_argument("--num-samples", type=int, default=16, help="generated images per evaluation")
    parser.add_argument("--batch-size", type=int, default=16, help="images sampled at once")
    parser.add_argument("--device", default="auto", help="auto (a CUDA GPU when present), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="initialisation of the random-weight preset")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default torch's own); on a CPU shared "
                        "with other jobs 1 is far steadier: 2 threads there ran up to 8x slower per step")
    args = parser.parse_args()
    if args.num_samples < 2:
        parser.error("--num-samples: a Fréchet distance needs at least 2 generated images")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    overrides = [f"eval.num_samples={args.num_samples}", f"eval.batch_size={args.batch_size}"]
    overrides += [f"data.path={args.data}"] if args.data else []
    torch.manual_seed(args.seed)  # the preset's random initialisation, reproducible
    cfg, task = load_model(args.model or TINY_PRESET, overrides)
    untrained = args.model is None or args.model.suffix in (".yaml", ".yml")  # a config: the model as built
    task = task.to(device)
    temporary = None
    try:
        if args.data is None:
            temporary = Path(tempfile.mkdtemp(prefix="facediff-eval-cost-"))
            cfg.data.path = str(temporary_dataset(temporary, cfg.data.image_size, args.num_samples))
        metric = build_image_distance(cfg.eval).to(device)
        batches = local_test_batches(cfg, args.split)

        start = time.perf_counter()
        for batch in batches():
            metric.update_real(batch["image"].float())
        real_s = time.perf_counter() - start
        if metric.num_real < 2:
            sys.exit(f"{cfg.data.path}: the split holds {metric.num_real} record(s); the distance needs at least 2")
        # warm-up (conditioned on a test record, for conditional families): first-call costs are neither sampler's
        task.sample(1, batch_generator(0), "ddpm", 2, batch)

        print(f"model: {args.model or TINY_PRESET.relative_to(REPO)} ({cfg.model.family}, {cfg.data.image_size} px)"
              + ("; random weights: the distances compare samplers, not a trained model" if untrained else ""))
        print(f"data: {'temporary synthetic faces' if temporary else cfg.data.path}, {metric.num_real} real "
              f"images ({real_s:.1f}s to feed, once, not counted); metric {metric.name}; {args.num_samples} "
              f"samples per evaluation, batch {args.batch_size}, eval.seed {cfg.eval.seed}; device {device} "
              f"({os.cpu_count()} cores, torch threads {torch.get_num_threads()})")
        print(f"{'protocol':<18} {'sampler':>7} {'steps':>5} {'s/eval':>8} {'s/image':>8} {'metric':>14} {'value':>9}",
              flush=True)
        seconds = []
        for sampler, steps in PROTOCOLS:
            s, value = timed_evaluation(task, cfg, batches, metric, sampler, steps, device)
            seconds.append(s)
            print(f"{f'{sampler} {steps}':<18} {sampler:>7} {steps:>5} {s:>8.1f} {s / args.num_samples:>8.2f} "
                  f"{metric.name:>14} {value:>9.3f}", flush=True)
        print(f"ratio {seconds[1] / seconds[0]:.1f} (seconds per evaluation, ddpm 1000 / dpm++ 25)")
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


if __name__ == "__main__":
    main()
