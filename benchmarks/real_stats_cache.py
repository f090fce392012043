"""Seconds per evaluation with the real split's features extracted every time (before) and read from the cache
beside the dataset (after, `facediff/eval/real_stats.py`).

    uv run python benchmarks/real_stats_cache.py [--test-records 25] [--num-samples 25] [--inception WEIGHTS]

One evaluation is what a Tune trial's evaluation or `facediff evaluate` does: build the metric, get the real
features (decode + extract, or load), draw `--num-samples` images with DPM-Solver++ at 25 steps from the tiny UNet
preset (random weights), compute the distances and their intervals. The dataset is a temporary synthetic one at the
demo's size (25 test records). The metric is the demo's `fd_mtcnn_onet`, or FID with `--inception` (any
torch-fidelity InceptionV3 weight file; the cost does not depend on the weights' values).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "benchmarks"))

from eval_cost import TINY_PRESET, temporary_dataset  # noqa: E402
from facediff.data.stream.local_batches import local_test_batches  # noqa: E402
from facediff.eval.evaluate import evaluate_task  # noqa: E402
from facediff.eval.metrics import build_image_distance  # noqa: E402
from facediff.eval.real_stats import CACHE_DIR, use_real_cache  # noqa: E402
from facediff.runs.load import load_model  # noqa: E402


def one_evaluation(task, cfg, cached: bool) -> tuple[float, dict]:
    start = time.perf_counter()
    metric = build_image_distance(cfg.eval)
    if cached:
        use_real_cache(metric, cfg.data.path, cfg.data.eval_split, cfg.data.image_size)
    result = evaluate_task(task, cfg, local_test_batches(cfg), metric)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test-records", type=int, default=25, help="real images (the demo: 25)")
    parser.add_argument("--num-samples", type=int, default=25, help="generated images per evaluation")
    parser.add_argument("--inception", type=Path, help="a torch-fidelity InceptionV3 weight file: measure FID")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    overrides = [f"eval.num_samples={args.num_samples}", "eval.sampler=dpm++", "eval.steps=25"]
    overrides += [f"eval.inception_weights={args.inception}", "eval.fallback_features=none"] if args.inception else []
    cfg, task = load_model(TINY_PRESET, overrides)
    root = Path(tempfile.mkdtemp(prefix="facediff-real-stats-"))
    try:
        cfg.data.path = str(temporary_dataset(root, cfg.data.image_size, args.test_records))
        one_evaluation(task, cfg, cached=False)  # warm-up: first-call costs belong to neither
        before, fresh = one_evaluation(task, cfg, cached=False)
        one_evaluation(task, cfg, cached=True)  # the first cached evaluation extracts and writes the cache
        assert any((Path(cfg.data.path) / CACHE_DIR).iterdir())
        after, reused = one_evaluation(task, cfg, cached=True)
        assert fresh == reused, (fresh, reused)  # the same numbers from the cached features
        metric = next(iter(fresh))
        print(f"tiny UNet preset, {cfg.data.image_size} px, {args.test_records} real, {args.num_samples} samples "
              f"(dpm++ 25), metric {metric}, {cfg.eval.bootstrap} bootstrap resamples, {args.threads} thread(s)")
        print(f"s/eval: extracted {before:.2f}, cached {after:.2f}; ratio {before / after:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
