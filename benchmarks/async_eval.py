"""Evaluation and checkpoint upload off the training path, measured side by side in one run.

    uv run python benchmarks/async_eval.py [--kimg 0.8 --eval-every 0.2 --faces 256] [--set KEY=VALUE ...]

1. `eval.async_validation` false vs true: the demo UNet trained `--kimg` with an evaluation every `--eval-every`
   kimg. Printed: the training path's wall time (first to last training row of metrics.jsonl: what the workers
   spend, evaluations included when they run in the loop), the whole command's (`train()`, Ray start to export,
   the last evaluation included), and when the last evaluation row arrived after training ended.
2. `trainer.checkpoint_upload` sync vs async against a local S3 server (moto): a checkpoint every `--ckpt-every`
   steps, a row every step; the stall of a checkpoint is the time between its step's row and the next one, less
   the median time between two rows without a checkpoint.

Both parts run on the same synthetic shards; each run is a fresh run folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "experiments" / "tiny" / "demo_unet.yaml"
BUCKET = "facediff-bench"


def training_span(rows: list[dict]) -> float:
    steps = [r for r in rows if not r.get("async_eval")]
    return steps[-1]["time"] - steps[0]["time"]


def eval_part(base, args) -> None:
    from facediff.train.run import train
    from facediff.train.run_log import read_metrics

    print(f"\n1. evaluation every {args.eval_every} kimg over {args.kimg} kimg (eval.steps "
          f"{base.eval.steps}, {base.eval.num_samples} samples, {base.eval.sampler})", flush=True)
    results = {}
    for mode in ("sync", "async"):
        cfg = base.model_copy(deep=True)
        cfg.trainer.run_name = f"eval-{mode}"
        cfg.eval.async_validation = mode == "async"
        started = time.time()
        run = train(cfg, progress=False)
        whole = time.time() - started
        rows = read_metrics(run)
        evals = [r for r in rows if r.get("async_eval") or any(k.startswith(("fid", "fd_")) for k in r)]
        last_train = max(r["time"] for r in rows if not r.get("async_eval"))
        late = max(r["time"] for r in evals) - last_train if mode == "async" else 0.0
        results[mode] = (training_span(rows), whole, len(evals), late)
        print(f"  {mode:<5}: training path {results[mode][0]:7.1f} s, whole command {whole:7.1f} s, "
              f"{len(evals)} evaluations, last result {late:5.1f} s after the last step", flush=True)
    (sync_train, sync_whole, *_), (async_train, async_whole, *_) = results["sync"], results["async"]
    print(f"  training path async/sync {async_train / sync_train:.2f}, whole command {async_whole / sync_whole:.2f}")


def stalls(rows: list[dict], every: int) -> tuple[float, float]:
    """(median stall of a checkpoint, median step interval) from one-row-per-step metrics."""
    rows = [r for r in rows if not r.get("async_eval")]
    gaps = {b["step"]: b["time"] - a["time"] for a, b in zip(rows, rows[1:])}
    plain = statistics.median(g for s, g in gaps.items() if (s - 1) % every and s > 3)
    after = [g - plain for s, g in gaps.items() if (s - 1) % every == 0 and s - 1 > 0]
    return statistics.median(after), plain


def upload_part(base, args) -> None:
    import boto3
    from moto.server import ThreadedMotoServer

    from facediff.storage import RunStorage
    from facediff.train.run import train
    from facediff.train.run_log import METRICS_FILE, read_metrics

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://{host}:{port}"})
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    world, batch = base.trainer.num_workers, base.trainer.batch_size
    steps = round(args.upload_kimg * 1000 / (world * batch))
    print(f"\n2. checkpoint every {args.ckpt_every} steps over {steps} steps to s3 (moto on {host}:{port})", flush=True)
    try:
        for mode in ("sync", "async"):
            cfg = base.model_copy(deep=True)
            cfg.trainer.run_name, cfg.trainer.storage_path = f"upload-{mode}", f"s3://{BUCKET}/bench"
            cfg.trainer.total_kimg = args.upload_kimg
            cfg.trainer.checkpoint_every_kimg = args.ckpt_every * world * batch / 1000
            cfg.trainer.log_every_steps, cfg.trainer.keep_last = 1, 2
            cfg.trainer.checkpoint_upload = mode
            cfg.eval.every_kimg = None
            train(cfg, progress=False)
            storage = RunStorage(cfg.trainer.storage_path, cfg.trainer.run_name)
            storage.pull(METRICS_FILE)
            stall, plain = stalls(read_metrics(storage.local), args.ckpt_every)
            size = sum(info["Size"] for info in boto3.client("s3").list_objects_v2(
                Bucket=BUCKET, Prefix=f"bench/{cfg.trainer.run_name}/checkpoint_")["Contents"]) / 2 / 2**20
            print(f"  {mode:<5}: stall per checkpoint {stall:6.3f} s (median; a step {plain:.3f} s), "
                  f"checkpoint {size:.1f} MiB", flush=True)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kimg", type=float, default=0.8)
    parser.add_argument("--eval-every", type=float, default=0.2)
    parser.add_argument("--upload-kimg", type=float, default=0.48)
    parser.add_argument("--ckpt-every", type=int, default=5, help="steps between checkpoints (upload part)")
    parser.add_argument("--faces", type=int, default=256)
    parser.add_argument("--part", choices=["eval", "upload", "both"], default="both")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides for every run")
    args = parser.parse_args()

    from facediff.config import load_config
    from facediff.data.prepare.celebamask import prepare_celebamask
    from facediff.data.synthetic.celebamask import write_synthetic_celebamask

    tmp = Path(tempfile.mkdtemp(prefix="facediff-bench-"))
    write_synthetic_celebamask(tmp / "raw", n=args.faces, size=64, progress=False)
    prepare_celebamask(tmp / "raw", tmp / "shards", image_size=32, mask_size=32, rows_per_shard=32, progress=False)
    base = load_config(CONFIG, [f"data.path={tmp / 'shards'}", f"trainer.storage_path={tmp / 'runs'}",
                                f"trainer.total_kimg={args.kimg}", "trainer.log_every_steps=5",
                                f"trainer.checkpoint_every_kimg={args.kimg}", f"eval.every_kimg={args.eval_every}",
                                "eval.steps=20", "eval.num_samples=32", "eval.bootstrap=0",
                                "eval.async_resources={CPU: 0.5}", *args.set])
    if args.part in ("eval", "both"):
        eval_part(base, args)
    if args.part in ("upload", "both"):
        upload_part(base, args)


if __name__ == "__main__":
    main()
