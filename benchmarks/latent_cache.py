"""Data + encode cost per image of latent training: encoding on the fly against reading cached latents.

    python benchmarks/latent_cache.py [--rows 256 --batch-size 32] [--big --big-rows 64] [--ray]

For each autoencoder (the tiny presets at 32 px; with --big the LDM CelebA-HQ VQ-f4 and SD2's VAE at 256 px,
randomly initialised: speed does not depend on the weights), on the same shards:
  on the fly     read a shard, decode images (`decode_batch`), `LatentCodec.encode` them (what a training
                 worker does per batch with data.use_latents=false);
  cached         read the shard with its `latents` column and decode it (`decode_batch(latent_shape=...)`,
                 which still decodes the images for evaluation/conditioning);
  cached, latents only   read just the `latents` column (the floor: Parquet + float16 -> float32).
Each is timed in-process (no Ray) over the whole split, after one warm-up batch; `--ray` also times the Ray Data
stream (`build_dataset` with and without `use_latents`, encoding in the consumer loop). The one-off cost of
`prepare_latents` is printed too. Encodes on CUDA when available, else CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from data_throughput import write_synthetic  # noqa: E402  (benchmarks/ is the script's folder)

from facediff.config.schema import AutoencoderConfig  # noqa: E402
from facediff.data.shards import shard_paths  # noqa: E402
from facediff.data.stream.batch import images_to_float  # noqa: E402
from facediff.data.stream.dataset import build_dataset, decode_batch, iter_train_batches  # noqa: E402
from facediff.models.autoencoder import LatentCodec  # noqa: E402

TINY = [("tiny_vq", "vq", 32), ("tiny_kl", "kl", 32)]
BIG = [("ldm_celebahq256_vqvae", "vq", 256), ("sd2_vae", "kl", 256)]


def batches(dataset: Path, batch_size: int, columns: list[str]):
    for path in shard_paths(dataset, "train"):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns):
            yield {name: batch.column(name).to_numpy(zero_copy_only=False) for name in batch.schema.names}


def timed(fn, dataset: Path, batch_size: int, columns: list[str]) -> float:
    """Images/s of `fn(batch)` over the split, the first batch (warm-up) not counted."""
    rows, start = 0, None
    for batch in batches(dataset, batch_size, columns):
        fn(batch)
        if start is None:
            start = time.perf_counter()
            continue
        rows += len(batch["id"] if "id" in batch else batch["latents"])
    return rows / (time.perf_counter() - start)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, kind: str, size: int, dataset: Path, out: Path, args) -> dict:
    from facediff.data.prepare.latents import prepare_latents

    cfg = AutoencoderConfig(kind=kind, preset=name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t = time.perf_counter()
    manifest = prepare_latents(dataset, out, cfg, batch_size=args.batch_size, use_gpu=device.type == "cuda",
                               image_size=size, overwrite=True, progress=False)
    prepare_s = time.perf_counter() - t
    shape = tuple(manifest["latents"]["shape"])
    codec = LatentCodec(cfg, load_weights=False).to(device)
    kw = dict(image_size=size, hflip=False, seed=0, epoch=0)
    base = ["id", "image", "parts", "attributes"]

    def on_the_fly(batch):
        z = codec.encode(images_to_float(torch.from_numpy(decode_batch(batch, **kw)["image"]).to(device)))
        sync(device)
        return z

    def cached(batch):
        return torch.from_numpy(decode_batch(batch, latent_shape=shape, **kw)["latents"]).to(device)

    def latents_only(batch):
        z = np.stack(batch["latents"]) if batch["latents"].dtype == object else batch["latents"]
        return torch.from_numpy(z.astype(np.float32).reshape(len(z), *shape)).to(device)

    row = {
        "autoencoder": name, "size": size, "latent": "x".join(map(str, shape)), "device": device.type,
        "prepare_s": prepare_s,
        "fly": timed(on_the_fly, out, args.batch_size, base),
        "cached": timed(cached, out, args.batch_size, base + ["latents"]),
        "latents_only": timed(latents_only, out, args.batch_size, ["latents"]),
    }
    if args.ray:
        row["ray_fly"], row["ray_cached"] = ray_stream(out, size, codec, device, args.batch_size)
    return row


def ray_stream(dataset: Path, size: int, codec: LatentCodec, device, batch_size: int) -> tuple[float, float]:
    rates = []
    for use_latents in (False, True):
        ds = build_dataset(dataset, "train", image_size=size, hflip=False, use_latents=use_latents)
        rows, start = 0, time.perf_counter()
        for batch in iter_train_batches(ds, batch_size, device="cpu", drop_last=False):
            z = batch["latents"].to(device) if use_latents else codec.encode(batch["image"].to(device))
            sync(device)
            rows += len(z)
        rates.append(rows / (time.perf_counter() - start))
    return rates[0], rates[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256, help="training images at 32 px")
    parser.add_argument("--big-rows", type=int, default=64, help="training images at 256 px (--big)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--big", action="store_true", help="also the full-size autoencoders at 256 px")
    parser.add_argument("--big-only", action="store_true", help="only the full-size autoencoders")
    parser.add_argument("--ray", action="store_true", help="also time the Ray Data stream")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray instance")
    args = parser.parse_args()

    import ray

    from facediff.ray_start import init_local_ray

    init_local_ray(args.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"batch_size={args.batch_size}, machine: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
          "img/s of data + encode cost, one row per autoencoder as soon as it is measured")
    header = f"{'autoencoder':<22} {'px':>4} {'rows':>5} {'latent':>8} {'dev':>4} {'fly img/s':>10} {'cached':>9} " \
             f"{'cached/fly':>10} {'latents-only':>12} {'prepare s':>9}"
    print(header + (f" {'ray fly':>8} {'ray cached':>10} {'ratio':>6}" if args.ray else ""), flush=True)
    temporary = Path(tempfile.mkdtemp(prefix="latent-cache-"))
    try:
        for name, kind, size in (BIG if args.big_only else TINY + (BIG if args.big else [])):
            rows = args.rows if size <= 64 else args.big_rows
            dataset = temporary / f"images-{size}-{rows}"
            if not dataset.exists():
                write_synthetic(dataset, rows, size, rows_per_shard=max(args.batch_size, rows // 4))
            r = measure(name, kind, size, dataset, temporary / name, args)
            line = (f"{r['autoencoder']:<22} {r['size']:>4} {rows:>5} {r['latent']:>8} {r['device']:>4} "
                    f"{r['fly']:>10.1f} {r['cached']:>9.0f} {r['cached'] / r['fly']:>10.1f} {r['latents_only']:>12.0f} "
                    f"{r['prepare_s']:>9.1f}")
            if args.ray:
                line += f" {r['ray_fly']:>8.1f} {r['ray_cached']:>10.0f} {r['ray_cached'] / r['ray_fly']:>6.1f}"
            print(line, flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(temporary, ignore_errors=True)


if __name__ == "__main__":
    main()
