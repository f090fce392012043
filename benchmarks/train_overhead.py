"""Images/s of facediff's training step (Ray Train + DeepSpeed ZeRO-2, 2 CPU workers) against a plain
`torchrun` DDP loop of the same tiny model and global batch, measured side by side in one run.

    uv run python benchmarks/train_overhead.py [--kimg 1.5 --repeats 3 --faces 256] [--set trainer.zero_stage=0 ...]

`--set` overrides facediff's side only (a config key, as `facediff train --set` takes it), to measure a setting
against the same plain loop. `--faces` sizes the synthetic data: with fewer faces, more of the timed steps start
a new pass (a new Ray Data streaming execution of `data.epochs_per_pass` epochs) on facediff's side;
`--set data.epochs_per_pass=1` starts one every epoch, as facediff did before passes.

Both read the same synthetic shards, do the same work a step (the task's loss, AdamW, the EMA update) and skip
their first steps (start-up, JIT) when timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "experiments" / "tiny" / "tiny_unet.yaml"
WARMUP_STEPS = 5


def ddp_worker(shards: str, steps: int, result: str) -> None:
    """One torchrun rank: the same task, data decoding, AdamW and EMA, wrapped in DistributedDataParallel."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    import torch.distributed as dist

    from facediff.config import load_config
    from facediff.data.shards import shard_paths
    from facediff.data.stream.batch import images_to_float
    from facediff.data.stream.dataset import decode_batch
    from facediff.tasks import build_task
    from facediff.train.ema import EMA

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(CONFIG, [f"data.path={shards}"])
    torch.manual_seed(cfg.trainer.seed)
    model = torch.nn.parallel.DistributedDataParallel(build_task(cfg))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr)
    ema = EMA(model.module, cfg.trainer.ema)  # a diffusion loop averages its weights every step (DiT's does too)
    table = pa.concat_tables([pq.read_table(p) for p in shard_paths(shards, "train")])
    rows = {name: np.asarray(table.column(name).to_pylist(), dtype=object) for name in table.column_names}
    bs, n = cfg.trainer.batch_size, table.num_rows
    generator = torch.Generator().manual_seed(rank)
    start = None
    for step in range(steps):
        if step == WARMUP_STEPS:
            dist.barrier()
            start = time.perf_counter()
        index = [(step * bs * world + rank * bs + k) % n for k in range(bs)]
        batch = decode_batch({k: v[index] for k, v in rows.items()}, image_size=cfg.data.image_size,
                             hflip=True, seed=0, epoch=step)
        loss = model({"image": images_to_float(torch.from_numpy(batch["image"]))}, generator)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
        optimizer.step()
        ema.update(model.module)
    dist.barrier()
    if rank == 0:
        rate = (steps - WARMUP_STEPS) * bs * world / (time.perf_counter() - start)
        Path(result).write_text(json.dumps({"images_per_s": rate}))
    dist.destroy_process_group()


def facediff_rate(run: Path) -> float:
    from facediff.train.run_log import read_metrics

    rows = [r for r in read_metrics(run) if r["step"] > WARMUP_STEPS]
    first, last = rows[0], rows[-1]
    return (last["kimg"] - first["kimg"]) * 1000 / (last["time"] - first["time"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kimg", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each side; the median is reported")
    parser.add_argument("--faces", type=int, default=256,
                        help="synthetic faces written (9/10 train): fewer faces, more Ray Data passes (each a new "
                             "streaming execution) in the timed steps")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for facediff's side (repeatable)")
    parser.add_argument("--ddp-worker", nargs=3, metavar=("SHARDS", "STEPS", "RESULT"))
    args = parser.parse_args()
    if args.ddp_worker:
        ddp_worker(args.ddp_worker[0], int(args.ddp_worker[1]), args.ddp_worker[2])
        return

    from facediff.config import load_config
    from facediff.data.prepare.celebamask import prepare_celebamask
    from facediff.data.shards import split_rows
    from facediff.data.synthetic.celebamask import write_synthetic_celebamask
    from facediff.train.run import epochs_per_pass, train

    tmp = Path(tempfile.mkdtemp(prefix="facediff-bench-"))
    write_synthetic_celebamask(tmp / "raw", n=args.faces, size=64, progress=False)
    prepare_celebamask(tmp / "raw", tmp / "shards", image_size=32, mask_size=32, rows_per_shard=32, progress=False)
    cfg = load_config(CONFIG, [f"data.path={tmp / 'shards'}", f"trainer.storage_path={tmp / 'runs'}",
                               f"trainer.total_kimg={args.kimg}", "trainer.zero_stage=2",
                               "trainer.log_every_steps=5", f"trainer.checkpoint_every_kimg={args.kimg}", *args.set])
    world, batch = cfg.trainer.num_workers, cfg.trainer.batch_size
    steps = round(args.kimg * 1000 / (world * batch))
    result = tmp / "ddp.json"
    ours, plain = [], []
    for attempt in range(args.repeats):  # alternating, so a busy spell on a shared machine hits both sides
        run_cfg = cfg.model_copy(deep=True)
        run_cfg.trainer.run_name = f"overhead-{attempt}"  # a fresh run each time, never a resume
        ours.append(facediff_rate(train(run_cfg)))
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", __file__,
                        "--ddp-worker", str(tmp / "shards"), str(steps), str(result)],
                       check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        plain.append(json.loads(result.read_text())["images_per_s"])
        print(f"run {attempt + 1}/{args.repeats}: facediff {ours[-1]:.1f} img/s, plain {plain[-1]:.1f} img/s, "
              f"ratio {ours[-1] / plain[-1]:.2f}", flush=True)
    ratios = sorted(o / p for o, p in zip(ours, plain))
    train_faces = split_rows(tmp / "shards", "train")
    per_pass = epochs_per_pass(cfg)
    print(f"\nglobal batch {world}x{batch}, {steps} steps, first {WARMUP_STEPS} not timed, {args.repeats} alternating runs; "
          f"{train_faces} training faces, {per_pass} epochs a pass: a Ray Data streaming execution every "
          f"{per_pass * train_faces // (world * batch)} steps")
    if args.set:
        print(f"facediff overrides: {' '.join(args.set)}")
    print(f"{f'facediff (Ray Train + DeepSpeed ZeRO-{cfg.trainer.zero_stage})':<42} {statistics.median(ours):8.1f} img/s (median)")
    print(f"{'plain torchrun DDP (gloo)':<42} {statistics.median(plain):8.1f} img/s (median)")
    print(f"ratios per run: {', '.join(f'{r:.2f}' for r in ratios)}")
    print(f"ratio {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
