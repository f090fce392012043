"""sd_lora training step: cached inputs (image latents from `prepare latents`, text embeddings from the dataset's
`prompt_embeddings.safetensors`) vs encoding them on the fly, side by side.

    python benchmarks/sd_lora_inputs.py [--config configs/experiments/tiny/tiny_sd_lora.yaml] [--batch 16] [--steps 30]
    python benchmarks/sd_lora_inputs.py --config configs/experiments/celebamask/sd2_lora.yaml --random-weights \
        --batch 1 --steps 2 --warmup 1 --pool 4        # the production size (SD2 base, 512 px) on a CPU

All variants run the same full training step (UNet + LoRA forward/backward, AdamW) of one task on the same
batches of `--pool` distinct attribute vectors, in turn, after `--warmup` steps each: (1) both cached
(`data.use_latents`: the batch carries the latents, encoded once up front as `prepare latents` would, and the
prompts' embeddings are read from a safetensors file as `prepare prompt-embeddings` writes it), (2) latents
encoded on the fly, text from the in-memory per-prompt cache (a hit every step here; at CelebAMask-HQ's 27k
nearly distinct prompts it almost never hits), (3) both on the fly (an empty prompt cache every step). Prints each variant's steps/s and the ratios to (3). CUDA when available, else CPU. `--random-weights`
builds the pipeline from its shipped architecture (no download).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import save_file

from facediff.config import load_config
from facediff.data.prompt_embeddings import PromptEmbeddings, prompt_key
from facediff.tasks import build_task

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "tiny" / "tiny_sd_lora.yaml"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--pool", type=int, default=64, help="distinct images and attribute vectors")
    parser.add_argument("--random-weights", action="store_true", help="no pretrained weights (shipped presets)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_config(args.config, ["model.prompt_dropout=0"])
    cached_cfg = load_config(args.config, ["model.prompt_dropout=0", "data.use_latents=true"])
    task = build_task(cfg, load_pretrained=not args.random_weights).to(device)  # one task, two ways of feeding it
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-4)
    size = cfg.data.image_size
    pool = (torch.rand(args.pool, 40, generator=torch.Generator().manual_seed(0)) > 0.7).float()
    generator = torch.Generator().manual_seed(0)

    images = torch.rand(len(pool), 3, size, size, device=device) * 2 - 1
    latents = torch.cat([task.backbone.encode_images(chunk) for chunk in images.split(args.batch)])
    folder = Path(tempfile.mkdtemp(prefix="sd_lora_inputs_"))
    prompts = task.prompts(pool)
    save_file({prompt_key(p): s.cpu().contiguous() for p, s in zip(prompts, task.backbone.encode_prompts(prompts))},
              str(folder / "prompt_embeddings.safetensors"))
    store = PromptEmbeddings(folder)
    variants = ("both cached", "text cached", "on the fly")

    filled = task.backbone._prompt_cache  # every pool prompt, encoded above: "text cached" always hits

    def step(k: int, variant: str) -> None:
        # "on the fly" runs with an empty prompt cache and leaves the filled one as it was
        task.backbone._prompt_cache = OrderedDict() if variant == "on the fly" else filled
        rows = torch.arange(k * args.batch, (k + 1) * args.batch) % len(pool)
        if variant == "both cached":
            task.cfg, task._prompt_store = cached_cfg, store
            loss = task({"latents": latents[rows], "attributes": pool[rows]}, generator)
        else:
            task.cfg, task._prompt_store = cfg, None
            loss = task({"image": images[rows], "attributes": pool[rows]}, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for k in range(args.warmup):
        for variant in variants:
            step(k, variant)  # warm-up
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
        print(f"  {variant:12s} {rate[variant]:8.2f} steps/s  {1 / rate[variant]:8.2f} s/step   "
              f"ratio to on the fly {rate[variant] / rate['on the fly']:.2f}")


if __name__ == "__main__":
    main()
