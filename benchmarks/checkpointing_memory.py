"""Activation memory of one training step with and without `trainer.gradient_checkpointing`, per image.

Measured deterministically, without timing: the bytes of the distinct non-weight tensors autograd keeps for the
backward (`saved_tensors_hooks`; non-reentrant torch.utils.checkpoint keeps none inside its regions), at the
config's real network size with random weights, batch 1 (the bytes scale with the batch). Also the largest
gradient difference between the two steps (0 expected: the recompute replays the forward, dropout included).

    uv run python benchmarks/checkpointing_memory.py dit_small_2k7 unet_r5 [--set key=value ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from facediff.config import load_config
from facediff.tasks import build_task

EXPERIMENTS = Path(__file__).resolve().parents[1] / "configs" / "experiments"


def step(task, batch) -> tuple[int, dict[str, torch.Tensor]]:
    weights = {p.untyped_storage().data_ptr() for p in task.parameters()}
    weights |= {p.untyped_storage().data_ptr() for net in task.frozen_networks().values() for p in net.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    task.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = task(batch, torch.Generator().manual_seed(0))
    loss.backward()
    return sum(kept.values()), {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="names under configs/experiments (pixel or lc_unet families)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    for name in args.configs:
        cfg = load_config(EXPERIMENTS / f"{name}.yaml", args.overrides)
        task = build_task(cfg, load_pretrained=False)
        size = cfg.data.image_size
        batch = {"image": torch.rand(1, 3, size, size) * 2 - 1, "attributes": torch.zeros(1, 40)}
        plain, plain_grads = step(task, batch)
        task.enable_gradient_checkpointing()
        ckpt, ckpt_grads = step(task, batch)
        worst = max((ckpt_grads[k] - g).abs().max().item() for k, g in plain_grads.items())
        print(f"{name}: {plain / 2**20:.1f} MiB -> {ckpt / 2**20:.1f} MiB of saved activations per image "
              f"(ratio {ckpt / plain:.3f}); largest gradient difference {worst:.1e}", flush=True)


if __name__ == "__main__":
    main()
