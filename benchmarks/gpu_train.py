"""On a GPU: images/s and model FLOPs utilisation (MFU) of the UNet r3 training step at 128 px in bf16.

    uv run python benchmarks/gpu_train.py [--batch 64] [--steps 30] [--peak-tflops 989] [--compile]

The step is facediff's own (`PixelDiffusion.forward`: noising, UNet, MSE) with AdamW, under bf16 autocast.
FLOPs of one step (forward + backward) are counted by torch's FlopCounterMode; MFU = achieved FLOP/s over
the GPU's dense bf16 peak (989 TFLOP/s for H100/H200 SXM; pass --peak-tflops for other parts).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from facediff.config import load_config
from facediff.tasks import build_task

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "unet_r3.yaml"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_train.py needs a CUDA GPU")

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg = load_config(CONFIG)
    task = build_task(cfg).cuda().to(memory_format=torch.channels_last)
    step_fn = torch.compile(task) if args.compile else task
    optimizer = torch.optim.AdamW(task.parameters(), lr=cfg.optimizer.lr, fused=True)
    size = cfg.model.sample_size
    batch = {"image": torch.randn(args.batch, 3, size, size, device="cuda").clamp(-1, 1)}
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_fn(batch, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    flops_per_step = counter.get_total_flops()
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    achieved = flops_per_step / seconds
    params = sum(p.numel() for p in task.parameters())
    print(f"{torch.cuda.get_device_name()}  UNet r3 ({params:,} params), 128 px, bf16 autocast, batch {args.batch}"
          f"{', torch.compile' if args.compile else ''}")
    print(f"  {args.batch / seconds:10.1f} images/s   {seconds * 1000:8.1f} ms/step")
    print(f"  {flops_per_step / args.batch / 1e9:10.1f} GFLOP per image (fwd+bwd)")
    print(f"  {achieved / 1e12:10.1f} TFLOP/s achieved   MFU {achieved / (args.peak_tflops * 1e12):.1%}"
          f" of {args.peak_tflops:.0f} TFLOP/s peak")
    print(f"  peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
