"""Images/s and model FLOPs utilisation (MFU) of facediff's bare training step, and what each `trainer.gpu`
option changes, for UNet r3 at 128 px and LC_UNet_3 on 3x64x64 latents (cached, as `data.use_latents` reads them).

    uv run python benchmarks/gpu_train.py [--model unet_r3,lc_unet_3] [--batch 64] [--steps 30] [--compile]
    uv run python benchmarks/gpu_train.py --device cpu --tiny --steps 2   # smoke run of the script itself
    uv run python benchmarks/gpu_train.py --precision bf16 ...            # override the config's trainer.precision

The step is facediff's own: the task's forward (noising, network, loss) under `engine.GpuStep` (the same object
`facediff train` uses), backward, AdamW from `engine.build_optimizer`; no Ray, no DeepSpeed, so it is the bare
step `facediff train` is compared with (`make gpu-check` prints that ratio). It runs in `trainer.precision` as
DeepSpeed does: under bf16/fp16 every floating-point parameter of the task (frozen networks included) is cast to
that precision and its buffers are left as they are (DeepSpeed's `_cast_module_mixed_precision`), and AdamW
updates fp32 master copies of the trained parameters, which are copied back into them after each step (fp16 with
DeepSpeed's initial loss scale, 2**16, held fixed). Each row prints the precision it ran in. Rows: the options
as the config sets them ("as configured", what `facediff train` runs), then one option changed per row (rows
that would repeat an earlier one's settings are left out). FLOPs of one step
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
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from facediff.config import load_config  # noqa: E402
from facediff.tasks import build_task  # noqa: E402
from facediff.train.engine import GpuStep, build_optimizer  # noqa: E402

EXPERIMENTS = Path(__file__).resolve().parents[1] / "configs" / "experiments"
MODELS = {  # name: (config, overrides, what the batch holds)
    "unet_r3": ("celebamask/unet_r3.yaml", ["data.image_size=128", "model.sample_size=128"], "128 px images"),
    "lc_unet_3": ("celebamask/lc_unet_3.yaml", ["data.use_latents=true"], "3x64x64 cached latents"),
}
TINY = {"unet_r3": ("tiny/tiny_unet.yaml", [], "tiny images"), "lc_unet_3": ("tiny/tiny_lc_unet.yaml", ["data.use_latents=true"],
                                                                         "tiny latents")}
VARIANTS = {  # row label: trainer overrides on top of the config's own
    "as configured": [],
    "fp32 weights": ["trainer.precision=fp32"],
    "fp32 weights, tf32 off": ["trainer.precision=fp32", "trainer.gpu.tf32=false"],
    "fused AdamW off": ["trainer.gpu.fused_adamw=false"],
    # channels_last needs DeepSpeed's ZeRO-0 fp32 (the config refuses it beside bf16 weights or ZeRO 1-3)
    "fp32 weights, channels_last": ["trainer.precision=fp32", "trainer.zero_stage=0", "trainer.gpu.channels_last=true"],
    # autocast is mixed precision over fp32 weights: the config refuses it beside trainer.precision=bf16
    "fp32 + bf16 autocast": ["trainer.precision=fp32", "trainer.gpu.autocast=bf16"],
    "fp32 + bf16 autocast, channels_last": ["trainer.precision=fp32", "trainer.zero_stage=0",
                                            "trainer.gpu.autocast=bf16", "trainer.gpu.channels_last=true"],
}
LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}
FP16_LOSS_SCALE = 2.0**16  # DeepSpeed's initial_scale_power 16 (engine.deepspeed_config)


def cast_like_deepspeed(module: nn.Module, precision: str) -> None:
    """What DeepSpeed's bf16/fp16 mode does to the engine's module: every floating-point parameter, trained or
    frozen, in the low precision; buffers keep their dtype. Nothing under fp32."""
    dtype = LOW_PRECISION.get(precision)
    if dtype is None:
        return
    for p in module.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)


class MasterWeightAdamW:
    """The optimizer step of DeepSpeed's bf16/fp16 modes: AdamW (`engine.build_optimizer`) over fp32 copies of the
    trained parameters, fed their low-precision gradients (fp16: divided by the loss scale, which stays fixed:
    no overflow check, this times steps), the parameters then overwritten with the updated copies. Under fp32 the
    AdamW updates the parameters themselves."""

    def __init__(self, module: nn.Module, cfg, fused: bool):
        precision = cfg.trainer.precision
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.low = precision in LOW_PRECISION
        self.loss_scale = FP16_LOSS_SCALE if precision == "fp16" else 1.0
        self.masters = nn.ParameterList([nn.Parameter(p.detach().float().clone()) for p in self.params]) \
            if self.low else None
        self.optimizer, _ = build_optimizer(self.masters if self.low else module, cfg, 1, fused=fused)

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward()

    @torch.no_grad()
    def step(self) -> None:
        if not self.low:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return
        masters = list(self.masters)
        for master, p in zip(masters, self.params):
            master.grad = None if p.grad is None else p.grad.float()
            p.grad = None
        if self.loss_scale != 1.0:
            torch._foreach_div_([m.grad for m in masters], self.loss_scale)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        torch._foreach_copy_(self.params, masters)  # rounded to the parameters' precision

    @property
    def master_dtype(self) -> torch.dtype:
        return self.masters[0].dtype if self.low else self.params[0].dtype


def effective_settings(cfg, device: torch.device) -> tuple:
    """What a row changes in the step on this device (`trainer.gpu` is ignored off the GPU, as `GpuStep` does)."""
    g, on_gpu = cfg.trainer.gpu, device.type == "cuda"
    return cfg.trainer.precision, *(on_gpu and value for value in (g.tf32, g.fused_adamw, g.channels_last,
                                                                   g.compile, g.autocast != "none"))


def precision_label(cfg, gpu: GpuStep) -> str:
    """What the step computes in: the weights' precision, TF32 and autocast where they apply."""
    precision = cfg.trainer.precision
    if precision in LOW_PRECISION:
        return f"{precision} weights, fp32 AdamW masters"
    parts = ["fp32"]
    if gpu.on_gpu and cfg.trainer.gpu.tf32:
        parts.append("TF32")
    if gpu.autocast:
        parts.append("bf16 autocast")
    return " + ".join(parts)


