"""sd_lora training step: cached inputs (image latents from `prepare latents`, text embeddings cached per
distinct prompt) vs encoding them on the fly, side by side.

    python benchmarks/sd_lora_inputs.py [--config configs/experiments/tiny/tiny_sd_lora.yaml] [--batch 16] [--steps 30]

A record's prompt is a function of its attributes, so the frozen text encoder's output for it never changes:
`StableDiffusionBackbone.encode_prompts` caches it per prompt. Both variants run the same full training step
(VAE encode of the images, UNet + LoRA forward/backward, AdamW) on the same batches of 64 distinct attribute
vectors, in turn, after a warm-up: (1) both cached (`data.use_latents`: the batch carries the latents, encoded
once up front as `prepare latents` would), (2) latents encoded on the fly, text cached, (3) both on the fly (the
prompt cache emptied before every step). Prints each variant's steps/s and the ratios to (3). CUDA when
available, else CPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from facediff.config import load_config
from facediff.tasks import build_task

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "tiny" / "tiny_sd_lora.yaml"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_config(args.config, ["model.prompt_dropout=0"])
    task = build_task(cfg).to(device)
    cached_task = build_task(load_config(args.config, ["model.prompt_dropout=0", "data.use_latents=true"])).to(device)
    cached_task.backbone = task.backbone  # one set of networks, two ways of feeding them
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-4)
    size = cfg.data.image_size
    pool = (torch.rand(64, 40, generator=torch.Generator().manual_seed(0)) > 0.7).float()
    generator = torch.Generator().manual_seed(0)

    images = torch.rand(len(pool), 3, size, size, device=device) * 2 - 1
    latents = torch.cat([task.backbone.encode_images(chunk) for chunk in images.split(args.batch)])
    variants = ("both cached", "text cached", "on the fly")

    def step(k: int, variant: str) -> None:
        if variant == "on the fly":
            task.backbone.clear_prompt_cache()
        rows = torch.arange(k * args.batch, (k + 1) * args.batch) % len(pool)
        batch = {"image": images[rows], "attributes": pool[rows]}
        if variant == "both cached":
            cached_task({"latents": latents[rows], "attributes": pool[rows]}, generator).backward()
        else:
            task(batch, generator).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for k in range(5):
        for variant in variants:
            step(k, variant)  # warm-up (and fills the cache with every distinct prompt)
    seconds = dict.fromkeys(variants, 0.0)
    for k in range(args.steps):
        for variant in variants:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(k, variant)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds[variant] += time.perf_counter() - start
    rate = {c: args.steps / s for c, s in seconds.items()}
    print(f"{args.config.name} on {device}, batch {args.batch}, {args.steps} steps each")
    for variant in variants:
        print(f"  {variant:12s} {rate[variant]:8.2f} steps/s   ratio to on the fly {rate[variant] / rate['on the fly']:.2f}")


if __name__ == "__main__":
    main()
