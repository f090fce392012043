"""sd_lora training step: text embeddings cached per distinct prompt vs encoded on the fly, side by side.

    python benchmarks/sd_lora_inputs.py [--config configs/experiments/tiny_sd_lora.yaml] [--batch 16] [--steps 30]

A record's prompt is a function of its attributes, so the frozen text encoder's output for it never changes:
`StableDiffusionBackbone.encode_prompts` caches it per prompt. Both variants run the same full training step
(VAE encode of the images, UNet + LoRA forward/backward, AdamW) on the same batches of 64 distinct attribute
vectors, alternating, after a warm-up; the cache is emptied before every step of the on-the-fly variant.
Latents are encoded on the fly in both (`data.use_latents` serves the latent families' autoencoders only).
Prints each variant's steps/s and the ratio cached / on the fly. CUDA when available, else CPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from facediff.config import load_config
from facediff.tasks import build_task

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "tiny_sd_lora.yaml"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_config(args.config, ["model.prompt_dropout=0"])
    task = build_task(cfg).to(device)
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-4)
    size = cfg.data.image_size
    pool = (torch.rand(64, 40, generator=torch.Generator().manual_seed(0)) > 0.7).float()
    generator = torch.Generator().manual_seed(0)

    def step(k: int, cached: bool) -> None:
        if not cached:
            task.backbone.clear_prompt_cache()
        rows = torch.arange(k * args.batch, (k + 1) * args.batch) % len(pool)
        batch = {"image": torch.rand(args.batch, 3, size, size, device=device) * 2 - 1, "attributes": pool[rows]}
        task(batch, generator).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for k in range(5):
        step(k, cached=True)  # warm-up (and fills the cache with every distinct prompt)
    seconds = {True: 0.0, False: 0.0}
    for k in range(args.steps):
        for cached in (True, False):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(k, cached)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds[cached] += time.perf_counter() - start
    rate = {c: args.steps / s for c, s in seconds.items()}
    print(f"{args.config.name} on {device}, batch {args.batch}, {args.steps} steps each")
    print(f"  text embeddings cached     {rate[True]:8.2f} steps/s")
    print(f"  text embeddings on the fly {rate[False]:8.2f} steps/s")
    print(f"ratio {rate[True] / rate[False]:.2f}")


if __name__ == "__main__":
    main()
