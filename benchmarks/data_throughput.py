"""Images/s of the Ray Data loader (facediff.data.stream) against a plain in-process pyarrow + PIL loop.

    python benchmarks/data_throughput.py [DATASET] [--split train --image-size 64 --batch-size 32 --epochs 1]

Both paths decode the same shards with the same `decode_batch`, so the ratio is the cost (or gain) of Ray Data
itself. Without DATASET a temporary dataset of random but decodable rows is written first.
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
from facediff.data.shards import SCHEMA_VERSION, ShardWriter, shard_paths, write_manifest  # noqa: E402
from facediff.data.stream import build_dataset, decode_batch  # noqa: E402


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


def plain_loop(dataset: Path, split: str, decode_kw: dict, batch_size: int, epoch: int) -> tuple[int, float]:
    """pyarrow record batches -> decode_batch -> torch tensors, all in this process."""
    start, rows = time.perf_counter(), 0
    for path in shard_paths(dataset, split):
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
            batch = {name: col.to_numpy(zero_copy_only=False) for name, col in
                     zip(record_batch.schema.names, record_batch.columns)}
            out = decode_batch(batch, epoch=epoch, **decode_kw)
            tensors = {k: torch.from_numpy(v) for k, v in out.items()}
            rows += len(tensors["id"])
    return rows, time.perf_counter() - start


def ray_loop(dataset: Path, split: str, decode_kw: dict, batch_size: int, epoch: int) -> tuple[int, float, float]:
    start, rows, first = time.perf_counter(), 0, None
    ds = build_dataset(dataset, split, epoch=epoch, **decode_kw)
    for batch in ds.iter_torch_batches(batch_size=batch_size):
        if first is None:
            first = time.perf_counter() - start
        rows += len(batch["id"])
    return rows, time.perf_counter() - start, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", type=Path, help="prepared dataset folder (default: a temporary one)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="logical CPUs declared to Ray")
    parser.add_argument("--no-part-groups", action="store_true", help="skip the (B,G,S,S) part_masks channels")
    parser.add_argument("--rows", type=int, default=512, help="rows of the temporary dataset")
    parser.add_argument("--rows-per-shard", type=int, default=64, help="rows per shard of the temporary dataset")
    args = parser.parse_args()

    temporary = None
    if args.dataset is None:
        temporary = Path(tempfile.mkdtemp(prefix="facediff-bench-"))
        args.dataset = write_synthetic(temporary, args.rows, args.image_size, args.rows_per_shard)
        print(f"wrote a temporary dataset: {args.rows} rows, {args.image_size}px, "
              f"{len(shard_paths(args.dataset, args.split))} shards")
    decode_kw = dict(image_size=args.image_size, hflip=True, seed=0,
                     part_groups=None if args.no_part_groups else DEFAULT_PART_GROUPS)
    try:
        plain = [plain_loop(args.dataset, args.split, decode_kw, args.batch_size, e) for e in range(args.epochs)]

        import ray

        t = time.perf_counter()
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        init_s = time.perf_counter() - t
        try:
            with_ray = [ray_loop(args.dataset, args.split, decode_kw, args.batch_size, e) for e in range(args.epochs)]
        finally:
            ray.shutdown()
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)

    print(f"\nsplit={args.split} image_size={args.image_size} batch_size={args.batch_size} "
          f"part_masks={not args.no_part_groups} ray num_cpus={args.num_cpus} (machine: {os.cpu_count()} cores); "
          f"ray.init {init_s:.1f}s (not counted)")
    print(f"{'epoch':>5} {'rows':>6} {'plain img/s':>12} {'ray img/s':>10} {'ray/plain':>9} {'ray first batch':>16}")
    for epoch, ((rows_p, sec_p), (rows_r, sec_r, first)) in enumerate(zip(plain, with_ray)):
        assert rows_p == rows_r, f"plain loop saw {rows_p} rows, Ray {rows_r}"
        ips_p, ips_r = rows_p / sec_p, rows_r / sec_r
        print(f"{epoch:>5} {rows_p:>6} {ips_p:>12.0f} {ips_r:>10.0f} {ips_r / ips_p:>9.2f} {first:>15.2f}s")


if __name__ == "__main__":
    main()