def make_batch(task, cfg, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    if cfg.model.family == "lc_unet":
        c, h, w = task.latent_shape
        return {"latents": torch.randn(batch, c, h, w, device=device),
                "attributes": torch.randint(0, 2, (batch, 40), device=device).float()}
    size = cfg.data.image_size
    return {"image": torch.rand(batch, 3, size, size, device=device) * 2 - 1}


def build_bare_step(cfg, device: torch.device):
    """(task, optimizer, GpuStep) as `facediff train`'s worker sets them up (`engine.build_engine`), minus DeepSpeed:
    channels_last first, then the precision cast."""
    gpu = GpuStep(cfg, device)
    task = build_task(cfg, load_pretrained=False).to(device)
    if gpu.channels_last:
        task = task.to(memory_format=torch.channels_last)
    cast_like_deepspeed(task, cfg.trainer.precision)
    return task, MasterWeightAdamW(task, cfg, fused=gpu.fused_adamw), gpu


def measure(cfg, batch: int, steps: int, warmup: int, device: torch.device) -> dict:
    task, optimizer, gpu = build_bare_step(cfg, device)
    step_fn = torch.compile(task) if gpu.compile else task
    data = gpu.batch(make_batch(task, cfg, batch, device))
    generator = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        with gpu.forward():
            loss = step_fn(data, generator)
        optimizer.backward(loss)
        optimizer.step()

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
            "params": params, "seconds": seconds, "precision": precision_label(cfg, gpu)}


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
    parser.add_argument("--precision", choices=["config", "fp32", "bf16", "fp16"], default="config",
                        help="trainer.precision of the 'as configured' row (default: the config's own)")
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
    precision = [] if args.precision == "config" else [f"trainer.precision={args.precision}"]
    if device.type == "cuda":  # the tiny configs train on CPU workers, where the config refuses fp16
        precision.append("trainer.use_gpu=true")
    for model in args.model.split(","):
        config, base, holds = models[model]
        configs, seen = {}, []
        for label, extra in variants.items():
            compile_ = extra == ["__compile__"]
            cfg = load_config(EXPERIMENTS / config, [*base, *precision, *(["trainer.gpu.compile=true"] if compile_
                                                                         else extra)])
            if (key := effective_settings(cfg, device)) not in seen:  # "fp32 weights" of an fp32 config, CPU rows
                configs[label] = cfg
                seen.append(key)
        print(f"{name}: {model}, {holds}, batch {args.batch}, {args.steps} timed steps after {args.warmup}; "
              f"trainer.precision {configs['as configured'].trainer.precision}")
        first = None
        for label, cfg in configs.items():
            row = measure(cfg, args.batch, args.steps, args.warmup, device)
            achieved = row["flops"] / row["seconds"]
            first = first or row
            # the first row keeps the "as configured <precision>  N images/s ... MFU x%" wording `make gpu-check` reads
            print(f"  {label:<36} {row['precision']:<32} {row['images_per_s']:10.1f} images/s {row['ms']:8.1f} "
                  f"ms/step  {row['flops'] / args.batch / 1e9:8.1f} GFLOP/image  "
                  f"MFU {achieved / (args.peak_tflops * 1e12):.1%}  x{row['images_per_s'] / first['images_per_s']:.2f}")
        print(f"  ({first['params']:,} trained parameters)")
        if device.type == "cuda":
            print(f"  peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
