"""`trainer.gradient_checkpointing`: every family's trainable networks recompute their activations in the
backward. The gradients of one training step match those without it (fp32 tolerance), and the activations kept
for the backward shrink: measured deterministically as the bytes of the tensors autograd saves outside the
checkpointed regions (`saved_tensors_hooks`; torch.utils.checkpoint saves none inside them), weights excluded.
No Ray."""

import pytest
import torch

from facediff.config import load_config
from facediff.tasks import build_task

from conftest import REPO

EXPERIMENTS = REPO / "configs" / "experiments" / "tiny"
# family -> (tiny preset, overrides that keep the step deterministic and the batch simple)
FAMILIES = {
    "unet": ("tiny_unet", []),
    "dit": ("tiny_dit", ["model.dropout=0.1"]),  # the recompute must replay the forward's dropout masks
    "lc_unet": ("tiny_lc_unet_seg", []),  # its SegFormer mask encoder trains (frozen: false)
    "sd_lora": ("tiny_sd_lora", ["model.prompt_dropout=0"]),
    "controlnet": ("tiny_controlnet", ["model.prompt_dropout=0", "loss.masked_lpips_weight=0",
                                       "loss.face_feature_weight=0"]),
}


def batch_for(cfg, n: int) -> dict:
    g = torch.Generator().manual_seed(1)
    size = cfg.data.image_size
    batch = {"image": torch.rand(n, 3, size, size, generator=g) * 2 - 1,
             "attributes": (torch.rand(n, 40, generator=g) < 0.4).float()}
    groups = cfg.data.resolved_part_groups()
    if groups:
        batch["part_masks"] = (torch.rand(n, len(groups), size, size, generator=g) < 0.2).float()
    if cfg.model.family == "controlnet":
        batch["prompts"] = [f"a photo of {k} people" for k in range(n)]
    return batch


def saved_activation_bytes(task, batch) -> tuple[int, torch.Tensor]:
    """(bytes of the distinct non-parameter tensors autograd keeps for the backward, the loss)."""
    weights = {p.untyped_storage().data_ptr() for p in task.parameters()}
    weights |= {p.untyped_storage().data_ptr() for net in task.frozen_networks().values() for p in net.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = task(batch, torch.Generator().manual_seed(2))
    return sum(kept.values()), loss


def one_step(task, batch):
    task.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # dropout draws from the global generator
    saved, loss = saved_activation_bytes(task, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in task.named_parameters() if p.grad is not None}
    return loss.detach(), grads, saved


@pytest.mark.parametrize("family", list(FAMILIES))
def test_checkpointing_keeps_the_gradients_and_saves_fewer_activations(family):
    preset, overrides = FAMILIES[family]
    cfg = load_config(EXPERIMENTS / f"{preset}.yaml", overrides)
    batch = batch_for(cfg, 2)
    task = build_task(cfg)  # one build (the slow part here), stepped without and then with checkpointing
    plain_loss, plain_grads, plain_saved = one_step(task, batch)
    task.enable_gradient_checkpointing()
    assert all(net.is_gradient_checkpointing for net in task.checkpointed_networks())  # diffusers and transformers
    ckpt_loss, ckpt_grads, ckpt_saved = one_step(task, batch)
    assert torch.equal(plain_loss, ckpt_loss)
    assert plain_grads.keys() == ckpt_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        assert torch.allclose(ckpt_grads[name], grad, rtol=1e-4, atol=1e-6), name
    # the tiny presets already keep clearly less; production sizes more (docs/training.md, "Memory")
    assert ckpt_saved < 0.8 * plain_saved, (ckpt_saved, plain_saved)


def test_the_config_key_turns_it_on_and_sampling_is_unchanged():
    cfg = load_config(EXPERIMENTS / "tiny_unet.yaml")
    on = build_task(load_config(EXPERIMENTS / "tiny_unet.yaml", ["trainer.gradient_checkpointing=true"]))
    off = build_task(cfg)
    assert not cfg.trainer.gradient_checkpointing and not off.net.is_gradient_checkpointing
    assert on.net.is_gradient_checkpointing
    same = [task.sample(2, torch.Generator().manual_seed(0), "ddim", 2) for task in (on, off)]
    assert torch.equal(*same)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA peak memory needs a GPU")
def test_checkpointing_lowers_the_cuda_peak():
    peaks = []
    for flag in ("false", "true"):
        cfg = load_config(EXPERIMENTS / "tiny_unet.yaml", [f"trainer.gradient_checkpointing={flag}"])
        task = build_task(cfg).cuda()
        batch = {"image": torch.rand(64, 3, 32, 32, device="cuda") * 2 - 1}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        task(batch, torch.Generator("cuda").manual_seed(0)).backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
        del task
        torch.cuda.empty_cache()
    assert peaks[1] < 0.8 * peaks[0], peaks
