"""Images/s and model FLOPs utilisation (MFU) of facediff's bare training step, and what each `trainer.gpu`
option changes, for UNet r3 at 128 px and LC_UNet_3 on 3x64x64 latents (cached, as `data.use_latents` reads them).

    uv run python benchmarks/gpu_train.py [--model unet_r3,lc_unet_3] [--batch 64] [--steps 30] [--compile]
    uv run python benchmarks/gpu_train.py --device cpu --tiny --steps 2   # smoke run of the script itself

The step is facediff's own: the task's forward (noising, network, loss) under `engine.GpuStep` (the same object
`facediff train` uses), backward, AdamW from `engine.build_optimizer`; no Ray, no DeepSpeed, so it is the bare
step `facediff train` is compared with (`make gpu-check` prints that ratio). Rows: the options as the config sets
them ("as configured", what `facediff train` runs), then one option changed per row. FLOPs of one step
(forward + backward) are counted by torch's FlopCounterMode; MFU = achieved FLOP/s over the GPU's dense bf16
peak (989 TFLOP/s for H100/H200 SXM; --peak-tflops for other parts), so fp32 rows are judged against the bf16
peak too.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from facediff.config import load_config  # noqa: E402
from facediff.tasks import build_task  # noqa: E402
from facediff.train.engine import GpuStep, build_optimizer  # noqa: E402

EXPERIMENTS = Path(__file__).resolve().parents[1] / "configs" / "experiments"
MODELS = {  # name: (config, overrides, what the batch holds)
    "unet_r3": ("unet_r3.yaml", ["data.image_size=128", "model.sample_size=128"], "128 px images"),
    "lc_unet_3": ("lc_unet_3.yaml", ["data.use_latents=true"], "3x64x64 cached latents"),
}
TINY = {"unet_r3": ("tiny_unet.yaml", [], "tiny images"), "lc_unet_3": ("tiny_lc_unet.yaml", ["data.use_latents=true"],
                                                                         "tiny latents")}
VARIANTS = {  # row label: trainer.gpu overrides on top of the config's own
    "as configured": [],
    "tf32 off": ["trainer.gpu.tf32=false"],
    "fused AdamW off": ["trainer.gpu.fused_adamw=false"],
    "+ channels_last": ["trainer.gpu.channels_last=true"],
    "+ bf16 autocast": ["trainer.gpu.autocast=bf16"],
    "+ bf16 autocast, channels_last": ["trainer.gpu.autocast=bf16", "trainer.gpu.channels_last=true"],
}


def make_batch(task, cfg, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    if cfg.model.family == "lc_unet":
        c, h, w = task.latent_shape
        return {"latents": torch.randn(batch, c, h, w, device=device),
                "attributes": torch.randint(0, 2, (batch, 40), device=device).float()}
    size = cfg.data.image_size
    return {"image": torch.rand(batch, 3, size, size, device=device) * 2 - 1}


def measure(config: Path, overrides: list[str], batch: int, steps: int, warmup: int, device: torch.device,
            compile_: bool) -> dict:
    cfg = load_config(config, [*overrides, *(["trainer.gpu.compile=true"] if compile_ else [])])
    gpu = GpuStep(cfg, device)
    task = build_task(cfg, load_pretrained=False).to(device)
    if gpu.channels_last:
        task = task.to(memory_format=torch.channels_last)
    step_fn = torch.compile(task) if gpu.compile else task
    optimizer, _ = build_optimizer(task, cfg, 1, fused=gpu.fused_adamw)
    data = gpu.batch(make_batch(task, cfg, batch, device))
    generator = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        with gpu.forward():
            loss = step_fn(data, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with FlopCounterMode(display=False) as counter:
        step()
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    params = sum(p.numel() for p in task.parameters() if p.requires_grad)
    return {"images_per_s": batch / seconds, "ms": seconds * 1000, "flops": counter.get_total_flops(),
            "params": params, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="unet_r3,lc_unet_3", help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--compile", action="store_true", help="also a row with torch.compile")
    parser.add_argument("--only-configured", action="store_true", help="just the 'as configured' row")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny presets (a smoke run of the script)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_train.py: no CUDA GPU here (--device cpu --tiny runs the script on the CPU)")
    variants = dict(VARIANTS)
    if args.compile:
        variants["+ torch.compile"] = ["__compile__"]
    if args.only_configured:
        variants = {"as configured": []}
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (MFU meaningless)"
    models = TINY if args.tiny else MODELS
    for model in args.model.split(","):
        config, base, holds = models[model]
        print(f"{name}: {model}, {holds}, batch {args.batch}, {args.steps} timed steps after {args.warmup}")
        first = None
        for label, extra in variants.items():
            compile_ = extra == ["__compile__"]
            row = measure(EXPERIMENTS / config, [*base, *([] if compile_ else extra)], args.batch, args.steps,
                          args.warmup, device, compile_)
            achieved = row["flops"] / row["seconds"]
            first = first or row
            # the first row keeps the "N images/s ... MFU x%" wording that `make gpu-check` reads
            print(f"  {label:<32} {row['images_per_s']:10.1f} images/s {row['ms']:8.1f} ms/step  "
                  f"{row['flops'] / args.batch / 1e9:8.1f} GFLOP/image  MFU {achieved / (args.peak_tflops * 1e12):.1%}"
                  f"  x{row['images_per_s'] / first['images_per_s']:.2f}")
        print(f"  ({first['params']:,} trained parameters)")
        if device.type == "cuda":
            print(f"  peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
