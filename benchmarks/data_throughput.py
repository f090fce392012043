"""Images/s of the Ray Data loader (facediff.data.stream.dataset) against a plain in-process pyarrow + PIL loop.

    uv run python benchmarks/data_throughput.py [DATASET] [--image-sizes 64,128,256 --part-masks both --passes 2
                                                  --epochs-per-pass K]

Both paths decode the same shards with the same `decode_batch` and finish them with the same `finish_batch`
(float images, part masks; on the CPU here, on the worker's device in training), so the ratio is the cost (or
gain) of Ray Data itself. The Ray side iterates one training-style Dataset once per pass of K epochs, as a Ray
Train worker does (`data.epochs_per_pass`; by default what training picks for the split's size); the plain loop
reads the same K epochs. `--epochs-per-pass 1` is one streaming execution per epoch (before passes). Without
DATASET a temporary dataset of random but decodable 256 px rows (JPEG images, PNG label maps, like `prepare
celebamask`) is written first. The last line is `ratio <lowest warm ray/plain>` (warm: the last pass).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from facediff.data.celebamask import DEFAULT_PART_GROUPS, NUM_ATTRIBUTES, NUM_PART_CLASSES  # noqa: E402
from facediff.data.stream.passes import epochs_per_pass  # noqa: E402
from facediff.data.shards import (SCHEMA_VERSION, SHARD_SCHEMA, ShardWriter, shard_paths, split_rows,  # noqa: E402
                                  write_manifest)
from facediff.data.stream.batch import finish_batch  # noqa: E402
from facediff.data.stream.dataset import build_dataset, decode_batch, iter_train_batches  # noqa: E402


def encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_synthetic(root: Path, rows: int, size: int, rows_per_shard: int, seed: int = 0) -> Path:
    """Smooth random RGB JPEGs and blocky label-map PNGs, like prepared CelebAMask-HQ shards."""
    rng = np.random.default_rng(seed)
    shards, next_id = {}, 0
    for split, n in (("train", rows), ("test", max(1, rows // 10))):
        with ShardWriter(root, split, rows_per_shard=rows_per_shard) as writer:
            for i in range(n):
                coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                image = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
                labels = rng.integers(0, NUM_PART_CLASSES, (8, 8), dtype=np.uint8)
                parts = np.asarray(Image.fromarray(labels).resize((size, size), Image.Resampling.NEAREST))
                writer.write({
                    "id": next_id + i,
                    "image": encode(image, "JPEG"),
                    "parts": encode(parts, "PNG"),
                    "attributes": rng.integers(0, 2, NUM_ATTRIBUTES).tolist(),
                    "split": split,
                })
        shards[split], next_id = writer.files, next_id + n
    write_manifest(root, {"schema_version": SCHEMA_VERSION, "shards": shards, "synthetic": True})
    return root


def plain_loop(dataset: Path, split: str, size: int, groups, batch_size: int, epochs: range) -> tuple[int, float]:
    """pyarrow record batches -> decode_batch -> torch -> finish_batch, all in this process (the baseline)."""
    start, rows = time.perf_counter(), 0
    for epoch in epochs:
        for path in shard_paths(dataset, split):
            for record_batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size,
                                                                  columns=list(SHARD_SCHEMA.names)):
                batch = {name: col.to_numpy(zero_copy_only=False) for name, col in
                         zip(record_batch.schema.names, record_batch.columns)}
                out = decode_batch(batch, image_size=size, hflip=True, seed=0, epoch=epoch)
                tensors = finish_batch({k: torch.from_numpy(v) for k, v in out.items()}, groups)
                rows += len(tensors["id"])
    return rows, time.perf_counter() - start


def ray_passes(dataset: Path, split: str, size: int, groups, batch_size: int, passes: int,
               epochs_per_pass: int) -> list[tuple]:
    """One training-style Dataset (epoch=None), iterated `passes` times as a Ray Train worker does, each pass
    `epochs_per_pass` epochs: (rows, seconds, seconds to the first batch) per pass; the first includes planning."""
    out = []
    ds = build_dataset(dataset, split, image_size=size, hflip=True, seed=0, epoch=None, shuffle=True,
                       epochs_per_pass=epochs_per_pass)
    for _ in range(passes):
        start, rows, first = time.perf_counter(), 0, None
        for batch in iter_train_batches(ds, batch_size, device="cpu", part_groups=groups, drop_last=False):
            if first is None:
                first = time.perf_counter() - start
            rows += len(batch["id"])
        out.append((rows, time.perf_counter() - start, first))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", type=Path, help="prepared dataset folder (default: a temporary one)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--image-sizes", default="64,128,256", help="training sizes to decode at, comma-separated")
    parser.add_argument("--stored-size", type=int, default=256, help="image size of the temporary dataset")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--passes", type=int, default=2, help="passes over the Dataset (the last is the warm one)")
    parser.add_argument("--epochs-per-pass", type=int, default=None,
                        help="epochs a pass (default: what training picks for the split's size)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="logical CPUs declared to Ray")
    parser.add_argument("--part-masks", choices=("both", "with", "without"), default="both")
    parser.add_argument("--rows", type=int, default=2048, help="rows of the temporary dataset")
    parser.add_argument("--rows-per-shard", type=int, default=256, help="rows per shard of the temporary dataset")
    args = parser.parse_args()
    sizes = [int(v) for v in args.image_sizes.split(",")]
    masks = {"both": (False, True), "with": (True,), "without": (False,)}[args.part_masks]

    temporary = None
    if args.dataset is None:
        temporary = Path(tempfile.mkdtemp(prefix="facediff-bench-"))
        args.dataset = write_synthetic(temporary, args.rows, args.stored_size, args.rows_per_shard)
        print(f"wrote a temporary dataset: {args.rows} rows, {args.stored_size}px JPEG, "
              f"{len(shard_paths(args.dataset, args.split))} shards")
    import ray

    from facediff.ray_start import init_local_ray, quiet_ray_loggers

    quiet_ray_loggers()
    t = time.perf_counter()
    init_local_ray(args.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    init_s = time.perf_counter() - t
    rows = split_rows(args.dataset, args.split)
    per_pass = epochs_per_pass(args.epochs_per_pass, rows)
    results = []
    try:
        for size in sizes:
            for with_masks in masks:
                groups = DEFAULT_PART_GROUPS if with_masks else None
                plain = [plain_loop(args.dataset, args.split, size, groups, args.batch_size,
                                    range(p * per_pass, (p + 1) * per_pass)) for p in range(args.passes)]
                streamed = ray_passes(args.dataset, args.split, size, groups, args.batch_size, args.passes, per_pass)
                results.append((size, with_masks, plain, streamed))
    finally:
        ray.shutdown()
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)

    print(f"\nsplit={args.split} ({rows} rows) batch_size={args.batch_size} passes={args.passes} of {per_pass} "
          f"epochs ray num_cpus={args.num_cpus} "
          f"(machine: {os.cpu_count()} cores); ray.init {init_s:.1f}s (not counted)")
    print(f"{'size':>4} {'masks':>5} {'pass':>5} {'rows':>6} {'plain img/s':>12} {'ray img/s':>10} {'ray/plain':>9} "
          f"{'ray first batch':>16} {'ray after it':>13} {'ratio':>6}")
    warm = []
    for size, with_masks, plain, streamed in results:
        for index, ((rows_p, sec_p), (rows_r, sec_r, first)) in enumerate(zip(plain, streamed)):
            assert rows_p == rows_r, f"plain loop saw {rows_p} rows, Ray {rows_r}"
            ratio = (rows_r / sec_r) / (rows_p / sec_p)
            # the epoch's rate once its first batch is in: what a longer epoch tends to (the start is paid once)
            after = (rows_r - args.batch_size) / max(sec_r - first, 1e-9)
            print(f"{size:>4} {str(with_masks):>5} {index:>5} {rows_p:>6} {rows_p / sec_p:>12.0f} {rows_r / sec_r:>10.0f} "
                  f"{ratio:>9.2f} {first:>15.2f}s {after:>13.0f} {after / (rows_p / sec_p):>6.2f}")
        warm.append(ratio)  # the last pass's
    print("ray after it: the pass's rows after its first batch over the time after it; its ratio is against the "
          "plain loop's whole pass")
    print(f"warm = the last pass; the ratio below is the lowest warm ray/plain of the {len(warm)} rows")
    print(f"ratio {min(warm):.2f}")


if __name__ == "__main__":
    main()
